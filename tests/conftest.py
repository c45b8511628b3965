"""Test configuration: float64 is enabled here, never inside the library."""

import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# JAX's persistent compilation cache, shared by the xdist workers of one run (and by later
# runs on the same machine): a program one worker compiled is loaded by the other.
# Opt-in with CURVLIB_TEST_CACHE=1 (CURVLIB_CACHE_DIR chooses the directory). Off by default:
# with jaxlib 0.10.2 on XLA:CPU, writing an entry (``executable.serialize()``) segfaulted an
# xdist worker once in four full runs (not reproducible in isolation), and a crashed worker
# fails the run.
if os.environ.get("CURVLIB_TEST_CACHE", "0") == "1":
    import curvlib

    curvlib.enable_compilation_cache(
        os.environ.get("CURVLIB_CACHE_DIR")
        or os.path.join(os.path.dirname(__file__), "..", ".jax_cache"),
        min_compile_time_secs=0.2,
    )


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


# Under mutation testing (mutmut sets MUTANT_UNDER_TEST) every test retraces: a mutant worker
# is forked from a process whose in-memory jit caches hold the unmutated programs, and a cache
# hit would run the original code instead of the mutant. The persistent cache still serves the
# programs a mutant leaves unchanged.
if "MUTANT_UNDER_TEST" in os.environ:

    @pytest.fixture(autouse=True)
    def _fresh_jit_caches():
        jax.clear_caches()
        yield
