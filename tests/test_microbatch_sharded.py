"""Microbatches of a batch an ``Auto`` mesh splits unevenly give the full batch's answer.

8 examples over 4 devices in chunks of 3: contiguous chunks straddle devices, and XLA's
slice and reshape of the split sample axis were miscompiled under differentiation (jaxlib
0.10.2, XLA:CPU; a loss picking each label's log-probability): the Hessian product was 16%
off, the gradient and the GGN product 40%, with no error. Such leaves are now gathered
before they are chunked (`operators.microbatch.gathered_for_chunks`). The pytest process has
one device, so the check runs in a fresh process with four.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P
jax.config.update("jax_enable_x64", True)
import curvlib

mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
k = jax.random.split(jax.random.PRNGKey(17), 4)
params = {"w1": jax.random.normal(k[0], (3, 4)) / 2, "w2": jax.random.normal(k[1], (4, 3)) / 2}
x = jax.random.normal(k[2], (8, 3))
y = jax.random.randint(k[3], (8,), 0, 3)
split = NamedSharding(mesh, P("data"))
xs, ys = jax.device_put(x, split), jax.device_put(y, split)
model = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
ce = lambda o, y: -jnp.mean(jax.nn.log_softmax(o)[jnp.arange(o.shape[0]), y])
loss = lambda p, x, y: ce(model(p, x), y)
flat, unravel = ravel_pytree(params)
v = unravel(jnp.arange(flat.size, dtype=jnp.float64) / 10)
err = lambda a, b: float(jnp.max(jnp.abs(ravel_pytree(a)[0] - ravel_pytree(b)[0])))
out = {}
for size in (3, 5):
    out[f"hessian_{size}"] = err(curvlib.hessian_matvec(loss, params, x, y)(v),
                                 curvlib.hessian_matvec(loss, params, xs, ys,
                                                        microbatch_size=size)(v))
    out[f"gradient_{size}"] = err(jax.grad(loss)(params, x, y),
                                  curvlib.gradient(loss, params, xs, ys, microbatch_size=size)[1])
    out[f"ggn_{size}"] = err(curvlib.ggn_matvec(model, ce, params, x, loss_args=(y,))(v),
                             curvlib.ggn_matvec(model, ce, params, xs, loss_args=(ys,),
                                                microbatch_size=size)(v))
json.dump(out, open(sys.argv[1], "w"))
'''


def test_microbatches_of_an_unevenly_split_batch_are_exact(tmp_path):
    script, out = tmp_path / "check.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(out.read_text())
    assert set(errors) == {f"{k}_{s}" for k in ("hessian", "gradient", "ggn") for s in (3, 5)}
    for name, e in errors.items():
        assert e < 1e-12, (name, e)
