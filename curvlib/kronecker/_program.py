"""A model function as a flat list of primitive applications, re-evaluated with hooks.

`trace` turns ``fn(*args)`` into a `Program`: the equations of its
jaxpr with every call-like sub-jaxpr (``jit``/``pjit``, ``closed_call``,
``core_call``, ``checkpoint``/``remat``) inlined, so that a ``dot_general``
inside ``jnp.einsum`` or a ``flax`` module's jitted helper sits at top level.
Values are numbered; each `Op` reads and writes numbers. Everything
else (``scan``, ``while``, ``cond``, ``custom_jvp_call``, ``custom_vjp_call``,
...) stays one opaque op, evaluated by binding its primitive as JAX's own
``eval_jaxpr`` does.

`evaluate` replays a program on new inputs (tracers welcome: it runs
under ``vmap``, ``jvp``, ``vjp`` and ``jit``), optionally *recording* an input
operand of chosen ops and *adding a probe* to their output: the two hooks
K-FAC needs (the layer inputs ``a`` and, by differentiating with respect to the
probes, the output gradients ``g``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

try:  # the public home of the jaxpr classes
    from jax.extend.core import ClosedJaxpr, Literal
except ImportError:  # pragma: no cover - older JAX
    from jax.core import ClosedJaxpr, Literal

# call-like primitives whose body is inlined: name -> the parameter holding the body
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
}


class Lit(NamedTuple):
    """A literal operand (a constant folded into the equation)."""

    val: Any


class Op(NamedTuple):
    """One primitive application: ``outs = primitive.bind(*ins, **params)``.

    ``ins`` holds value numbers (``int``) or `Lit`; ``in_avals`` and
    ``out_avals`` are the abstract values seen at trace time.
    """

    primitive: Any
    params: dict
    ins: tuple
    outs: tuple
    in_avals: tuple
    out_avals: tuple
    ctx: Any

    @property
    def name(self) -> str:
        return self.primitive.name


class Program(NamedTuple):
    """A flat program: inputs, constants, ops and outputs as value numbers."""

    inputs: tuple
    consts: dict
    ops: tuple
    outputs: tuple
    out_tree: Any

    def consumers(self) -> dict:
        """``value -> [(op index, operand position), ...]`` (program outputs as index -1)."""
        uses: dict = {}
        for i, op in enumerate(self.ops):
            for pos, a in enumerate(op.ins):
                if isinstance(a, int):
                    uses.setdefault(a, []).append((i, pos))
        for pos, a in enumerate(self.outputs):
            if isinstance(a, int):
                uses.setdefault(a, []).append((-1, pos))
        return uses


def trace(fn: Callable, *args) -> Program:
    """The flat `Program` of ``fn(*args)`` (``args``: arrays or ``ShapeDtypeStruct``).

    Inputs are numbered in ``jax.tree.leaves(args)`` order.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    counter = iter(range(1 << 62))
    consts: dict = {}
    ops: list = []
    inputs = tuple(next(counter) for _ in closed.jaxpr.invars)
    outs = _inline(closed.jaxpr, list(closed.consts), list(inputs), counter, consts, ops)
    return Program(inputs, consts, tuple(ops), tuple(outs), jax.tree.structure(out_shape))


def _inline(jaxpr, const_vals, in_atoms, counter, consts, ops) -> list:
    env: dict = {}

    def read(v):
        if isinstance(v, Literal):
            return Lit(v.val)
        return env[v]

    for v, c in zip(jaxpr.constvars, const_vals, strict=True):
        n = next(counter)
        consts[n] = c
        env[v] = n
    for v, a in zip(jaxpr.invars, in_atoms, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        body = _CALLS.get(eqn.primitive.name)
        sub = eqn.params.get(body) if body else None
        if sub is not None:
            if isinstance(sub, ClosedJaxpr):
                inner, inner_consts = sub.jaxpr, list(sub.consts)
            else:
                inner, inner_consts = sub, []
            outs = _inline(inner, inner_consts, ins, counter, consts, ops)
            for v, a in zip(eqn.outvars, outs, strict=True):
                env[v] = a
            continue
        out_ids = tuple(next(counter) for _ in eqn.outvars)
        for v, n in zip(eqn.outvars, out_ids, strict=True):
            env[v] = n
        ops.append(
            Op(
                primitive=eqn.primitive,
                params=dict(eqn.params),
                ins=tuple(ins),
                outs=out_ids,
                in_avals=tuple(v.aval for v in eqn.invars),
                out_avals=tuple(v.aval for v in eqn.outvars),
                ctx=getattr(eqn, "ctx", None),
            )
        )
    return [read(v) for v in jaxpr.outvars]


def bind(op: Op, invals: Sequence) -> list:
    """Apply ``op`` to ``invals`` as ``jax.core.eval_jaxpr`` would; returns a list of outputs."""
    bp = op.primitive.get_bind_params(op.params)
    if isinstance(bp, tuple):  # older JAX: (subfuns, params)
        subfuns, bp = bp
        invals = [*subfuns, *invals]
    manager = getattr(op.ctx, "manager", None)
    if manager is not None:
        with manager:
            out = op.primitive.bind(*invals, **bp)
    else:  # pragma: no cover - older JAX
        out = op.primitive.bind(*invals, **bp)
    return list(out) if op.primitive.multiple_results else [out]


def evaluate(
    program: Program,
    inputs: Sequence,
    *,
    consts: Sequence | None = None,
    record: Mapping[int, int] | None = None,
    probes: Mapping[int, Any] | None = None,
):
    """Run ``program`` on ``inputs``.

    Args:
      program: from `trace`.
      inputs: one value per program input.
      consts: values replacing ``program.consts`` (in its order), e.g. traced copies.
      record: ``{op index: operand position}``: that operand's value is returned.
      probes: ``{op index: array}``: added to that op's (first) output.

    Returns:
      ``(outputs, recorded)``: the flat outputs and ``{op index: value}``.
    """
    record = record or {}
    probes = probes or {}
    env = dict(program.consts)
    if consts is not None:
        env.update(zip(program.consts, consts, strict=True))
    env.update(zip(program.inputs, inputs, strict=True))
    recorded = {}

    def read(a):
        return a.val if isinstance(a, Lit) else env[a]

    for i, op in enumerate(program.ops):
        invals = [read(a) for a in op.ins]
        if i in record:
            recorded[i] = invals[record[i]]
        outvals = bind(op, invals)
        if i in probes:
            outvals[0] = outvals[0] + probes[i].astype(outvals[0].dtype)
        env.update(zip(op.outs, outvals, strict=True))
    return [read(a) for a in program.outputs], recorded
