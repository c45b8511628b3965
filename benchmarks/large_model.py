"""Scale case: top-10 Hessian eigenpairs of a >=10M-parameter transformer on a small CPU host.

``python -m benchmarks.large_model [--d 384 --layers 6 --batch 4 --seq-len 64]``
writes ``benchmarks/results/large_model.json``.

The model is the pre-LayerNorm decoder-only transformer of ``_models.py`` widened
to ``d = 384`` and 6 layers (about 10.8M float32 parameters), on a char-level
batch of ``4 x 64`` tokens, at initialisation. We run :func:`curvlib.eigsh`
(``which="LA"``, ``k = 10``) on :func:`curvlib.hessian_matvec` (default
``linearize`` mode), jitted as one call with the matvec passed as an argument.

Recorded: wall time of the whole solve (compile included, since a one-off
spectrum computation pays it) and of a second, compiled call; products used and
restarts; the residual norms; the peak resident set size of the process
(``getrusage``) and the resident size before the solve, next to the analytic
sizes of the parameters and of the Krylov basis (``num_matvecs + 2`` vectors).
With ``--basis-dtype bfloat16`` the basis is stored in bfloat16 (inner products
and the tridiagonal still accumulate in float32), which halves its memory.
"""

from __future__ import annotations

import argparse
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np

import curvlib

from . import _common as C
from . import _models as M


def build(d: int, layers: int, heads: int, seq_len: int, batch: int, vocab: int, seed: int):
    params = M.transformer_init(
        jax.random.PRNGKey(seed), vocab=vocab, d=d, layers=layers, heads=heads, seq_len=seq_len
    )
    x, y = M.text_batch(batch, seq_len, seed=seed)
    apply = lambda p, x: M.transformer_apply(p, x, heads=heads)
    loss = lambda p, x, y: M.cross_entropy(apply(p, x), y)
    return params, (jnp.asarray(x), jnp.asarray(y)), loss


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--num-matvecs", type=int, default=30)
    ap.add_argument("--max-restarts", type=int, default=40)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--basis-dtype", default=None, choices=[None, "bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", default="large_model")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    params, (x, y), loss = build(
        args.d, args.layers, args.heads, args.seq_len, args.batch, args.vocab, args.seed
    )
    n = M.num_params(params)
    C.log(f"transformer: {n / 1e6:.2f}M parameters, batch {args.batch} x {args.seq_len} tokens")
    v0 = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape, p.dtype),
        params,
        dict(zip(params, jax.random.split(jax.random.PRNGKey(args.seed + 1), len(params)),
                 strict=True)),
    )
    jax.block_until_ready(v0)
    setup_s = time.perf_counter() - t0
    rss_before = C.current_rss_mb()

    opts = dict(basis_size=args.num_matvecs, max_restarts=args.max_restarts, rtol=args.tol)
    if args.basis_dtype is not None:
        if "basis_dtype" not in inspect.signature(curvlib.eigsh).parameters:
            raise SystemExit("this curvlib's eigsh has no `basis_dtype` option")
        opts["basis_dtype"] = jnp.dtype(args.basis_dtype)

    @jax.jit
    def solve(matvec, v0):
        return curvlib.eigsh(matvec, v0, args.k, which="LA", **opts)

    t1 = time.perf_counter()
    matvec = curvlib.hessian_matvec(loss, params, x, y)
    res = jax.block_until_ready(solve(matvec, v0))
    first_s = time.perf_counter() - t1
    C.log(f"eigsh first call (linearize + compile + solve): {first_s:.1f} s, "
          f"{int(res.num_matvecs)} products, converged={bool(res.converged)}")
    t2 = time.perf_counter()
    res2 = jax.block_until_ready(solve(matvec, v0))
    second_s = time.perf_counter() - t2
    C.log(f"eigsh second call (compiled): {second_s:.1f} s")

    t3 = time.perf_counter()
    jax.block_until_ready(matvec(v0))
    product_s = time.perf_counter() - t3

    itemsize = 4
    bdt = jnp.dtype(args.basis_dtype or "float32")
    payload = {
        "config": {**vars(args), "num_params": n, "device": str(jax.devices()[0]),
                   "hvp_mode": "linearize"},
        "eigenvalues": np.asarray(res.eigenvalues).tolist(),
        "residual_norms": np.asarray(res.residual_norms).tolist(),
        "converged": bool(res.converged),
        "finite": bool(res.finite),
        "num_matvecs": int(res.num_matvecs),
        "num_restarts": int(res.num_restarts),
        "deterministic_rerun": bool(
            np.array_equal(np.asarray(res.eigenvalues), np.asarray(res2.eigenvalues))
        ),
        "time_s": {
            "setup": setup_s,
            "eigsh_first_call": first_s,
            "eigsh_compiled_call": second_s,
            "one_product_eager": product_s,
        },
        "memory_mb": {
            "peak_rss": C.peak_rss_mb(),
            "rss_before_solve": rss_before,
            "params": n * itemsize / 2**20,
            "krylov_basis": (args.num_matvecs + 2) * n * bdt.itemsize / 2**20,
        },
        "title": f"Scale: top-{args.k} Hessian eigenpairs, {n / 1e6:.1f}M-parameter transformer"
                 + (f" (basis {args.basis_dtype}, tol {args.tol})" if args.basis_dtype else ""),
    }
    payload["summary_md"] = C.md_table(
        ["parameters", "basis dtype", "products", "restarts", "converged", "first call",
         "compiled call", "peak RSS", "Krylov basis"],
        [[f"{n / 1e6:.2f}M", str(bdt), payload["num_matvecs"], payload["num_restarts"],
          payload["converged"], f"{first_s:.1f} s", f"{second_s:.1f} s",
          f"{payload['memory_mb']['peak_rss']:.0f} MiB",
          f"{payload['memory_mb']['krylov_basis']:.0f} MiB"]],
    )
    path = C.write_result(args.case, payload)
    C.log(f"peak RSS {payload['memory_mb']['peak_rss']:.0f} MiB; wrote {path}")
    return payload


def run(quick: bool = False) -> dict:
    """Entry point of ``benchmarks.run --only large_model`` (quick: a ~2M-parameter model)."""
    return main(["--d", "192", "--layers", "4"] if quick else [])


if __name__ == "__main__":
    main()
