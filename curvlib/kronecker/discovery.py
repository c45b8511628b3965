r"""Layer discovery without tags: which parameters K-FAC can Kronecker-factor.

[`find_layers`][curvlib.kronecker.find_layers] traces the model on *one example* (every array
argument sliced to a batch of one) into a flat program (`curvlib.kronecker._program`,
sub-jaxprs of ``jit``/``einsum``/``checkpoint`` inlined) and follows every
parameter leaf through the ops that only move its entries around (its
*views*: ``transpose``, ``reshape``, ``squeeze``/``expand_dims``, a
size-preserving ``broadcast_in_dim``, ``convert_element_type``, copies and
sharding annotations). Where a view enters

* ``dot_general`` with an operand that is not itself a parameter view, and no
  ``dot_general`` batch dimensions (dense layers, ``x @ W.T``, attention
  projections ``einsum('btd,dhk->bthk')``, flax ``Dense``/``DenseGeneral``/
  ``nnx.Linear``/``nnx.LinearGeneral``): a **dense** layer whose matrix is
  the weight with its contracted axes as rows, $W \in
  \mathbb{R}^{d_\text{in} \times d_\text{out}}$;
* ``conv_general_dilated`` as the kernel, with ``feature_group_count ==
  batch_group_count == 1`` (any dimension numbers, strides, padding,
  dilations): a **conv** layer, rows = (input channel, window position);
* ``gather`` as the operand of a row lookup ``W[ids]`` along axis 0
  (``jnp.take``, ``nnx.Embed``, ``linen.Embed``): an **embedding**;

the leaf is a K-FAC layer. A leaf whose views feed *several* such ops of the
same kind through the same view (a layer applied at several places: weight
sharing) is one layer with more positions per example (Eschenhagen et al.
2023). A leaf that is added to the output of exactly the ops of one layer,
broadcast along every axis but the output features (``y = x @ W + b``), is
that layer's **bias**: K-FAC treats it as the homogeneous coordinate of the
input, $[a; 1]$.

Everything else falls back to a **diagonal** block, with a reason: biases
that are not attached that way, norm scales, a parameter used by different
kinds of ops (tied input/output embeddings), a parameter that enters ``scan``
(scanned layers are not unrolled), ``while``, ``cond``, a custom-derivative
function or any other op, a ``dot_general`` with batch dimensions over a
weight axis, a product of two parameters, grouped convolutions, and unused
leaves. Nothing is guessed: a pattern that is not recognised exactly is a
diagonal block.

References (the layer kinds and the weight-sharing conventions recognised; the
factors themselves are in `curvlib.kronecker.curvature`):
  R. Grosse and J. Martens, *A Kronecker-factored approximate Fisher matrix for
  convolution layers*, ICML 2016.
  R. Eschenhagen, A. Immer, R. Turner, F. Schneider and P. Hennig,
  *Kronecker-factored approximate curvature for modern neural network
  architectures*, NeurIPS 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from curvlib import _compile, _tree, _validate
from curvlib.kronecker import _program

PyTree = Any

# ops that only move a parameter's entries (a view); sharding annotations are identities
_IDENTITY_OPS = ("copy", "copy_p", "sharding_constraint", "reshard", "mesh_cast")
_VIEW_OPS = ("transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim",
             "convert_element_type") + _IDENTITY_OPS
KINDS = ("dense", "conv", "embedding")


# --------------------------------------------------------------------------- views


class Step(NamedTuple):
    """One step of a view chain: ``kind`` in transpose/reshape/convert/broadcast."""

    kind: str
    arg: Any  # perm, new shape, dtype, or (shape, broadcast_dimensions)
    in_shape: tuple
    in_dtype: Any


def _step(op: _program.Op) -> Step | None:
    """The view step of ``op`` on its single operand, ``None`` if it is not one we replay."""
    aval_in, aval_out = op.in_avals[0], op.out_avals[0]
    in_shape, out_shape = tuple(aval_in.shape), tuple(aval_out.shape)
    dt = aval_in.dtype
    name = op.name
    if name in _IDENTITY_OPS:
        return Step("identity", None, in_shape, dt)
    if name == "transpose":
        return Step("transpose", tuple(op.params["permutation"]), in_shape, dt)
    if name == "reshape":
        if op.params.get("dimensions") is not None:
            return None
        return Step("reshape", out_shape, in_shape, dt)
    if name in ("squeeze", "expand_dims"):
        return Step("reshape", out_shape, in_shape, dt)
    if name == "broadcast_in_dim":
        if math.prod(out_shape) == math.prod(in_shape):  # only inserts size-1 axes
            return Step("reshape", out_shape, in_shape, dt)
        return Step("broadcast", (out_shape, tuple(op.params["broadcast_dimensions"])),
                    in_shape, dt)
    if name == "convert_element_type":
        return Step("convert", np.dtype(aval_out.dtype), in_shape, dt)
    return None


def apply_chain(chain: tuple, x, xp=jnp, *, convert: bool = True):
    """Replay a view chain on ``x`` (``xp``: ``jnp`` on the hot path, ``np`` for probes);
    without ``convert`` its dtype casts are skipped (a vector keeps its digits)."""
    for s in chain:
        if s.kind == "transpose":
            x = xp.transpose(x, s.arg)
        elif s.kind == "reshape":
            x = xp.reshape(x, s.arg)
        elif s.kind == "convert":
            x = x.astype(s.arg) if xp is jnp and convert else x
        elif s.kind == "broadcast":
            shape, dims = s.arg
            expanded = [1] * len(shape)
            for i, d in enumerate(dims):
                expanded[d] = x.shape[i]
            x = xp.broadcast_to(xp.reshape(x, expanded), shape)
    return x


def invert_chain(chain: tuple, y):
    """The inverse of a bijective view chain (no ``broadcast`` step), applied to ``y``."""
    for s in reversed(chain):
        if s.kind == "transpose":
            y = jnp.transpose(y, np.argsort(s.arg))
        elif s.kind == "reshape":
            y = jnp.reshape(y, s.in_shape)
        elif s.kind == "convert":
            y = y.astype(s.in_dtype)
    return y


# --------------------------------------------------------------------------- results


class Use(NamedTuple):
    """One application of a layer's weight in the per-example program.

    ``op``: index of the ``dot_general``/``conv_general_dilated``/``gather``;
    ``operand``: position of the activation (or indices) operand; ``act``: how
    to turn that operand into rows (kind-specific, hashable); ``out_perm``:
    transpose of the op's output to ``(positions..., output features...)``;
    ``positions``: rows per example.
    """

    op: int
    operand: int
    act: tuple
    out_perm: tuple
    positions: int


class Layer(NamedTuple):
    """A Kronecker-factored layer: the weight as a ``(d_in, d_out)`` matrix (+ a bias row).

    Attributes:
      kind: ``"dense"``, ``"conv"`` or ``"embedding"``.
      weight: index of the weight leaf in ``jax.tree.leaves(params)``.
      weight_path: its key path, e.g. ``"['layers'][0]['kernel']"``.
      bias: index of the bias leaf, or ``None``.
      bias_path: its key path, or ``None``.
      chain: the view chain from the weight leaf to its ``(d_in, d_out)`` matrix.
      in_dim: ``d_in`` (rows of the weight matrix; the vocabulary for embeddings).
      out_dim: ``d_out``.
      uses: the `Use` of each application (several = weight sharing).
    """

    kind: str
    weight: int
    weight_path: str
    bias: int | None
    bias_path: str | None
    chain: tuple
    in_dim: int
    out_dim: int
    uses: tuple

    @property
    def positions(self) -> int:
        """Rows (weight-sharing positions) per example, summed over uses."""
        return sum(u.positions for u in self.uses)

    @property
    def a_dim(self) -> int:
        """Size of the input factor: ``d_in`` plus one for a bias (homogeneous coordinate)."""
        return self.in_dim + (self.bias is not None)


class Fallback(NamedTuple):
    """A parameter leaf that gets a diagonal block, and why.

    Attributes:
      leaf: the leaf's index in the flattened parameters.
      path: the leaf's pytree path, e.g. ``"['scale']"``.
      shape: the leaf's shape.
      reason: why no Kronecker factor applies, e.g. ``"enters `mul`"``.
    """

    leaf: int
    path: str
    shape: tuple
    reason: str


class KfacLayers:
    """What `find_layers` found: Kronecker-factored layers and diagonal fallbacks.

    A static description (hashable by identity; equal when built from the same
    model trace), used as the structure of [`KfacCurvature`][curvlib.KfacCurvature]
    and of the [`scale_by_kfac`][curvlib.scale_by_kfac] state.
    [`curvlib.kronecker.format_layers`][curvlib.kronecker.format_layers] prints it as a table.

    Attributes:
      layers: the [`Layer`][curvlib.kronecker.Layer] tuple.
      diagonal: the [`Fallback`][curvlib.kronecker.Fallback] tuple (diagonal blocks).
      treedef: the parameters' tree structure.
      shapes: the parameter leaves' shapes.
      num_examples: batch size of the traced call.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.kronecker import find_layers
      >>> model = lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) * p["s"]
      >>> p = {"w": jnp.ones((3, 2)), "b": jnp.ones(2), "s": jnp.ones(2)}
      >>> found = find_layers(model, p, jnp.ones((4, 3)))
      >>> found
      KfacLayers(1 dense; 1 diagonal leaves)
      >>> found.factor_shapes()  # A is (3 + 1) x (3 + 1) with the bias; s is diagonal
      ((((4, 4), (2, 2)),), ((2,),))
      >>> found == find_layers(model, p, jnp.zeros((4, 3)))  # the same model trace
      True
    """

    def __init__(self, program, layers, diagonal, treedef, shapes, dtypes, paths, out_aval,
                 num_examples):
        self.program = program
        self.layers = tuple(layers)
        self.diagonal = tuple(diagonal)
        self.treedef = treedef
        self.shapes = tuple(shapes)
        self.dtypes = tuple(dtypes)
        self.paths = tuple(paths)
        self.out_aval = out_aval
        self.num_examples = num_examples
        # constants are excluded: callers pass them as arguments (statistics(consts=...))
        self._key = (
            repr(program.ops), len(program.consts), treedef, self.shapes,
            tuple(map(str, self.dtypes)), self.layers, self.diagonal, str(out_aval),
        )

    # a static structure: equal traces give equal (and equally hashed) structures, so
    # jitted code taking a KfacCurvature as an argument is not recompiled
    def __eq__(self, other):
        return isinstance(other, KfacLayers) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def factor_shapes(self) -> tuple:
        """``((A shape, G shape) per layer, diagonal leaf shapes)``."""
        ag = tuple(
            ((l.in_dim,) if l.kind == "embedding" else (l.a_dim, l.a_dim), (l.out_dim, l.out_dim))
            for l in self.layers
        )
        return ag, tuple(self.shapes[f.leaf] for f in self.diagonal)

    def __repr__(self):
        kinds = {k: sum(l.kind == k for l in self.layers) for k in KINDS}
        found = ", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "no layers"
        return f"KfacLayers({found}; {len(self.diagonal)} diagonal leaves)"


# --------------------------------------------------------------------------- tracing


def _split_args(args: tuple, name: str = "args"):
    """``(batched leaves, treedef, static leaves)``: array leaves carry the example axis."""
    leaves, treedef = jax.tree.flatten(args)
    arrays = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]
    if not arrays:
        raise ValueError(
            f"`{name}` holds no arrays; K-FAC needs a batch whose array leaves share a leading "
            "example axis."
        )
    n = first = None
    if len(args) == 1 and isinstance(args[0], dict):  # keyword inputs (`example_inputs`)
        where = [f"the input {p}" for p, _ in _tree.leaves_with_paths(args[0])]
    else:
        where = [f"{name}{p}" for p, _ in _tree.leaves_with_paths(args)]
    for i in arrays:
        shape = tuple(leaves[i].shape)
        if not shape:
            raise ValueError(
                f"every array in `{name}` must have a leading example axis; leaf {i} is a "
                f"scalar ({where[i]}). Close over unbatched constants in the model function "
                "instead."
            )
        if n is None:
            n, first = shape[0], i
        elif shape[0] != n:
            raise ValueError(
                f"every array in `{name}` must share the leading example axis; got {n} and "
                f"{shape[0]} ({where[first]} has {n} examples, {where[i]} has shape "
                f"{shape}). Close over unbatched arrays in the model function instead."
            )
    return leaves, treedef, arrays, n


def _example_struct(x):
    return jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype)


def per_example_fn(model_fn: Callable, treedef_args, leaves_args, arrays, param_treedef):
    """``(param leaves, batched leaves of one example (batch of 1)) -> model output``."""
    static = {i: leaves_args[i] for i in range(len(leaves_args)) if i not in arrays}

    def fn(param_leaves, batched):
        it = iter(batched)
        full = [static[i] if i in static else next(it) for i in range(len(leaves_args))]
        args = jax.tree.unflatten(treedef_args, full)
        params = jax.tree.unflatten(param_treedef, param_leaves)
        return model_fn(params, *args)

    return fn


def find_layers(model_fn: Callable, params: PyTree, *args) -> KfacLayers:
    r"""Find the Kronecker-factorable layers of ``model_fn(params, *args)`` from its jaxpr.

    No tags and no layer registry: the model is traced on one example and
    every parameter leaf is followed to the ops it enters (module docstring:
    the patterns covered and the fallbacks). Works for plain functions, flax
    ``linen`` (``lambda p, x: model.apply({"params": p}, x)``) and ``nnx``
    (``lambda p, x: nnx.merge(graphdef, p)(x)``) models.

    Cost: one abstract trace of the model (no FLOPs).

    Args:
      model_fn: ``model_fn(params, *args) -> outputs`` with outputs whose leading
        axis is the example axis.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
      *args: the batch; every array leaf has the leading example axis (close
        over unbatched arrays in ``model_fn``).

    Returns:
      A [`KfacLayers`][curvlib.kronecker.KfacLayers].

    Raises:
      ValueError: for arguments without a shared leading axis, or a model whose
        output does not keep the example axis.
      ArgumentError: (a ``ValueError`` and a ``TypeError``) for ``params`` that hold no
        array or a leaf that is not real floating (as `kfac_curvature`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.kronecker import find_layers
      >>> def mlp(p, x):
      ...     h = jnp.tanh(x @ p["w1"] + p["b1"])
      ...     return h @ p["w2"].T * p["scale"]
      >>> p = {"w1": jnp.ones((3, 4)), "b1": jnp.ones(4), "w2": jnp.ones((2, 4)),
      ...      "scale": jnp.ones(2)}
      >>> found = find_layers(mlp, p, jnp.ones((8, 3)))
      >>> [(l.kind, l.weight_path, l.bias_path, l.in_dim, l.out_dim) for l in found.layers]
      [('dense', "['w1']", "['b1']", 3, 4), ('dense', "['w2']", None, 4, 2)]
      >>> [(f.path, f.reason) for f in found.diagonal]
      [("['scale']", 'enters `mul`')]
    """
    _validate.float_leaves(params, "params")
    return _find_layers(model_fn, params, args)


def _concrete_arrays(tree) -> bool:
    """Every leaf a value this process holds whole (not traced, abstract or multi-host)."""
    return all(not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))
               and getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree))


def check_examples_independent(model_fn: Callable, params: PyTree, args: tuple,
                               where: str) -> None:
    """Raise ``ValueError`` when the model's output for one example depends on another.

    K-FAC's statistics (and the one-pass gradient of ``value_and_grad``) replay the
    model one example at a time, as [`find_layers`][curvlib.kronecker.find_layers] traced
    it: a model whose examples interact (batch normalisation over the batch, in-batch
    negatives) would get factors, and a one-pass loss and gradient, of another model.
    Checked on the first two examples of ``args``: the outputs of the pair must equal
    those of each example alone (to ``sqrt(eps)`` of the outputs' scale; non-finite entries,
    a class masked with ``-inf``, exactly). Skipped when nothing is concrete (inside a
    trace, ``jax.ShapeDtypeStruct`` inputs), when the batch holds one example, across
    hosts, and on an ``Explicit`` mesh's sharded example axis. Cost: one forward pass on
    two examples and two on one, compiled once per model program and shapes.
    """
    if _compile.tracing() or not (_concrete_arrays(params) and _concrete_arrays(args)):
        return  # (inside a trace even closed-over concrete arrays become tracers)
    leaves, treedef, arrays, n = _split_args(args)
    if n < 2 or any(_tree.explicit_sharding(leaves[i]) is not None for i in arrays):
        return  # (an Explicit mesh's example axis cannot be sliced to two examples)

    def outputs(inputs):
        params, batched = inputs

        def call(lo, hi):
            full = list(leaves)
            for i, x in zip(arrays, batched, strict=True):
                full[i] = x[lo:hi]
            return jnp.asarray(model_fn(params, *jax.tree.unflatten(treedef, full)))

        return call(0, 2), jnp.concatenate([call(0, 1), call(1, 2)])

    # compiled once per model program and shapes (the parameters and examples its inputs)
    inputs = (params, [leaves[i][:2] for i in arrays])
    program = _compile.traced_program(outputs, inputs)
    pair, each = (np.asarray(x, np.float64) for x in _compile.run_program(program, inputs))
    # non-finite entries (a class masked with -inf) must agree exactly; the rest to rounding
    fin = np.isfinite(pair) & np.isfinite(each)
    if not np.array_equal(np.where(fin, 0.0, pair), np.where(fin, 0.0, each), equal_nan=True):
        gap, scale = np.inf, np.inf
    else:
        pair, each = np.where(fin, pair, 0.0), np.where(fin, each, 0.0)
        scale = max(float(np.max(np.abs(pair), initial=0.0)), 1e-30)
        gap = float(np.max(np.abs(pair - each), initial=0.0))
    dtype = jnp.result_type(*[jnp.result_type(x) for x in jax.tree.leaves(params)])
    eps = float(jnp.finfo(dtype).eps)
    if gap > np.sqrt(eps) * scale:
        raise ValueError(
            f"{where}: `model_fn`'s output for an example depends on the other examples of "
            f"its batch: on the first two examples of the batch, the outputs computed "
            f"together and one at a time differ by {gap:.3g} (outputs up to {scale:.3g}). "
            "K-FAC's statistics replay the model one example at a time, so a model whose "
            "examples interact (batch normalisation over the batch, in-batch negatives, a "
            "random mask drawn from one key for the whole batch: dropout) would get factors of "
            "another model. Use per-example normalisation (LayerNorm, or batch statistics "
            "held fixed: `use_running_average=True`); for dropout, pass one key per example "
            "as a batched input (shape (N, 2), split from your key) or turn it off; or use a "
            "first-order optimiser for this model."
        )


def _describe_args(args) -> str:
    """What a model's arguments after ``params`` hold: keyword names, or leaf types."""
    if len(args) == 1 and isinstance(args[0], dict):
        return f"the keyword arguments {sorted(args[0])}" if args[0] else "no arguments"
    return f"{len(args)} argument(s) holding {[type(x).__name__ for x in jax.tree.leaves(args)]}"


def _no_batch_error(model_fn, params, args) -> ValueError:
    """A model given no batch array: what it received and, from its own signature, what it
    expected (the ``TypeError`` of the call, which names the missing parameter)."""
    expected = ""
    try:
        jax.eval_shape(lambda p: model_fn(p, *args), params)
    except TypeError as e:
        expected = f" Called that way, the model raises TypeError: {e}."
    except Exception:  # noqa: BLE001  (any other failure says nothing about the arguments)
        pass
    return ValueError(
        f"what the model receives besides the parameters holds no arrays "
        f"({_describe_args(args)}); "
        "K-FAC needs a batch whose array leaves share a leading example axis." + expected
        + " Extra arguments reach the model by the parameter names of its signature: with "
        "`kfac`/`scale_by_kfac`, name the keys of `example_inputs` (and of `update`'s extra "
        "arguments) after them, e.g. `example_inputs={'x': x}` for `model_fn(params, x)`."
    )


def _find_layers(model_fn, params, args) -> KfacLayers:
    p_paths, p_treedef = jax.tree_util.tree_flatten_with_path(params)
    p_leaves = [x for _, x in p_paths]
    paths = [jax.tree_util.keystr(k) for k, _ in p_paths]
    if not any(hasattr(x, "shape") and hasattr(x, "dtype") for x in jax.tree.leaves(args)):
        raise _no_batch_error(model_fn, params, args)
    a_leaves, a_treedef, arrays, n = _split_args(args)
    fn = per_example_fn(model_fn, a_treedef, a_leaves, arrays, p_treedef)
    p_structs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in p_leaves]
    b_structs = [_example_struct(a_leaves[i]) for i in arrays]
    try:
        program = _program.trace(fn, p_structs, b_structs)
    except (TypeError, ValueError) as e:  # the model on one example: name what was traced
        if type(e) not in (TypeError, ValueError):  # (curvlib's and JAX's own: as they are)
            raise
        shapes = [tuple(jnp.shape(a_leaves[i])) for i in arrays]
        raise type(e)(
            f"`model_fn` failed on one example: K-FAC traces it with every array input cut "
            f"to its first example along the leading axis (inputs of shapes {shapes} as "
            f"{[tuple(b.shape) for b in b_structs]}), so every array input needs the "
            f"example axis first, the batch's size (a single example `x[0]` is a batch "
            f"`x[:1]`); the model raised: {e}") from e
    if len(program.outputs) != 1 or not jax.tree_util.treedef_is_leaf(program.out_tree):
        raise ValueError(
            f"`model_fn` must return one array (the model's outputs); it returned "
            f"{program.out_tree} ({len(program.outputs)} leaves): return the logits or means "
            "alone (e.g. `lambda p, x: model(p, x)['logits']`)."
        )
    out_aval = _aval_of(program, program.outputs[0])
    if not out_aval.shape or out_aval.shape[0] != 1:
        raise ValueError(
            "`model_fn` must keep the leading example axis of its inputs in its output; on a "
            f"batch of one it returned shape {tuple(out_aval.shape)}."
        )
    layers, diagonal = _classify(program, len(p_leaves), paths, [x.shape for x in p_structs])
    return KfacLayers(
        program, layers, diagonal, p_treedef, [tuple(x.shape) for x in p_structs],
        [x.dtype for x in p_structs], paths, out_aval, n,
    )


def _aval_of(program, atom):
    if isinstance(atom, _program.Lit):
        return jax.core.get_aval(atom.val)
    if atom in program.inputs:
        raise ValueError("`model_fn` returns one of its inputs unchanged.")
    for op in program.ops:
        if atom in op.outs:
            return op.out_avals[op.outs.index(atom)]
    c = program.consts[atom]
    return jax.ShapeDtypeStruct(np.shape(c), jnp.result_type(c))


# --------------------------------------------------------------------------- classification


def _classify(program, num_leaves, paths, shapes):
    """``(layers, diagonal)``: the leaves that are Kronecker-factored layers, and the rest."""
    views, uses = _trace_views(program, num_leaves)
    layer_of = {}  # leaf -> (kind, chain, dims, [Use])
    reasons = {}
    for leaf in range(num_leaves):
        found = _leaf_layer(program, views, uses[leaf])
        if isinstance(found, str):
            reasons[leaf] = found
        else:
            layer_of[leaf] = found
    bias_of, reasons = _find_biases(program, num_leaves, uses, layer_of, reasons, shapes)
    return _assemble(num_leaves, layer_of, bias_of, reasons, paths, shapes)


def _trace_views(program, num_leaves):
    """``(views, uses)``: each value that is a view of a leaf, and each leaf's non-view uses.

    ``views`` maps a value to ``(leaf, chain, broadcast)`` (the view steps from the
    leaf); ``uses`` maps a leaf to ``[(op index, operand, chain, broadcast)]``, op index
    ``-1`` for a program output.
    """
    views = {}  # value -> (leaf, chain, broadcast)
    for leaf, v in enumerate(program.inputs[:num_leaves]):
        views[v] = (leaf, (), False)
    uses = {leaf: [] for leaf in range(num_leaves)}  # leaf -> [(op index, operand, chain, bc)]
    for i, op in enumerate(program.ops):
        srcs = [(pos, a) for pos, a in enumerate(op.ins) if isinstance(a, int) and a in views]
        if not srcs:
            continue
        if op.name in _VIEW_OPS and len(op.ins) == 1:
            step = _step(op)
            if step is not None:
                leaf, chain, bc = views[op.ins[0]]
                if step.kind != "identity":
                    chain = chain + (step,)
                views[op.outs[0]] = (leaf, chain, bc or step.kind == "broadcast")
                continue
        for pos, a in srcs:
            leaf, chain, bc = views[a]
            uses[leaf].append((i, pos, chain, bc))
    for pos, a in enumerate(program.outputs):
        if isinstance(a, int) and a in views:
            leaf, chain, bc = views[a]
            uses[leaf].append((-1, pos, chain, bc))
    return views, uses


def _leaf_layer(program, views, leaf_uses):
    """``(kind, chain, dims, [Use])`` when all of a leaf's uses are one layer, else the reason."""
    if not leaf_uses:
        return "unused by the model"
    cands = [_layer_use(program, views, i, pos, chain, bc) for i, pos, chain, bc in leaf_uses]
    bad = [c for c in cands if isinstance(c, str)]
    good_kinds = sorted({c[0] for c in cands if not isinstance(c, str)})
    if bad and good_kinds:
        return (
            f"used as a {good_kinds[0]} weight and elsewhere ({bad[0]}): shared with "
            "another op, e.g. tied weights"
        )
    if bad:
        return bad[0]
    kinds = {c[0] for c in cands}
    mats = {(c[1], c[2]) for c in cands}
    if len(kinds) > 1 or len(mats) > 1:
        return (
            f"used by {len(cands)} ops of different kinds or layouts "
            f"({', '.join(sorted(kinds))}); weight sharing across different operations "
            "(e.g. tied input/output embeddings) is not Kronecker-factored"
        )
    kind, chain, dims = cands[0][:3]
    return (kind, chain, dims, [c[3] for c in cands])


def _find_biases(program, num_leaves, uses, layer_of, reasons, shapes):
    """``(bias_of, reasons)``: leaf -> layer leaf for each bias, and the updated reasons.

    A bias is a leaf added to the (sole-consumer) outputs of all uses of one layer.
    """
    reasons = dict(reasons)
    consumers = program.consumers()
    producer = {o: i for i, op in enumerate(program.ops) for o in op.outs}
    bias_of = {}
    op_to_leaf = {u.op: leaf for leaf, (_, _, _, us) in layer_of.items() for u in us}
    for leaf in range(num_leaves):
        if leaf in layer_of or reasons.get(leaf) == "unused by the model":
            continue
        target = _bias_target(program, producer, consumers, uses[leaf], op_to_leaf, layer_of,
                              shapes[leaf])
        if isinstance(target, str):
            reasons[leaf] = target
        elif target is not None:
            if target in bias_of.values():
                reasons[leaf] = "a second bias added to the same layer (kept diagonal)"
                continue
            bias_of[leaf] = target
            reasons.pop(leaf, None)
    return bias_of, reasons


def _assemble(num_leaves, layer_of, bias_of, reasons, paths, shapes):
    """``(layers, diagonal)``: a `Layer` per weight (with its bias), a `Fallback` per other leaf."""
    layers = []
    bias_for = {w: b for b, w in bias_of.items()}
    for leaf in sorted(layer_of):
        kind, chain, (d_in, d_out), us = layer_of[leaf]
        b = bias_for.get(leaf)
        layers.append(Layer(kind, leaf, paths[leaf], b, None if b is None else paths[b],
                            chain, d_in, d_out, tuple(us)))
    diagonal = [
        Fallback(leaf, paths[leaf], tuple(shapes[leaf]), reasons[leaf])
        for leaf in range(num_leaves)
        if leaf not in layer_of and leaf not in bias_of
    ]
    return layers, diagonal


def _is_view(views, a):
    return isinstance(a, int) and a in views


def _layer_use(program, views, i, pos, chain, bc):
    """``(kind, matrix chain, (d_in, d_out), Use)`` for a layer use, else a reason string."""
    if i < 0:
        return "returned by the model unchanged"
    op = program.ops[i]
    name = op.name
    if bc:
        return f"broadcast before entering `{name}`"
    if name == "dot_general":
        return _dense_use(op, views, i, pos, chain)
    if name == "conv_general_dilated":
        return _conv_use(op, views, i, pos, chain)
    if name == "gather":
        return _embedding_use(op, views, i, pos, chain)
    if name in ("scan", "while", "cond"):
        return f"enters `{name}` (layers inside control flow are not unrolled)"
    if name.startswith("custom_"):
        return f"enters `{name}` (a function with a custom derivative)"
    return f"enters `{name}`"


def _dense_use(op, views, i, pos, chain):
    other = op.ins[1 - pos]
    if _is_view(views, other):
        return "enters `dot_general` with another parameter (a product of parameters)"
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    if lb or rb:
        return "enters `dot_general` with batch dimensions (per-group weights)"
    w_shape = tuple(op.in_avals[pos].shape)
    x_shape = tuple(op.in_avals[1 - pos].shape)
    cw, cx = (tuple(rc), tuple(lc)) if pos == 1 else (tuple(lc), tuple(rc))
    fw = tuple(d for d in range(len(w_shape)) if d not in cw)
    fx = tuple(d for d in range(len(x_shape)) if d not in cx)
    if not fw:
        return "enters `dot_general` with no output features (a contraction to a scalar)"
    d_in = math.prod(w_shape[d] for d in cw)
    d_out = math.prod(w_shape[d] for d in fw)
    positions = math.prod(x_shape[d] for d in fx)
    mat = chain + (
        Step("transpose", cw + fw, w_shape, op.in_avals[pos].dtype),
        Step("reshape", (d_in, d_out), tuple(w_shape[d] for d in cw + fw),
             op.in_avals[pos].dtype),
    )
    nfx, nfw = len(fx), len(fw)
    if pos == 1:  # output dims: (x free..., w free...)
        out_perm = tuple(range(nfx + nfw))
    else:  # output dims: (w free..., x free...)
        out_perm = tuple(range(nfw, nfw + nfx)) + tuple(range(nfw))
    use = Use(i, 1 - pos, ("dense", fx + cx, (positions, d_in)), out_perm, positions)
    return "dense", mat, (d_in, d_out), use


def _conv_use(op, views, i, pos, chain):
    if pos != 1:
        return "enters `conv_general_dilated` as the input, not the kernel"
    if _is_view(views, op.ins[0]):
        return "enters `conv_general_dilated` with another parameter"
    if op.params["feature_group_count"] != 1 or op.params["batch_group_count"] != 1:
        return "enters a grouped `conv_general_dilated` (feature/batch groups)"
    dn = op.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    w_shape = tuple(op.in_avals[1].shape)
    o_dim, i_dim, spatial = rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])
    window = tuple(w_shape[d] for d in spatial)
    d_in = w_shape[i_dim] * math.prod(window)
    d_out = w_shape[o_dim]
    perm = (i_dim,) + spatial + (o_dim,)
    mat = chain + (
        Step("transpose", perm, w_shape, op.in_avals[1].dtype),
        Step("reshape", (d_in, d_out), tuple(w_shape[d] for d in perm), op.in_avals[1].dtype),
    )
    out_shape = tuple(op.out_avals[0].shape)
    out_perm = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
    positions = math.prod(out_shape) // d_out
    padding = op.params["padding"]
    padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    act = (
        "conv", window, tuple(op.params["window_strides"]), padding,
        tuple(op.params["lhs_dilation"]), tuple(op.params["rhs_dilation"]),
        (tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec)), out_perm, (positions, d_in),
    )
    return "conv", mat, (d_in, d_out), Use(i, 0, act, out_perm, positions)


def _embedding_use(op, views, i, pos, chain):
    if pos != 0:
        return "enters `gather` as indices"
    if _is_view(views, op.ins[1]):
        return "enters `gather` indexed by another parameter"
    dn = op.params["dimension_numbers"]
    w_shape = tuple(op.in_avals[0].shape)
    idx_shape = tuple(op.in_avals[1].shape)
    out_rank = len(op.out_avals[0].shape)
    ok = (
        tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(op.params["slice_sizes"]) == (1,) + w_shape[1:]
        and tuple(dn.offset_dims) == tuple(range(out_rank - len(w_shape) + 1, out_rank))
        and idx_shape[-1:] == (1,)
        and jnp.issubdtype(op.in_avals[1].dtype, jnp.integer)
    )
    if not ok:
        return "enters `gather` other than a row lookup `W[ids]`"
    vocab = w_shape[0]
    d_out = math.prod(w_shape[1:])
    positions = math.prod(idx_shape[:-1])
    mat = chain + (Step("reshape", (vocab, d_out), w_shape, op.in_avals[0].dtype),)
    out_perm = tuple(range(out_rank))
    mode = str(op.params.get("mode"))
    act = ("embedding", "fill" if "FILL" in mode.upper() else "clip", vocab, (positions,))
    return "embedding", mat, (vocab, d_out), Use(i, 1, act, out_perm, positions)


def _bias_target(program, producer, consumers, leaf_uses, op_to_leaf, layer_of, shape):
    """The weight leaf this leaf is a bias of, a reason why not (a string), or ``None``."""
    if not leaf_uses:
        return None
    target = None
    seen_ops = set()
    for i, pos, chain, _ in leaf_uses:
        if i < 0:
            return None
        op = program.ops[i]
        if op.name != "add" or len(op.ins) != 2:
            return None
        s = op.ins[1 - pos]
        prod = producer.get(s) if isinstance(s, int) else None
        if prod is None or prod not in op_to_leaf:
            return None
        w = op_to_leaf[prod]
        kind, _, (_, d_out), us = layer_of[w]
        if kind == "embedding":
            return "added to an embedding lookup (kept diagonal)"
        if target is not None and w != target:
            return None
        target = w
        if len(consumers.get(s, [])) != 1:
            return "added to a layer output that is also used elsewhere"
        use = next(u for u in us if u.op == prod)
        if math.prod(shape) != d_out or not _places_bias(chain, shape, program.ops[prod], use,
                                                         d_out):
            return "added to a layer output but not broadcast along its output features"
        seen_ops.add(prod)
    if target is None:
        return None
    if seen_ops != {u.op for u in layer_of[target][3]} or len(seen_ops) != len(leaf_uses):
        return "added to some but not all applications of a shared layer"
    return target


def _places_bias(chain, shape, layer_op, use, d_out) -> bool:
    """Whether the view chain puts bias entry ``k`` on output feature ``k`` of every row."""
    probe = np.arange(1, d_out + 1, dtype=np.float64).reshape(shape)
    placed = apply_chain(chain, probe, xp=np)
    out_shape = tuple(layer_op.out_avals[0].shape)
    try:
        placed = np.broadcast_to(placed, out_shape)
    except ValueError:
        return False
    rows = np.transpose(placed, use.out_perm).reshape(-1, d_out)
    return bool(np.all(rows == np.arange(1, d_out + 1)))


# --------------------------------------------------------------------------- runtime helpers


def use_rows(use: Use, x) -> jax.Array:
    """The activation operand of ``use`` (one example, batch of 1) as rows.

    Dense: ``(positions, d_in)``; conv: the patches ``(positions, d_in)``;
    embedding: the ids ``(positions,)`` of the rows the lookup reads: clamped to the table
    (``"clip"``), or, for a ``"fill"`` lookup, ``vocab`` for an id out of range (a negative
    one included: a scatter with ``mode="drop"`` drops it, where it would wrap ``-k`` to
    ``vocab - k``).
    """
    kind = use.act[0]
    if kind == "dense":
        _, perm, shape = use.act
        return jnp.reshape(jnp.transpose(x, perm), shape)
    if kind == "conv":
        _, window, strides, padding, lhs_dil, rhs_dil, dn, out_perm, shape = use.act
        patches = lax.conv_general_dilated_patches(
            x, window, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
            dimension_numbers=lax.ConvDimensionNumbers(*dn), precision=lax.Precision.HIGHEST,
        )
        return jnp.reshape(jnp.transpose(patches, out_perm), shape)
    _, mode, vocab, shape = use.act
    ids = jnp.reshape(x, shape)
    if mode == "fill":
        return jnp.where((ids < 0) | (ids >= vocab), vocab, ids)
    return jnp.clip(ids, 0, vocab - 1)


def out_rows(use: Use, d_out: int, y) -> jax.Array:
    """The output (or its gradient) of ``use`` as ``(positions, d_out)`` rows."""
    return jnp.reshape(jnp.transpose(y, use.out_perm), (use.positions, d_out))
