"""Where K-FAC's factors live when the parameters are sharded: as the parameters are.

For parameters placed with ``NamedSharding`` on one mesh (``AxisType.Auto``
axes), a layer's input factor ``A`` (``a_dim x a_dim``) is split by rows over
the mesh axes that split the weight's input axis, and its output factor ``G``
over those that split the output axis, when that axis is one leaf axis and the
factor's size divides evenly; otherwise the factor is replicated on the mesh.
Diagonal blocks and parameter-shaped state follow their leaves; scalars are
replicated. Eigenvectors and inverses follow their factors.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from curvlib import _tree
from curvlib.kronecker.discovery import KfacLayers, apply_chain


def refuse_explicit(trees: dict, caller: str) -> None:
    """A ``ValueError`` naming the first leaf that lives on a mesh with ``Explicit`` axes.

    K-FAC's factors are placed for ``Auto`` meshes only: on an ``Explicit`` one the
    statistics' concatenations of sharded and unsharded arrays failed deep inside JAX
    (``ShardingTypeError`` at the first ``update``, after a silent ``init``). ``trees``
    maps argument names to pytrees; works on tracers and arrays alike.
    """
    for name, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, jax.ShapeDtypeStruct):  # (an example's shape: no placement)
                continue
            s = _tree.explicit_sharding(leaf)
            if s is not None:
                raise ValueError(
                    f"{caller}: `{name}{jax.tree_util.keystr(path)}` lives on a mesh with "
                    f"Explicit axes ({s.spec}); K-FAC supports meshes of Auto axes only "
                    "(`jax.make_mesh(..., axis_types=(AxisType.Auto, ...))`, docs/kfac.md, "
                    "'Sharding').")


def param_shardings(params):
    """The parameters' ``NamedSharding``s on one multi-device Auto mesh, replicated ones too."""
    return _tree.param_shardings(params, replicated=True)


def _spec(s: NamedSharding, ndim: int) -> tuple:
    return tuple(s.spec) + (None,) * (ndim - len(s.spec))


def _matrix_axis(chain, shape, which: int, size: int):
    """The one leaf axis spanning the rows (``which=0``) or columns of the matrix view, else None.

    Found by replaying the view chain on each axis's coordinate grid: that axis
    must vary along exactly ``which`` of the matrix and have the matrix's size there.
    """
    found = []
    for k in range(len(shape)):
        m = apply_chain(chain, np.indices(shape)[k].astype(np.float64), xp=np)
        along = [bool(m.size) and float(np.ptp(m, axis=i).max()) > 0 for i in (0, 1)]
        if along[which] and not along[1 - which]:
            found.append(k)
    if len(found) == 1 and shape[found[0]] == size:
        return found[0]
    return None


def _rows(mesh, names, size):
    if names is None:
        return NamedSharding(mesh, P())
    group = names if isinstance(names, tuple) else (names,)
    shards = math.prod(mesh.shape[a] for a in group)
    return NamedSharding(mesh, P(names)) if size % shards == 0 else NamedSharding(mesh, P())


def factor_shardings(layers: KfacLayers, shardings):
    """``(A, G, D)`` shardings per layer / diagonal leaf for the given leaf shardings."""
    mesh = shardings[0].mesh
    A, G = [], []
    for l in layers.layers:
        shape = layers.shapes[l.weight]
        spec = _spec(shardings[l.weight], len(shape))
        a_sz = l.in_dim if l.kind == "embedding" else l.a_dim
        row = _matrix_axis(l.chain, shape, 0, l.in_dim)
        col = _matrix_axis(l.chain, shape, 1, l.out_dim)
        A.append(_rows(mesh, spec[row] if row is not None else None, a_sz))
        G.append(_rows(mesh, spec[col] if col is not None else None, l.out_dim))
    D = [shardings[f.leaf] for f in layers.diagonal]
    return A, G, D


def replicated(shardings):
    return NamedSharding(shardings[0].mesh, P())


def with_shardings(tree, shardings):
    """``tree`` constrained (under ``jit``) or placed (eagerly) on ``shardings``."""
    def put(x, s):
        if isinstance(x, jax.core.Tracer):
            return jax.lax.with_sharding_constraint(x, s)
        return jax.device_put(x, s)

    return jax.tree.map(put, tree, shardings)


def outer(a: NamedSharding, g: NamedSharding) -> NamedSharding:
    """A ``(rows of A, rows of G)`` matrix's sharding: rows as ``a``'s, columns as ``g``'s."""
    ra = a.spec[0] if len(a.spec) else None
    rg = g.spec[0] if len(g.spec) else None
    names = lambda x: set(x if isinstance(x, tuple) else (x,)) if x is not None else set()
    if names(ra) & names(rg):
        rg = None
    return NamedSharding(a.mesh, P(ra, rg))
