"""The model's Jacobian ``J = d model_fn(params, *args) / d params`` and its transpose as operators.

Both linearise the model once (``jax.linearize``) and replay only the tangent
pass (``J v``, forward mode) or its transpose (``J^T u``, reverse mode) per
product over the stored residuals. They are the building blocks of every
Gauss-Newton-type curvature (``J^T M J``) and of influence-style scores
(``J_l s`` for the Jacobian of per-example losses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.tree_util import Partial

from curvlib import _tree, _validate
from curvlib.operators import _common as C

PyTree = Any


def _jv(params, lin, v):
    return C.apply_linear(lin, C.cast_like(v, params))


def _jtu(params, outputs, lin, u):
    return C.transpose(lin, params, C.cast_like(u, outputs))


def _linearized_model(model_fn, params, args, has_aux):
    _validate.float_leaves(params, "params")
    _validate.functions(model_fn, "model_fn")
    if _validate.one_of(has_aux, "has_aux", (True, False)):
        _validate.output(jax.eval_shape(lambda p: model_fn(p, *args), params), "model_fn",
                         has_aux=True, scalar=False, what="outputs")
        model_fn = C.value_only(model_fn)
    outputs, lin = C.linearize(model_fn, params, args)
    _validate.float_leaves(outputs, "outputs of model_fn", advice=C.OUTPUT_ADVICE)
    return outputs, lin


def jacobian_matvec(model_fn: Callable, params: PyTree, *args, has_aux: bool = False) -> Partial:
    """The Jacobian-vector product ``v -> J v``, shaped like the outputs of ``model_fn``.

    ``J v = d/de model_fn(params + e v, *args) |_{e=0}`` (forward mode). The
    model is linearised once, when the operator is built; each product then
    costs one tangent pass (about one forward pass) and no extra memory
    beyond the stored residuals.

    Args:
      model_fn: ``model_fn(params, *args) -> outputs`` (any pytree of float
        arrays), or ``(outputs, aux)`` with ``has_aux``.
      params: the point; any pytree of float arrays.
      *args: inputs of ``model_fn``; not differentiated.
      has_aux: ``model_fn`` returns ``(outputs, aux)``; ``aux`` is ignored.

    Returns:
      ``matvec`` (a `jax.tree_util.Partial`) with ``matvec(v) = J v``
      for ``v`` shaped like ``params``.

    Raises:
      TypeError: for a non-real-floating leaf of ``params`` or of the outputs.
      ValueError: when called, for a ``v`` whose structure or shapes differ from ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import jacobian_matvec
      >>> model = lambda p, x: jnp.sin(x * p["a"])        # J = diag(x cos(x a))
      >>> Jv = jacobian_matvec(model, {"a": jnp.zeros(2)}, jnp.array([1.0, 2.0]))
      >>> Jv({"a": jnp.array([1.0, 1.0])}).tolist()
      [1.0, 2.0]
    """
    outputs, lin = _linearized_model(model_fn, params, args, has_aux)
    fn = C.checked(_jv, C.signature(params))
    return Partial(fn, params, lin)


def jacobian_transpose_matvec(
    model_fn: Callable, params: PyTree, *args, has_aux: bool = False
) -> Partial:
    """The vector-Jacobian product ``u -> J^T u``, shaped like ``params``.

    ``J^T u = grad_params <model_fn(params, *args), u>`` (reverse mode) for a
    cotangent ``u`` shaped like the outputs. The model is linearised once; each
    product is one transposed pass (about one backward pass). With parameters
    sharded on an ``Auto`` mesh the result is constrained to their layout.

    Args:
      model_fn: ``model_fn(params, *args) -> outputs``, or ``(outputs, aux)``
        with ``has_aux``.
      params: the point.
      *args: inputs of ``model_fn``.
      has_aux: ``model_fn`` returns ``(outputs, aux)``; ``aux`` is ignored.

    Returns:
      ``matvec`` (a `jax.tree_util.Partial`) with ``matvec(u) = J^T u``
      for ``u`` shaped like the outputs.

    Raises:
      TypeError: for a non-real-floating leaf of ``params`` or of the outputs.
      ValueError: when called, for a ``u`` whose structure or shapes differ
        from the outputs (named by path).

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import jacobian_transpose_matvec
      >>> model = lambda p, x: x @ p                       # J = x
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
      >>> JTu = jacobian_transpose_matvec(model, jnp.zeros(2), x)
      >>> JTu(jnp.array([1.0, 0.0, 1.0])).tolist()         # x^T u
      [6.0, 8.0]
    """
    outputs, lin = _linearized_model(model_fn, params, args, has_aux)
    product = C.sharded(_jtu, _tree.param_shardings(params))
    fn = C.checked(product, C.signature(outputs), "outputs of model_fn", "cotangent")
    return Partial(fn, params, outputs, lin)
