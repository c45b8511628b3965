"""Layer 2: curvature operators on pytrees (built on the base and, for inverses and
blocks, on [`curvlib.krylov`][curvlib.krylov]).

Every operator turns a loss (or a model and an output loss, or a model and a
likelihood) at a point into a *linear function on pytrees*: ``v -> C v`` with
``v`` shaped like the parameters. The returned matvecs are
`jax.tree_util.Partial` objects: their arrays (parameters, batch,
linearisation residuals) are pytree leaves, so passing a matvec into a
``jax.jit``-compiled function keeps those arrays traced inputs instead of
baking them into the program as constants.

| module | operator |
|---|---|
| `hessian` | [`hvp`][curvlib.hvp] |
| | [`hessian_matvec`][curvlib.hessian_matvec] |
| | [`gradient`][curvlib.gradient] |
| `gauss_newton` | [`ggn_matvec`][curvlib.ggn_matvec] |
| | [`fisher_matvec`][curvlib.fisher_matvec] |
| | [`empirical_fisher_matvec`][curvlib.empirical_fisher_matvec] |
| `jacobian` | [`jacobian_matvec`][curvlib.jacobian_matvec] |
| | [`jacobian_transpose_matvec`][curvlib.jacobian_transpose_matvec] |
| `blocks` | [`restrict`][curvlib.restrict] |
| | [`block_eigsh`][curvlib.block_eigsh] |
| `inverse` | [`inverse_matvec`][curvlib.inverse_matvec] |
| `streams` | [`stream_matvec`][curvlib.stream_matvec] |
| | [`stream_gradient`][curvlib.stream_gradient] |
| | [`stream_mean`][curvlib.stream_mean] |
| `microbatch` | [`microbatch_mean`][curvlib.microbatch_mean] |

(``streams``: data streamed from the host.)

Conventions shared by all of them:

* a loss is a *mean* over the examples of its batch, and every curvature is
  normalised to match (the Fisher and the empirical Fisher are means over
  examples, so they equal the GGN of the matching mean loss);
* ``has_aux=True`` accepts a function returning ``(value, aux)``;
* ``microbatch_size`` chunks every batched argument (``batch_argnums`` says
  which), with memory bounded by one chunk and the same result;
* bad input raises eagerly, naming the argument by its pytree path;
* parameters sharded on an ``Auto`` mesh give products sharded the same way.

Examples:
  >>> import jax.numpy as jnp
  >>> import curvlib
  >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)
  >>> H = curvlib.hessian_matvec(loss, jnp.zeros(2), jnp.eye(2))
  >>> H(jnp.ones(2)).tolist()
  [1.0, 1.0]
"""

from curvlib.operators.blocks import block_eigsh, restrict
from curvlib.operators.gauss_newton import empirical_fisher_matvec, fisher_matvec, ggn_matvec
from curvlib.operators.hessian import MODES, gradient, hessian_matvec, hvp  # noqa: F401
from curvlib.operators.inverse import InverseMatvec, InverseSolve, inverse_matvec
from curvlib.operators.jacobian import jacobian_matvec, jacobian_transpose_matvec
from curvlib.operators.microbatch import microbatch_mean
from curvlib.operators.streams import StreamMatvec, stream_gradient, stream_matvec, stream_mean

__all__ = [
    "hvp",
    "hessian_matvec",
    "gradient",
    "ggn_matvec",
    "fisher_matvec",
    "empirical_fisher_matvec",
    "jacobian_matvec",
    "jacobian_transpose_matvec",
    "microbatch_mean",
    "restrict",
    "block_eigsh",
    "inverse_matvec",
    "InverseMatvec",
    "InverseSolve",
    "stream_mean",
    "stream_matvec",
    "stream_gradient",
    "StreamMatvec",
]
