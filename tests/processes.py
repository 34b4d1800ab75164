"""The thread counts of every process a test starts, the command line that starts `echolab`, and a small disk
that fills up.

The README: with another thread count, results differ in floating-point rounding and sampled tokens can
diverge. Tests compare an in-process run with runs in subprocesses (the kill-and-resume test, sweeps), so
both sides are pinned to the same count here, explicitly: `tests/conftest.py` sets this process's torch
threads and environment when the session starts, and every helper that starts `echolab` passes
`pinned_environment()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TEST_THREADS = 1
# The variables the OpenMP, MKL and OpenBLAS runtimes (under torch, numpy, vLLM) read when a process starts.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pinned_environment(**extra: str) -> dict[str, str]:
    """This process's environment with the thread counts pinned (plus `extra`), for a subprocess."""
    return {**os.environ, **{name: str(TEST_THREADS) for name in THREAD_VARIABLES}, **extra}


def echolab_command(*args: str) -> list[str]:
    """`echolab ARGS...` as the user runs it, with this interpreter (and the PYTHONPATH it inherits)."""
    return [sys.executable, "-m", "experiments.cli", *args]


def on_a_small_disk(script: str, disk: Path, size: str, keep: Path, **variables: str) -> subprocess.CompletedProcess:
    """Run the shell `script` with a `size` tmpfs mounted at `disk` (a real file system that fills up: ENOSPC
    partway through a write), in a private mount namespace: as root `unshare --mount`, else also a user
    namespace mapping this user to root. The mount ends with the script, so the script's last act is
    copying the disk's content to `keep`; the script's exit code is the result's. `variables` reach the
    script as environment variables (and `DISK`, `KEEP`)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs mount")
    namespaces = ["--mount"] if os.geteuid() == 0 else ["--mount", "--user", "--map-root-user"]
    disk.mkdir(parents=True, exist_ok=True)
    keep.mkdir(parents=True, exist_ok=True)
    wrapped = (f'mount -t tmpfs -o size={size} tmpfs "$DISK" || exit 99\n'
               f'( {script} )\ncode=$?\ncp -a "$DISK"/. "$KEEP"/\nexit $code\n')
    result = subprocess.run(["unshare", *namespaces, "sh", "-c", wrapped], capture_output=True, text=True, timeout=600,
                            env=pinned_environment(DISK=str(disk), KEEP=str(keep), **variables))
    if result.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {result.stderr.strip()}")
    return result


def kill_when_written(process: subprocess.Popen, path: Path, timeout: float = 600) -> None:
    """SIGKILL the process group of `process` (started with start_new_session=True: `echolab` and every
    process it started) the moment `path` exists."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the process ended before {path} appeared: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
