"""Test configuration: float64 is enabled here, never inside the library."""

import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# The suite checks answers, not speed, and compiling is most of its time: XLA:CPU's backend at
# its cheapest setting (LLVM's optimisation level 0, its expensive passes off, and the classic
# elemental emitter instead of the fusion emitters, whose MLIR pipeline is most of a compile:
# an eigsh program compiles in 0.37 s instead of 2.6 s), in one piece (XLA:CPU splits a program
# into up to 32 modules to generate code on several threads; the two xdist workers already hold
# both cores, and four test files ran 7% faster unsplit: 191-192 s against 205-213 s, -n 2,
# alternated). The HLO passes (fusion, the programs
# the tests inspect) are unchanged; the machine code is slower to run and much faster to
# produce. Set before the first backend use (nothing above creates one), and in
# the environment, so the subprocesses the suite starts (sharding workers, the multi-process
# harness, notebooks, the fresh interpreter that must reproduce this one's bits) compile the same
# way. CURVLIB_TEST_XLA_OPT=1 keeps XLA's defaults.
# The emitter flag exists only in XLA:CPU builds (a GPU or TPU jaxlib aborts on an unknown flag
# in XLA_FLAGS), so it is added only where no accelerator plugin is installed and the jaxlib is
# one it was seen in (0.10); the subprocesses read the choice from CURVLIB_TEST_XLA_FLAGS.


def _cpu_only_jaxlib() -> bool:
    import importlib.metadata as md

    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in md.distributions()}
    if any(n.startswith(("jax-cuda", "jax-rocm", "libtpu", "jax-tpu")) for n in names):
        return False
    try:
        major, minor = (int(p) for p in md.version("jaxlib").split(".")[:2])
    except (md.PackageNotFoundError, ValueError):
        return False
    return (major, minor) <= (0, 10)


_CHEAP_BACKEND = os.environ.setdefault("CURVLIB_TEST_XLA_FLAGS", (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    + (" --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
       if _cpu_only_jaxlib() else "")))
if os.environ.get("CURVLIB_TEST_XLA_OPT", "0") != "1" and _CHEAP_BACKEND not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CHEAP_BACKEND).strip()

# Eager calls compile their fused program in front here, not behind (`curvlib.compile_behind`):
# the suite pins the fused programs, and a background compile per new signature would compete
# with the xdist workers for the two cores. Set in the environment, so the subprocesses the suite
# starts (a fresh interpreter that must reproduce this one's bits, the sharding workers, the
# notebooks) take the same path: the answer-now path agrees with the fused program to rounding,
# not bit for bit. tests/test_first_answer.py turns it on and checks the two against each other.
if "CURVLIB_COMPILE_BEHIND" not in os.environ:
    os.environ["CURVLIB_COMPILE_BEHIND"] = "0"
    import curvlib

    curvlib.compile_behind(False)

# JAX's persistent compilation cache, shared by the xdist workers of one run (and by later
# runs on the same machine): a program one worker compiled is loaded by the other.
# Opt-in with CURVLIB_TEST_CACHE=1 (CURVLIB_CACHE_DIR chooses the directory). Off by default:
# with jaxlib 0.10.2 on XLA:CPU, writing an entry (``executable.serialize()``) segfaulted an
# xdist worker once in four full runs (not reproducible in isolation), and a crashed worker
# fails the run. Very likely the memory-mapping limit that `_bounded_executable_mappings`
# (below) now keeps the workers under: worth retrying.
if os.environ.get("CURVLIB_TEST_CACHE", "0") == "1":
    import curvlib

    curvlib.enable_compilation_cache(
        os.environ.get("CURVLIB_CACHE_DIR")
        or os.path.join(os.path.dirname(__file__), "..", ".jax_cache"),
        min_compile_time_secs=0.2,
    )


def _mapped_regions() -> int:
    """Memory mappings of this process (Linux), 0 where ``/proc`` is not there."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


@pytest.fixture(autouse=True, scope="module")
def _bounded_executable_mappings():
    """Drop the compiled programs between test modules once they fill a third of the limit.

    Every XLA:CPU executable keeps about three memory mappings until its jit cache entry goes.
    One xdist worker compiles tens of thousands of programs over the suite; past the kernel's
    ``vm.max_map_count`` (65530 by default) the next compile cannot map its code and the worker
    segfaults inside ``backend_compile_and_load`` (seen in full runs, never in one file alone).
    A user process that compiles that many programs needs the same ``jax.clear_caches()``.
    """
    yield
    if _mapped_regions() > _map_limit() // 3:
        jax.clear_caches()


@pytest.fixture(autouse=True)
def _switches_restored():
    """Every test leaves curvlib's process-wide switches as it found them.

    (`compile_behind` left on by one test file once sent every later eager call of that
    xdist worker through the answer-now path: a test of the fused program then checked the
    other path.)
    """
    import curvlib

    was = curvlib.compile_behind(), curvlib.show_progress()
    yield
    now = curvlib.compile_behind(), curvlib.show_progress()
    assert now == was, f"(compile_behind, show_progress) was {was}, left at {now}"


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture
def compile_behind_on():
    """`curvlib.compile_behind` on (the suite runs with it off), every entry forgotten after;
    yields ``curvlib._compile.BEHIND``."""
    import curvlib
    from curvlib import _compile

    was = curvlib.compile_behind(True)
    _compile.BEHIND.clear()
    # the tests check answers and which program gives them, not when a compile starts
    _compile.BEHIND._QUIET_S = 0.05
    try:
        yield _compile.BEHIND
        _compile.BEHIND.wait()
    finally:
        _compile.BEHIND.clear()
        del _compile.BEHIND._QUIET_S  # the class's value again
        curvlib.compile_behind(was)


@pytest.fixture(scope="module")
def on_eight_devices():
    """``run(code, out_path, timeout)``: ``python -c code out_path`` in a fresh process with 8
    CPU devices (appended to this suite's XLA_FLAGS, conftest's cheapest backend setting, not
    in their place) and this checkout first on the path; fails on a non-zero exit, returns
    the JSON the code wrote to ``out_path``."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + " --xla_force_host_platform_device_count=8").strip(),
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(code: str, path, timeout: int = 1800):
        proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(path) as f:
            return json.load(f)

    return run


# Under mutation testing (mutmut sets MUTANT_UNDER_TEST) every test retraces: a mutant worker
# is forked from a process whose in-memory jit caches hold the unmutated programs, and a cache
# hit would run the original code instead of the mutant. The persistent cache still serves the
# programs a mutant leaves unchanged.
if "MUTANT_UNDER_TEST" in os.environ:

    @pytest.fixture(autouse=True)
    def _fresh_jit_caches():
        jax.clear_caches()
        yield


class _Compiles:
    """Counts XLA compilations while active (JAX's ``jax_log_compiles`` messages)."""

    def __enter__(self):
        import logging
        import threading

        self.count, self.names, self.was = 0, [], jax.config.jax_log_compiles
        self.in_front = []  # the names compiled on the thread that entered (not behind)
        outer, caller = self, threading.get_ident()

        class Handler(logging.Handler):
            def emit(self, record):
                message = record.getMessage()
                if message.startswith("Compiling"):
                    outer.count += 1
                    name = message.split()[1].split(")")[0] + ")"
                    outer.names.append(name)
                    if record.thread == caller:
                        outer.in_front.append(name)

        self.handler, self.logger = Handler(), logging.getLogger("jax")
        self.logger.addHandler(self.handler)
        jax.config.update("jax_log_compiles", True)
        return self

    def __exit__(self, *exc):
        jax.config.update("jax_log_compiles", self.was)
        self.logger.removeHandler(self.handler)


@pytest.fixture
def compiles():
    """``with compiles() as seen: ...``: ``seen.count`` XLA compilations inside the block,
    ``seen.names`` their programs (``"jit(name)"``), ``seen.in_front`` those compiled on the
    calling thread (not by a compile behind, `curvlib.compile_behind`, that started meanwhile)."""
    return _Compiles


# The files whose own work is longest on 2 cores (a fresh-clone run, per-file seconds summed
# over their tests), longest first: `--dist loadfile` hands each worker whole files in
# collection order as it frees up, so these start first and the short files fill in around
# them (longest processing time first), rather than one long file starting last on one
# worker while the other sits idle. pytest-xdist 3.8 reorders files by their number of tests
# unless `--no-loadscope-reorder` is given (pyproject.toml's addopts): by that order the
# subprocess harnesses and notebooks, long files of few tests, ran last.
LONG_FILES = (
    "test_first_answer.py", "test_multiprocess.py", "test_sharding.py", "test_family_blocks.py",
    "test_krylov.py", "test_optim_contract.py", "test_notebooks.py", "test_eigsh_certified.py",
    "test_landscape.py", "test_docs.py", "test_status.py", "test_optim.py",
    "test_family_sharding.py", "test_streams.py", "test_track.py", "test_state.py",
    "test_properties_robust.py", "test_numerics.py", "test_operators.py", "test_hostile.py",
    "test_deprecations.py", "test_eigsh_certificate.py", "test_family_inverse.py",
    "test_mixed_precision.py", "test_readme.py", "test_kfac_sharding.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: files
    # keep their own order, the others theirs
