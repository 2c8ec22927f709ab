"""Running the examples in fresh processes, as users do (shared by the integration tests)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A clean environment: no launcher variables, no device count inherited from the test process.
ENV = {**os.environ, "PYTHONPATH": ROOT}
for var in (
    "JAX_NUM_CPU_DEVICES",
    "TITANAX_COORDINATOR",
    "TITANAX_NUM_PROCESSES",
    "TITANAX_PROCESS_ID",
):
    ENV.pop(var, None)

# The GPT examples at test size: one small layer, short sequences.
SMALL_GPT = ["--layers", "1", "--d-model", "64", "--seq-len", "32", "--batch-size", "8"]


def compilation_cache():
    """The test process's persistent compilation cache (conftest.py), as environment
    variables: a single-process run then loads a program that the tests or an earlier run
    compiled, as the test process does, instead of compiling it again (seconds each). The
    `titanax launch` runs below compile afresh."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    if not cache:
        return {}
    return {
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run(script, *args, timeout=600):
    """``python SCRIPT ARGS`` from the repository root; fails the test unless it exits 0."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        env={**ENV, **compilation_cache()},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def launch(nproc, script, *args, timeout=300):
    """``titanax launch --nproc N`` with 8 devices in all; the CompletedProcess."""
    cmd = [
        sys.executable,
        "-m",
        "titanax.launch.cli",
        "launch",
        "--nproc",
        str(nproc),
        "--devices-per-process",
        str(8 // nproc),
        script,
        *args,
    ]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
