"""The thread counts of every process a test starts, and the command line that starts `echolab`.

The README: with another thread count, results differ in floating-point rounding and sampled tokens can
diverge. Tests compare an in-process run with runs in subprocesses (the kill-and-resume test, sweeps), so
both sides are pinned to the same count here, explicitly: `tests/conftest.py` sets this process's torch
threads and environment when the session starts, and every helper that starts `echolab` passes
`pinned_environment()`.
"""

from __future__ import annotations

import os
import sys

TEST_THREADS = 1
# The variables the OpenMP, MKL and OpenBLAS runtimes (under torch, numpy, vLLM) read when a process starts.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pinned_environment(**extra: str) -> dict[str, str]:
    """This process's environment with the thread counts pinned (plus `extra`), for a subprocess."""
    return {**os.environ, **{name: str(TEST_THREADS) for name in THREAD_VARIABLES}, **extra}


def echolab_command(*args: str) -> list[str]:
    """`echolab ARGS...` as the user runs it, with this interpreter (and the PYTHONPATH it inherits)."""
    return [sys.executable, "-m", "experiments.cli", *args]
