"""The thread counts a test's processes run with: pinned in the test process and in what it starts."""

import subprocess
import sys

import torch

from processes import TEST_THREADS, THREAD_VARIABLES, pinned_environment

REPORT = "import os, torch; print(torch.get_num_threads(), *(os.environ.get(name) for name in {names!r}))"


def threads_of(command: list[str], **kwargs) -> list[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, **kwargs)
    return result.stdout.split()


def test_the_test_process_and_the_processes_it_starts_use_the_same_thread_count():
    assert torch.get_num_threads() == TEST_THREADS
    code = REPORT.format(names=THREAD_VARIABLES)
    expected = [str(TEST_THREADS)] * (1 + len(THREAD_VARIABLES))
    # explicitly, as the helpers start `echolab`; and inherited, as a sweep starts its runs or Ray its workers
    assert threads_of([sys.executable, "-c", code], env=pinned_environment()) == expected
    assert threads_of([sys.executable, "-c", code]) == expected
