"""Readable reports of K-FAC's layer discovery (text only; no algorithm imports this module)."""

from __future__ import annotations

import math

from curvlib.kronecker.discovery import KfacLayers


def format_layers(found: KfacLayers) -> str:
    """A table of the Kronecker-factored layers and of the diagonal fallbacks with reasons.

    Args:
      found: from [`curvlib.kronecker.find_layers`][curvlib.kronecker.find_layers] (or
        ``KfacCurvature.layers``).

    Returns:
      A multi-line string.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.kronecker import find_layers, format_layers
      >>> model = lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) * p["gain"]
      >>> p = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "gain": jnp.ones(4)}
      >>> print(format_layers(find_layers(model, p, jnp.ones((2, 3)))))
      K-FAC: 1 Kronecker-factored layer (16 parameters), 1 diagonal leaf (4 parameters)
        kind   weight  bias   in x out  positions  uses
        dense  ['w']   ['b']  3 x 4     1          1
      diagonal blocks:
        ['gain']  (4,)  enters `mul`
    """
    n_kron = sum(
        math.prod(found.shapes[l.weight]) + (math.prod(found.shapes[l.bias]) if l.bias is not None
                                             else 0)
        for l in found.layers
    )
    n_diag = sum(math.prod(f.shape) for f in found.diagonal)
    lines = [
        f"K-FAC: {len(found.layers)} Kronecker-factored layer{_s(len(found.layers))} "
        f"({n_kron} parameters), {len(found.diagonal)} diagonal lea"
        f"{'f' if len(found.diagonal) == 1 else 'ves'} ({n_diag} parameters)"
    ]
    if found.layers:
        rows = [("kind", "weight", "bias", "in x out", "positions", "uses")]
        for l in found.layers:
            rows.append((l.kind, l.weight_path, l.bias_path or "-", f"{l.in_dim} x {l.out_dim}",
                         str(l.positions), str(len(l.uses))))
        lines += _table(rows)
    if found.diagonal:
        lines.append("diagonal blocks:")
        lines += _table([(f.path, str(f.shape), f.reason) for f in found.diagonal])
    return "\n".join(lines)


def _s(n):
    return "" if n == 1 else "s"


def _table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]
