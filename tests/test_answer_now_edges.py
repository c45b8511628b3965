"""Edges of the eager "answer now, compile behind" path, its switches and the progress bar.

The answer-now paths themselves are pinned against their fused programs in
``tests/test_first_answer.py``; these tests pin what surrounds them: the settings that turn
them on (the persistent cache, ``CURVLIB_PROGRESS``) and where compile-behind must stay off.
"""

import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_a_cache_time_that_is_not_one_number_is_refused_before_the_cache_moves(tmp_path):
    """An array of times passed the range check, then failed in ``float`` with NumPy's
    message after the cache folder had been switched (and JAX's cache not reset): the call
    raised and half-applied. Now it is refused first and nothing changes."""
    before = jax.config.jax_compilation_cache_dir
    for bad in (np.array([1.0, 2.0]), [0.5, 1.0]):
        with pytest.raises(ValueError, match="min_compile_time_secs"):
            curvlib.enable_compilation_cache(tmp_path, min_compile_time_secs=bad)
        assert jax.config.jax_compilation_cache_dir == before


def test_progress_asked_for_by_the_environment_without_tqdm_stays_off(monkeypatch):
    """``CURVLIB_PROGRESS=1`` with tqdm not installed (it is optional) turned progress on
    anyway: every eager `eigsh` (and every streamed pass) then failed at its first bar with
    ``ModuleNotFoundError``, where ``show_progress(True)`` refuses up front. Now the setting
    stays off, with a warning at import."""
    from curvlib import _progress

    was = curvlib.show_progress()
    monkeypatch.setenv("CURVLIB_PROGRESS", "1")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # (an import of it fails)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    try:
        with pytest.warns(UserWarning, match="tqdm"):
            importlib.reload(_progress)
        assert curvlib.show_progress() is False
        assert _progress.bar(desc="eigsh") is None  # (raised ModuleNotFoundError)
    finally:
        monkeypatch.undo()
        importlib.reload(_progress)
        curvlib.show_progress(was)


def test_the_landscape_does_not_compile_behind_in_a_multi_process_run(compile_behind_on,
                                                                       monkeypatch):
    """`compile_behind` is always off with several processes (each would find its own
    compile ready at its own moment and run another program than the others): every entry
    checks ``jax.process_count()``, but the landscape's eager coefficients went to the
    compile-behind table all the same. Now they compile in front, one program."""
    from curvlib import landscape as L

    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=8))
    w0, U = jnp.asarray([0.3, -0.2, 0.5]), jnp.eye(3)[:2]
    loss = lambda w, b: jnp.mean((jnp.tanh(b[0] @ w) - b[1]) ** 2)
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
    out = L.increment_coefficients(loss, w0, (x, y), 4, U)
    assert len(compile_behind_on._entries) == 0
    inc = lambda w: (jnp.mean((jnp.tanh(x[:5] @ w) - y[:5]) ** 2)
                     - jnp.mean((jnp.tanh(x[:4] @ w) - y[:4]) ** 2))
    np.testing.assert_allclose(out.a, inc(w0), rtol=1e-5)
    np.testing.assert_allclose(out.c, U @ jax.grad(inc)(w0), rtol=1e-4, atol=1e-6)
