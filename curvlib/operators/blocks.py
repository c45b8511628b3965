"""Parameter blocks: an operator restricted to a subset of the parameters, and per-block spectra.

A *block* is a subset of the leaves of ``params`` (a layer, a weight matrix,
all biases). Its *sub-pytree* is ``params`` with every other leaf replaced by
``None`` (the convention of ``equinox.partition``: ``None`` is an empty
subtree, so ``jax.tree.leaves`` and every curvlib algorithm see only the
block's leaves).

* [`restrict`][curvlib.restrict] turns any operator ``C`` on ``params`` into the diagonal
  block ``C_BB = P_B C P_B^T`` acting on the block's sub-pytree;
* [`block_eigsh`][curvlib.block_eigsh] computes the top-``k`` eigenpairs of every block of a
  partition in one call, running blocks of equal shapes as one vmapped
  [`curvlib.eigsh`][curvlib.eigsh]; given ``block_matvec`` (e.g. ``hessian_matvec(...,
  wrt=where)``) instead of a black box, its products cost a block's, not the model's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial, keystr

from curvlib import _deprecation, _tree, _validate
from curvlib._compile import (
    compile_behind,
    eager_jit,
    is_host_driven,
    is_pytree_operator,
    traced_program,
    tracing,
    weak_cache,
)
from curvlib._space import on_one_device
from curvlib.krylov import Eigsh, EigshResult, eigsh
from curvlib.operators import _common as C

PyTree = Any


# ------------------------------------------------------------------ masks


leaf_mask = C.leaf_mask
_sub_tree = C.sub_tree


def _zeros(spec):
    shape, dtype, sharding = spec
    if sharding is not None:
        return jnp.zeros(shape, dtype, out_sharding=sharding)
    return jnp.zeros(shape, dtype)


def _leaf_spec(x):
    return tuple(jnp.shape(x)), jnp.result_type(x), _tree.explicit_sharding(x)


# --------------------------------------------------------------- restrict


@functools.cache
def _restricted(treedef, mask, specs, sub_sig):
    """``(matvec, sub_v) -> P_B matvec(P_B^T sub_v)`` for a fixed block (static description)."""

    def apply(matvec, sub_v):
        _validate.tangent(sub_v, sub_sig, "the block", "restricted vector", by_path=True)
        it = iter(jax.tree.leaves(sub_v))
        full = [next(it) if m else _zeros(s) for m, s in zip(mask, specs, strict=True)]
        out = jax.tree.leaves(matvec(jax.tree.unflatten(treedef, full)))
        picked = [o for o, m in zip(out, mask, strict=True) if m]
        return jax.tree.unflatten(jax.tree.structure(sub_v), picked)

    return apply


@weak_cache
def _closed(matvec, fn):
    """``fn`` with a plain (non-pytree) ``matvec`` bound statically, cached per ``matvec``."""

    def apply(sub_v):
        return fn(matvec, sub_v)

    return apply


class HostDrivenRestriction:
    """`restrict` of a host-driven operator: host-driven too (``host_driven = True``).

    ``op(v_B)`` makes one pass of the underlying operator; ``op.params`` is the
    block's sub-pytree (the shapes of ``v_B``).
    """

    host_driven = True

    def __init__(self, fn, matvec, sub):
        self._fn, self.matvec, self.params = fn, matvec, sub

    def __call__(self, v):
        return self._fn(self.matvec, v)

    def matmat(self, V):
        """``C_BB V`` for vectors stacked on a leading axis: one pass of the operator."""
        full = self.matvec.matmat(_embed_block(self.matvec.params, self.params, V))
        paths = {p for p, _ in _tree.leaves_with_paths(self.params)}
        picked = [x for p, x in _tree.leaves_with_paths(full) if p in paths]
        return jax.tree.unflatten(jax.tree.structure(V), picked)


def _embed_block(params, sub, V):
    """Stacked block vectors ``V`` placed in stacked zeros shaped like ``params``."""
    k = jnp.shape(jax.tree.leaves(V)[0])[0]
    it = iter(jax.tree.leaves(V))
    paths = {p for p, _ in _tree.leaves_with_paths(sub)}
    leaves = [next(it) if p in paths else jnp.zeros((k,) + jnp.shape(x), jnp.result_type(x))
              for p, x in _tree.leaves_with_paths(params)]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def restrict(matvec: Callable, params: PyTree, where) -> Partial:
    """The operator restricted to a parameter block: ``v_B -> C_BB v_B``.

    With ``P_B`` the selection of the leaves chosen by ``where``, the result is
    ``C_BB = P_B C P_B^T``, the diagonal block of ``C`` (a Hessian, GGN,
    Fisher, ... on ``params``) for those leaves. It acts on the block's
    *sub-pytree*: ``params`` with every unselected leaf replaced by ``None``,
    which every curvlib algorithm (``eigsh``, ``cg``, ``hutchinson_trace``, ...)
    accepts as a vector. ``None`` may stand for a whole unselected subtree
    (``{"encoder": None, "head": {...}}``): a vector is accepted when its leaves
    have the block's key paths and shapes, and the result has the vector's
    structure.

    Cost: one product of ``C`` per product of ``C_BB`` (the unselected part of
    the tangent is zero; the operator is a black box). Memory: no more than
    ``C``'s. When the loss is at hand, ``hessian_matvec(fun, params, *args,
    wrt=where)`` (likewise ``ggn_matvec``, ``fisher_matvec``) is the same
    operator at the block's cost: it differentiates with respect to the block only.

    Args:
      matvec: a linear operator on pytrees shaped like ``params``.
      params: the parameters (or any pytree shaped like them).
      where: a predicate ``where(path, leaf) -> bool`` on the key paths of
        ``params`` (as in ``jax.tree_util.tree_map_with_path``), or a pytree
        of Python bools with the structure of ``params`` or a prefix of it.

    Returns:
      A `jax.tree_util.Partial` ``matvec_B`` with
      ``matvec_B(v_B) = C_BB v_B`` on sub-pytrees (pass it into jitted code: its
      arrays stay traced inputs when ``matvec`` is itself a ``Partial``); for a
      host-driven ``matvec`` ([`curvlib.stream_matvec`][curvlib.stream_matvec]), a host-driven
      `HostDrivenRestriction`.

    Raises:
      ValueError: when ``where`` selects no leaf, is not a pytree of bools
        matching ``params``, or (when called) the vector does not match the
        sub-pytree.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib import hessian_matvec, restrict
      >>> loss = lambda p: p["a"] @ p["a"] + 3.0 * p["a"][0] * p["b"] + p["b"] ** 2
      >>> params = {"a": jnp.ones(2), "b": jnp.array(1.0)}
      >>> Hb = restrict(hessian_matvec(loss, params), params, {"a": False, "b": True})
      >>> out = Hb({"a": None, "b": jnp.array(1.0)})     # the (b, b) entry of H only
      >>> out["a"] is None, float(out["b"])
      (True, 2.0)
      >>> Ha = restrict(hessian_matvec(loss, params), params, lambda path, x: x.ndim == 1)
      >>> Ha({"a": jnp.array([1.0, 0.0]), "b": None})["a"].tolist()
      [2.0, 0.0]
    """
    leaves, treedef = jax.tree.flatten(params)
    mask = leaf_mask(params, where)
    if not any(mask):
        raise ValueError("`where` selects no leaf of `params`; the restricted operator is empty.")
    specs = tuple(_leaf_spec(x) for x in leaves)
    sub = _sub_tree(treedef, leaves, mask)
    fn = _restricted(treedef, mask, specs, C.signature(sub))
    if is_host_driven(matvec):
        return HostDrivenRestriction(fn, matvec, sub)
    if isinstance(matvec, Partial):
        return Partial(fn, matvec)
    if not callable(matvec):
        raise TypeError(f"`matvec` must be callable; got {type(matvec).__name__}.")
    program = _program_of(matvec, params)
    if program is not None:
        return Partial(fn, program)
    return Partial(_closed(matvec, fn))


def _program_of(matvec, params):
    """A plain ``matvec`` as the program it computes now (`traced_program`: its arrays are
    leaves), or ``None`` where it cannot be traced here (it is then kept as it is).

    Kept as a static function, an operator built again from the same function after a
    global it reads changed (a training loop's ``mv`` at this step's parameters) ran the
    first program: `restrict` and `block_eigsh` returned the first step's spectrum, each
    flagged converged.
    """
    try:
        return traced_program(matvec, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params))
    except Exception:  # noqa: BLE001  (a function only the host can run: as given)
        return None


# ------------------------------------------------------------ block spectra


def _labels(params: PyTree, blocks) -> list:
    """One label (hashable, or ``None`` for "in no block") per leaf of ``params``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    if blocks is None:  # one block per leaf, named by its path ("layer1/w")
        names = [keystr(path, simple=True, separator="/") for path, _ in flat]
        # ... unless two paths read alike ({"a/b": x, "a": {"b": y}}): then every leaf keeps
        # the full spelling of its path ("['a/b']", "['a']['b']"), which tells paths apart
        if len(set(names)) < len(names):
            return [keystr(path) for path, _ in flat]
        return names
    if callable(blocks):
        return [blocks(path, x) for path, x in flat]
    try:
        full = jax.tree.map(
            lambda lab, sub: jax.tree.map(lambda _: lab, sub), blocks, params,
            is_leaf=lambda x: x is None,
        )
    except (ValueError, TypeError):
        raise ValueError(
            "`blocks` must be None (one block per leaf), a function `blocks(path, leaf) -> "
            "label | None`, or a pytree of labels with the structure of `params` (or a prefix "
            f"of it); {C.prefix_mismatch(blocks, params, 'blocks', none_is_leaf=True)}got "
            f"structure {jax.tree.structure(blocks)} for params {jax.tree.structure(params)}."
        ) from None
    return jax.tree.leaves(full, is_leaf=lambda x: x is None)


def _group_product(matvec, treedef, specs, slots):
    """The product of group lane ``g``: its block's tangent in the full space, its block out.

    ``slots[b][j]`` is the index (among the leaves of ``params``) of leaf ``j``
    of block ``b``; every block of a group has the same leaf shapes.
    """
    G = len(slots)

    def product(vals, g):
        full = [None] * len(specs)
        if G == 1:  # a group of one block: no lane to select
            for j, s in enumerate(slots[0]):
                full[s] = vals[j].astype(specs[s][1])
            full = [x if x is not None else _zeros(sp) for x, sp in zip(full, specs, strict=True)]
            out = _product_leaves(matvec, jax.tree.unflatten(treedef, full))
            return tuple(out[s] for s in slots[0])
        for b in range(G):
            for j, s in enumerate(slots[b]):
                full[s] = jnp.where(g == b, vals[j], 0).astype(specs[s][1])
        full = [x if x is not None else _zeros(sp) for x, sp in zip(full, specs, strict=True)]
        out = _product_leaves(matvec, jax.tree.unflatten(treedef, full))
        return tuple(
            jnp.stack([out[slots[b][j]] for b in range(G)])[g] for j in range(len(slots[0]))
        )

    return product


def _product_leaves(matvec, v):
    """The leaves of ``matvec(v)``, checked (at its trace) to be shaped like ``v``'s: a
    product that drops or adds a leaf is named by its path (it indexed the wrong leaves)."""
    out = matvec(v)
    _validate.same_structure(v, out, "v", "matvec(v)", floating=True)
    return jax.tree.leaves(out)


_EIGSH_RENAMES = {"tol": "rtol", "num_matvecs": "basis_size"}
_deprecation.register_folded("curvlib.block_eigsh", "eigsh", Eigsh, _EIGSH_RENAMES)


def block_eigsh(
    matvec: Callable | None,
    params: PyTree,
    k: int,
    *,
    key: jax.Array,
    blocks=None,
    which: str = "LA",
    batch_size: int | None = None,
    eigsh: Eigsh | None = None,
    block_matvec: Callable | None = None,
    **eigsh_options,
) -> dict[str, EigshResult]:
    """Top-``k`` eigenpairs of every diagonal block ``C_BB`` of an operator, in one call.

    The parameters are partitioned into blocks (by default one per leaf; or
    by a labelling of the leaves, e.g. one block per layer) and
    [`curvlib.eigsh`][curvlib.eigsh] runs on every [`restrict`][curvlib.restrict]-ed operator
    ``C_BB``. Blocks whose leaves have equal shapes and dtypes (the layers of a
    transformer, all bias vectors of one width) run as *one* ``jax.vmap``-ped
    eigsh (or ``batch_size`` at a time): their products are evaluated
    together as a batch of tangents, and the program holds one product call
    site per distinct block shape. A block with no equal-shaped partner runs a
    plain (unbatched) eigsh.

    Two ways to give the operator:

    * ``matvec``, a black box on ``params``: every Lanczos step of a group of
      ``G`` blocks costs ``G`` products of ``C`` (one per block, batched; a block
      product is a full product with a zero tangent outside the block). The total
      is about ``sum_B (steps of B)`` products of ``C``: for ``L`` blocks needing
      as many steps as the full operator, ``L`` times one full-model eigsh.
    * ``block_matvec``, a function ``where -> C_UU`` that builds the operator on
      a block of leaves ``U`` directly, e.g. ``lambda where: hessian_matvec(loss,
      params, *batch, wrt=where)``. It is called once per block; each block's
      products differentiate with respect to that block only, so a product costs
      the tangent and reverse passes from the block's first leaf on, not a full
      product. Measured on the benchmark transformer (one product over one full
      Hessian product): embeddings 0.44, first layer 0.59, last layer 0.40,
      head 0.07; its per-layer top-5 spectra cost 1.32 full-model eigsh. The
      blocks are different programs, so they are not vmapped together: the
      program holds one product and one plain eigsh per block (``batch_size``
      does not apply), and compiles longer than the black box's one per
      distinct block shape.

    A vmapped group runs until its slowest block has converged; a batch of
    tangents costs less than as many single products on accelerators and small
    models. Memory: ``G`` Krylov bases of each block's size.

    An eager call (outside ``jax.jit``, with [`curvlib.compile_behind`][curvlib.compile_behind]
    on, the default, parameters on one device) solves the blocks one at a time from the
    same start vectors, each [`curvlib.eigsh`][curvlib.eigsh] answering now while its own
    program compiles behind: the same pairs to rounding, and a new ``k`` or ``which`` compiles
    no block program (the batched program of every block compiled again: seconds).

    Args:
      matvec: a symmetric linear operator on pytrees shaped like ``params``, or
        ``None`` with ``block_matvec``.
      params: the parameters (or any pytree shaped like them).
      k: eigenpairs per block (static inside ``jax.jit``); every block needs more than
        ``k`` entries.
      key: PRNG key for the random start vectors (one per block).
      blocks: ``None`` (one block per leaf), a function ``blocks(path, leaf) ->
        label`` (``None`` leaves the leaf out of every block), or a pytree of
        labels with the structure of ``params`` or a prefix of it. Labels must
        be strings or other values whose ``str`` names the block, not bools (a mask:
        label its selected leaves with a name and the rest ``None``).
      which: ``"LA"``, ``"SA"`` or ``"LM"``, as in [`curvlib.eigsh`][curvlib.eigsh].
      batch_size: how many equal-shaped blocks one vmapped eigsh solves together
        (as in ``jax.lax.map``): ``None`` (default) all of a group, ``1`` one
        after another (``lax.map``; still one compiled eigsh per shape). On CPU
        ``1`` is faster today: a vmapped eigsh's batched loop control costs
        about three times a sequential one per block on cheap operators, and
        batching the products gains little there (a 4-layer transformer's
        per-layer spectra: 0.42 s sequential vs 0.70 s vmapped); batching pays
        where a batch of tangents costs less than as many products
        (accelerators, small models).
      eigsh: the eigensolver's options, a [`curvlib.Eigsh`][curvlib.Eigsh] (default
        ``Eigsh()``, the defaults of [`curvlib.eigsh`][curvlib.eigsh]), the same for every block.
      block_matvec: instead of ``matvec``, a function ``block_matvec(where) ->
        matvec_U`` returning the symmetric operator ``C_UU`` on the sub-pytree of
        the leaves ``where`` selects (``where`` is a pytree of bools with the
        structure of ``params``), such as ``lambda where: hessian_matvec(loss,
        params, x, y, wrt=where)`` (or ``ggn_matvec``/``fisher_matvec`` with
        ``wrt=where``). Called once per block, eagerly or under the caller's
        trace; return a `jax.tree_util.Partial` (every curvlib
        constructor does) so its arrays stay traced inputs of the compiled
        entry point.
      **eigsh_options: deprecated: the fields of [`curvlib.Eigsh`][curvlib.Eigsh] this
        function took as keywords before ``eigsh=`` (and ``tol``) still work, with a
        warning; ``verify``, added with the solver value, is set there only
        (``eigsh=curvlib.Eigsh(verify=False)``).

    Returns:
      ``{block name: EigshResult}`` in the order the blocks first appear among
      the leaves. A block's eigenvectors are sub-pytrees (``params`` with
      ``None`` outside the block) whose leaves carry a leading axis ``k``.
      Block names are ``str(label)``; the default labels are the leaves' key
      paths joined by ``"/"`` (``"layer1/w"``), or, when two leaves' joined paths
      coincide (``{"a/b": x, "a": {"b": y}}``), every leaf's full key path
      (``"['a/b']"``, ``"['a']['b']"``): one block per leaf either way. Each block's
      ``status``, ``converged`` and counts are its own.

    Raises:
      ValueError: for a block with ``k`` or fewer entries, no block at all,
        a bad ``blocks``/``k`` (bool labels: a mask), or both ``matvec`` and
        ``block_matvec``.
      TypeError: for a ``matvec``/``block_matvec`` that is not callable, neither
        of them, or a host-driven operator from ``block_matvec``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib import block_eigsh
      >>> A = {"u": jnp.diag(jnp.arange(1.0, 7.0)), "w": jnp.diag(jnp.arange(10.0, 16.0))}
      >>> matvec = lambda v: {"u": A["u"] @ v["u"] + v["w"], "w": A["w"] @ v["w"] + v["u"]}
      >>> params = {"u": jnp.zeros(6), "w": jnp.zeros(6)}
      >>> spectra = block_eigsh(matvec, params, 2, key=jax.random.key(0))
      >>> {name: r.eigenvalues.round(4).tolist() for name, r in spectra.items()}
      {'u': [6.0, 5.0], 'w': [15.0, 14.0]}

      From the loss, each block's products differentiating that block only:

      >>> from curvlib import hessian_matvec
      >>> loss = lambda p: 0.5 * (p["u"] @ A["u"] @ p["u"] + p["w"] @ A["w"] @ p["w"])
      >>> spectra = block_eigsh(None, params, 2, key=jax.random.key(0),
      ...                       block_matvec=lambda where: hessian_matvec(loss, params,
      ...                                                                 wrt=where))
      >>> {name: r.eigenvalues.round(4).tolist() for name, r in spectra.items()}
      {'u': [6.0, 5.0], 'w': [15.0, 14.0]}
    """
    k = _validate.static_int(k, "k", minimum=1)
    if batch_size is not None:
        batch_size = _validate.static_int(batch_size, "batch_size", minimum=1)
    _validate.float_leaves(params, "params")
    _validate.prng_key(key)
    labels = tuple(_labels(params, blocks))
    flags = sorted({str(lab) for lab in labels if isinstance(lab, (bool, np.bool_))})
    if flags:  # a mask (restrict's `where`) made a block "False" of the leaves it left out
        raise ValueError(
            f"`blocks` must label the leaves with block names, or None for no block; got the "
            f"bool label(s) {flags}, as from a mask. To solve the leaves a mask selects as "
            "one block, pass `blocks=jax.tree.map(lambda m: 'name' if m else None, mask)`."
        )
    order = _block_order(labels)
    if not order:
        raise ValueError("`blocks` puts no leaf of `params` in any block.")
    names = {lab: str(lab) for lab in order}
    if len(set(names.values())) != len(names):
        raise ValueError(f"block labels must have distinct names; got {list(names.values())}.")
    for lab, idx in order.items():
        dim = int(sum(np.prod(jnp.shape(jax.tree.leaves(params)[i]), dtype=np.int64)
                      for i in idx))
        if dim <= k:
            raise ValueError(
                f"`k` must be in [1, {dim - 1}] (smaller than the {dim} entries of block "
                f"{names[lab]!r}); got {k}. Lower `k`, or merge the block with another (`blocks=`)."
            )
    if eigsh is not None and not isinstance(eigsh, Eigsh):
        raise TypeError(f"`eigsh` must be a curvlib.Eigsh; got {type(eigsh).__name__}.")
    eigsh, rest = _deprecation.fold_options("curvlib.block_eigsh", "eigsh", Eigsh, eigsh,
                                            eigsh_options, _EIGSH_RENAMES)
    if rest:
        raise TypeError(
            f"block_eigsh() got unexpected keyword argument(s) {sorted(rest)}: eigsh's options "
            "are fields of `eigsh=curvlib.Eigsh(...)` (`verify` included; `solver` is that "
            "argument's name in curvlib.eigsh).")
    per_block = block_matvec is not None
    if per_block:
        if matvec is not None:
            raise ValueError("pass either `matvec` or `block_matvec`, not both.")
        matvec = _group_operators(block_matvec, params, labels)
    elif matvec is None:
        raise TypeError("block_eigsh() needs an operator: `matvec` or `block_matvec`.")
    elif is_host_driven(matvec):
        return _block_eigsh_host(matvec, params, k, key, labels, order, names, which,
                                 {"solver": eigsh})
    else:
        plain = callable(matvec) and not is_pytree_operator(matvec)
        program = _program_of(matvec, params) if plain else None
        matvec = program if program is not None else _as_partial(matvec, "matvec")
    options = (("solver", eigsh),)
    if not _hashable(options):  # traced or array-valued options: no compiled entry point
        out = _block_eigsh(matvec, params, key, labels, k, which, options, batch_size,
                           per_block)
    elif compile_behind() and not tracing(matvec, params, key) and on_one_device(params):
        # eagerly: one eigsh per block, each answering now (its steps keyed on the size
        # class, shared by every k and which) while its own program compiles behind; the
        # vmapped program of every block compiled for each new k or which (seconds).
        # (Parameters over several devices keep the program: it keeps their layout.)
        out = _block_eigsh(matvec, params, key, labels, k, which, options, batch_size,
                           per_block, one_by_one=True)
    else:
        out = _block_eigsh_jit(matvec, params, key, labels, k, which, options, batch_size,
                               per_block)
    return {names[lab]: out[i] for i, lab in enumerate(order)}


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _as_partial(matvec, name: str) -> Partial:
    if not callable(matvec):  # (a pytree such as a KfacCurvature too: its `.matvec` is)
        raise TypeError(f"`{name}` must be callable; got {type(matvec).__name__}.")
    if is_pytree_operator(matvec):  # (its arrays stay arguments, as for a Partial)
        return matvec
    return Partial(matvec)  # static: the jit cache keys on the function (`_program_of` first)


def _group_operators(block_matvec, params, labels) -> tuple:
    """``block_matvec(where)`` for every block (a program per block, each at its cost)."""
    if not callable(block_matvec):
        raise TypeError(
            f"`block_matvec` must be a function `where -> operator`; got "
            f"{type(block_matvec).__name__}."
        )
    leaves, treedef = jax.tree.flatten(params)
    order, groups = _groups(params, labels, one_per_block=True)
    ops = []
    for labs in groups:
        where = jax.tree.unflatten(treedef, list(_union_mask(order, labs, len(leaves))))
        op = block_matvec(where)
        if is_host_driven(op):
            raise TypeError(
                "`block_matvec` returned a host-driven operator; pass it as `matvec` instead "
                "(restricted as a black box)."
            )
        ops.append(_as_partial(op, "block_matvec(where)"))
    return tuple(ops)


def _block_eigsh_host(matvec, params, k, key, labels, order, names, which, options):
    """Host-driven operators: one `curvlib.eigsh` per block, driven from the host."""
    leaves, treedef = jax.tree.flatten(params)
    out = {}
    for n, (lab, idx) in enumerate(order.items()):
        mask = tuple(i in idx for i in range(len(leaves)))
        where = jax.tree.unflatten(treedef, list(mask))
        sub = _sub_tree(treedef, leaves, mask)
        v0 = _tree.normal_like(jax.random.fold_in(key, n), sub)
        out[names[lab]] = eigsh(restrict(matvec, params, where), v0, k, which=which, **options)
    return out


def _block_order(labels) -> dict:
    """``{label: [leaf indices]}`` in order of first appearance (``None``: in no block)."""
    order: dict = {}
    for i, lab in enumerate(labels):
        if lab is not None:
            order.setdefault(lab, []).append(i)
    return order


def _groups(params, labels, one_per_block=False) -> tuple[dict, list[list]]:
    """``(order, groups)``: the blocks, and their labels grouped by equal leaf shapes/dtypes
    (or, with ``one_per_block``, every block a group of its own)."""
    order = _block_order(labels)
    if one_per_block:
        return order, [[lab] for lab in order]
    leaves = jax.tree.leaves(params)
    groups: dict = {}
    for lab, idx in order.items():
        sig = tuple((tuple(jnp.shape(leaves[i])), jnp.result_type(leaves[i])) for i in idx)
        groups.setdefault(sig, []).append(lab)
    return order, list(groups.values())


def _union_mask(order, labs, num_leaves) -> tuple[bool, ...]:
    """The leaves of any block of a group."""
    chosen = {i for lab in labs for i in order[lab]}
    return tuple(i in chosen for i in range(num_leaves))


def _block_eigsh(matvec, params, key, labels, k, which, options, batch_size, per_block=False,
                 one_by_one=False):
    """The computation of `block_eigsh`: a tuple of results in block order.

    With ``per_block``, ``matvec`` is a tuple of operators, one per block, each
    acting on its block's sub-pytree (every block a group of its own); otherwise
    one operator on the whole of ``params``. With ``one_by_one`` (eager calls), the
    blocks of a group are solved one at a time, from the same start vectors.
    """
    leaves, treedef = jax.tree.flatten(params)
    specs = tuple(_leaf_spec(x) for x in leaves)
    order, groups = _groups(params, labels, per_block)
    results = {}
    for gi, labs in enumerate(groups):
        slots = tuple(tuple(order[lab]) for lab in labs)
        if per_block:  # the group's operator lives on the union of its blocks (here: one)
            umask = _union_mask(order, labs, len(leaves))
            union = [i for i, m in enumerate(umask) if m]
            pos = {i: n for n, i in enumerate(union)}
            product = _group_product(
                matvec[gi], jax.tree.structure(C.sub_tree(treedef, leaves, umask)),
                tuple(specs[i] for i in union), tuple(tuple(pos[i] for i in s) for s in slots))
        else:
            product = _group_product(matvec, treedef, specs, slots)
        firsts = [list(order).index(lab) for lab in labs]
        v0 = jax.vmap(
            lambda n, idx=slots[0]: _tree.normal_like(
                jax.random.fold_in(key, n), tuple(leaves[i] for i in idx)
            )
        )(jnp.asarray(firsts))

        def solve(v, g, product=product):
            return eigsh(lambda t: product(t, g), v, k, which=which, **dict(options))

        if one_by_one:  # (the block's index as data: one program for the group's blocks)
            for b, lab in enumerate(labs):
                res = solve(jax.tree.map(lambda x, b=b: x[b], v0), jnp.asarray(b, jnp.int32))
                results[lab] = _placed(res, res.eigenvectors, slots[b], treedef, len(leaves))
            continue
        if len(labs) == 1:  # one block: its eigsh unbatched (a vmapped loop selects its state)
            res = jax.tree.map(lambda x: x[None], solve(jax.tree.map(lambda x: x[0], v0), 0))
        elif batch_size is None or batch_size >= len(labs):
            res = jax.vmap(solve)(v0, jnp.arange(len(labs)))
        else:
            res = jax.lax.map(lambda a: solve(*a), (v0, jnp.arange(len(labs))),
                              batch_size=None if batch_size == 1 else batch_size)
        for b, lab in enumerate(labs):
            # every field of the group's result has the block axis first: block b's entry
            one = jax.tree.map(lambda x, b=b: x[b], res._replace(eigenvectors=()))
            results[lab] = _placed(one, [e[b] for e in res.eigenvectors], slots[b], treedef,
                                   len(leaves))
    return tuple(results[lab] for lab in order)


def _placed(res: EigshResult, vectors, slots, treedef, num_leaves: int) -> EigshResult:
    """``res`` with the block's eigenvectors (``vectors[j]`` of leaf ``slots[j]``) in a
    pytree shaped like ``params`` (``None`` at the other leaves)."""
    vecs = [None] * num_leaves
    for j, s in enumerate(slots):
        vecs[s] = vectors[j]
    return res._replace(eigenvectors=jax.tree.unflatten(treedef, vecs))


# compiled at the boundary: a second eager call with equal static configuration (block
# labels, k, which, options) and equally shaped operands reuses the compiled program
_block_eigsh_jit = eager_jit(_block_eigsh, static_argnums=(3, 4, 5, 6, 7, 8))
