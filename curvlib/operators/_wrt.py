"""Operators on a parameter block at block cost: the ``wrt=`` keyword of the constructors.

``hessian_matvec(fun, params, *args, wrt=where)`` (and ``ggn_matvec``,
``fisher_matvec``) differentiate only with respect to the block's leaves
``p_B``: the loss becomes ``f_B(p_B, p_rest, *args) = f(merge(p_B, p_rest), *args)``
with the other leaves ``p_rest`` passed as one more *non-differentiated*
argument, and the base constructor builds its operator on ``p_B``. The tangent
pass then starts at the block and the reverse pass stops at it; a linearisation
keeps only the residuals that depend on the block. Nothing here is public.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.tree_util import Partial

from curvlib import _validate
from curvlib._compile import weak_cache
from curvlib.operators import _common as C

PyTree = Any


class Block(NamedTuple):
    """A block of ``params``: the structure, the selection and both halves (``None`` holes)."""

    treedef: Any
    mask: tuple[bool, ...]
    sub: PyTree  # the block's sub-pytree: params with the unselected leaves None
    rest: PyTree  # the complement: params with the selected leaves None


def split(params: PyTree, where, name: str = "wrt") -> Block:
    """``params`` split by ``where`` (a predicate on key paths or a pytree of bools)."""
    leaves, treedef = jax.tree.flatten(params)
    mask = C.leaf_mask(params, where, name)
    if not any(mask):
        raise ValueError(
            f"`{name}` selects no leaf of `params`; the block operator would be empty."
        )
    return Block(treedef, mask, C.sub_tree(treedef, leaves, mask),
                 C.sub_tree(treedef, leaves, tuple(not m for m in mask)))


def merge(treedef, mask, sub: PyTree, rest: PyTree) -> PyTree:
    """The full pytree from a block and its complement (inverse of `split`)."""
    a, b = iter(jax.tree.leaves(sub)), iter(jax.tree.leaves(rest))
    return jax.tree.unflatten(treedef, [next(a) if m else next(b) for m in mask])


@weak_cache
def on_block(fun: Callable, treedef, mask) -> Callable:
    """``(sub, rest, *args) -> fun(merge(sub, rest), *args)``, cached per ``fun`` and block."""

    def f(sub, rest, *args):
        return fun(merge(treedef, mask, sub, rest), *args)

    return f


@functools.cache
def _by_path(sig):
    """``(op, v_B) -> op(v_B)`` accepting ``v_B`` by key path (``None`` holes at any level)."""
    treedef = sig[0]

    def apply(op, v):
        _validate.tangent(v, sig, "the block", "block vector", by_path=True)
        out = op(jax.tree.unflatten(treedef, jax.tree.leaves(v)))
        return jax.tree.unflatten(jax.tree.structure(v), jax.tree.leaves(out))

    return apply


def block_operator(build: Callable, fun: Callable, params: PyTree, args: tuple, wrt, *,
                   microbatch_size, batch_argnums, **options) -> Partial:
    """``build(fun, params, *args, ...)`` on the block ``wrt`` of ``params`` only.

    ``build`` is the base constructor (``hessian_matvec``, ...); the complement
    travels as its first extra argument, never batched, so ``batch_argnums``
    (counted among ``args``) is shifted by one.
    """
    blk = split(params, wrt)
    # checked here, with the loss arguments, so a message counts ``args`` as the user does
    _, nums, _ = _validate.microbatch(microbatch_size, args, batch_argnums,
                                      extra=tuple(options.get("loss_args", ())))
    nums = None if nums is None else tuple(i + 1 for i in nums)
    op = build(on_block(fun, blk.treedef, blk.mask), blk.sub, blk.rest, *args,
               microbatch_size=microbatch_size, batch_argnums=nums, **options)
    return Partial(_by_path(C.signature(blk.sub)), op)
