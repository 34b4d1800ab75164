"""Run untrusted, model-written programs in separate, resource-limited, isolated worker processes.

Model-written Python never runs in the calling process. A `Sandbox` keeps a pool of worker
processes, each a fresh interpreter running this file (standard library, plus the modules programs
may import and the seccomp binding), started with `subprocess` rather than `multiprocessing`: the
"spawn" and "forkserver" contexts re-import the caller's `__main__` (torch, vLLM) into every worker,
which costs seconds and gigabytes of address space; fork is unsafe once the caller has threads.

Two layers of defence, each of which contains the escape corpus in tests/test_sandbox.py on its own
(the corpus runs against both together, and against the OS layer alone):

The Python layer (what a program may say and reach). A static check rejects class definitions,
`global`/`nonlocal`, names and attributes starting with "__", frame-introspection attributes,
attribute assignment, dangerous builtin names, class patterns, large integer exponents, and imports
of modules outside an allowlist (status "forbidden"). The program then runs with a small whitelist of
builtins whose `__import__` hands out views of the allowed modules (their public attributes, minus
modules the allowlist does not cover), so whatever the check misses finds no `open` or `os`. The
allowed modules are pure computation (math, fractions, sympy, numpy, ...), loaded before the OS layer
closes and never loaded later. Imports are allowed only while the whole OS layer is in force: the
Python layer alone does not hold against a program that reaches an allowed module's escape hatches
(sympy's `sympify` evaluates strings with the real builtins; `functools.update_wrapper` assigns any
attribute), which is why the OS layer exists.

The OS layer (what the worker process may do), entered by each worker before it reads a program:
- a private network namespace: no interface but a loopback that is down (root unshares it directly,
  others inside a new user namespace);
- an empty private working directory, stdin/stdout/stderr on /dev/null, and no descriptor besides
  the pipe to the parent;
- the unprivileged user 65534 ("nobody") when started as root, with no supplementary groups;
- `PR_SET_NO_NEW_PRIVS`, and a Landlock view of the file system: files and directories beneath
  Python's library directories may be read (sympy loads submodules inside its functions), nothing
  else may be read, nothing written, created, removed or executed anywhere;
- rlimits: open files 32 (0 without Landlock: then nothing can be opened at all), file size 0,
  processes 0 (enforced now that the worker is not root), core dumps 0, address space (the start-up
  footprint plus `memory_mb`), CPU time per program;
- a seccomp-bpf allowlist (libseccomp, through `pyseccomp`) of the system calls a computing
  interpreter makes: reading and writing descriptors it holds, memory, signals and timers, clocks and
  limits, futexes, and with Landlock opening files read-only. Everything else fails with EPERM: no
  socket or connect, no execve, fork or clone, no kill of any process, no ptrace, mount, chroot,
  unshare, setuid.
A part that cannot be entered is named at start-up, once per process (`SandboxIsolationWarning`),
and recorded in `Sandbox.isolation`; imports stay forbidden unless every part but the network
namespace and the file-system view is in force (the filter and the open-files limit do the
namespace's job; without the view no file opens at all).

The parent. A CPU-time timer in the worker interrupts Python-level loops (status "timeout"); the
kernel's CPU limit ends a worker stuck in C code. When a worker dies, the program it was running is
reported ("timeout" or "error") and the rest of its chunk is rerun in a fresh worker, so no result is
lost. Watchdogs end a worker whose program has used more CPU time than the kernel would allow (a
program that got past the Python layer can switch its timer and raise its soft CPU limit), or has
stalled without CPU for many times its allowance. The parent trusts nothing a worker says: results
cross as JSON (never pickle) of bounded size and are checked field by field; the progress record is
believed only while it moves forward through the chunk. A worker that breaks these rules is ended and
its program reported as "error".

What no layer gives: a program that gets past the Python layer (through sympy, say) runs arbitrary
Python inside its worker and can change what later programs in that worker compute. It cannot write
a file, open a connection, start a process, signal another process or outlast its time: containment,
not isolation of one program from the next. The known global state of the allowed modules (decimal's
context, numpy's print and error settings) is reset after every program that imported them, so honest
programs get the same answers in any order.

Throughput: programs are deduplicated per call and sent in chunks; a worker compiles a typical
program straight from source and checks the compiled code objects (about 40 us for a short
function, on one core); only programs that need a rewrite go through a syntax tree first.
"""

from __future__ import annotations

import ast
import builtins
import dis
import errno
import gc
import importlib
import importlib.util
import json
import math
import mmap
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from types import CodeType, ModuleType
from typing import Literal

Status = Literal["ok", "timeout", "forbidden", "error", "no_output"]
_STATUSES = frozenset(Status.__args__)


@dataclass(frozen=True)
class Program:
    """A program to run.

    `source`: the code whose output is the answer. `call`: name of a zero-argument function the code
    defines, whose return value is the answer; None: the answer is what `source` shows when run as a
    notebook cell, the value of its bare last expression (when that is not None), else its last printed
    line. `preceding`: cells that run first, in the same globals, as the earlier code blocks of one
    OpenMathInstruct-1 completion do; a cell's error does not stop the next (a notebook goes on), and
    nothing they print is the answer. `Program.notebook(cells)` builds one from a completion's cells.
    """

    source: str
    call: str | None = None
    preceding: tuple[str, ...] = ()

    @classmethod
    def notebook(cls, cells: Sequence[str]) -> Program:
        """The cells of one completion run as one notebook; the answer is what the last cell shows."""
        if not cells:
            raise ValueError("a notebook needs at least one cell")
        return cls(cells[-1], preceding=tuple(cells[:-1]))


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    value: str | None = None  # str() of the answer when status == "ok"
    detail: str = ""


@dataclass(frozen=True)
class Isolation:
    """What the workers of a pool reported at start-up.

    os_layer: the parts of the OS layer in force. missing: {part: why} for the parts that are not.
    modules: the modules programs may import (none while a required part is missing).
    python_layer: False only in the test that proves the OS layer alone contains the corpus.
    """

    os_layer: tuple[str, ...]
    missing: dict[str, str] = field(default_factory=dict)
    modules: tuple[str, ...] = ()
    python_layer: bool = True

    @property
    def complete(self) -> bool:
        return not self.missing


class SandboxIsolationWarning(UserWarning):
    """A part of the sandbox's OS layer is not in force on this machine."""


MAX_SOURCE_CHARS = 20_000
MAX_EXPONENT = 64  # |n| for integer exponents: 10**10**10 would hold the interpreter in C for hours
MAX_VALUE_CHARS = 10_000  # a longer answer is not a number; capping it bounds the result messages
# Modules a program may import: pure computation that real math solutions use. sympy and numpy where
# installed; a dotted name (`sympy.abc`) also loads that submodule, which the package does not.
DEFAULT_MODULES = (
    "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "statistics", "numbers", "re",
    *(name for name in ("sympy", "numpy") if importlib.util.find_spec(name) is not None),
)
_MAX_DETAIL_CHARS = 200
_REFIRE_S = 0.05  # the timer keeps firing after the limit, in case the program swallows the first one
_CPU_MARGIN_S = 0.25  # at least this much CPU time past timeout_s before the kernel ends a worker
_CPU_WATCH_S = 0.5  # the parent ends a worker this much CPU time past the kernel's latest limit
_MIN_CHECK_S = 0.05  # the parent asks a worker's CPU time at most this often
_WALL_CLOCK_FACTOR = 10  # the parent's stall watchdog allows this many times a program's CPU allowance
_START_TIMEOUT_S = 60.0
_PROGRESS_BYTES = 8  # one double: 1 + the position in its chunk of the program running
_UNPRIVILEGED_ID = 65534  # "nobody": the kernel's overflow id, owner of no file
# A message's worst case: every character of a value or detail JSON-escaped as \uXXXX, plus the framing.
_MAX_RESULT_BYTES = 6 * (MAX_VALUE_CHARS + _MAX_DETAIL_CHARS) + 64
_MAX_READY_BYTES = 1 << 20

# Names and attributes a program may not mention (rather than meeting a NameError at run time), so
# that attempts to escape show up as "forbidden". Besides dangerous builtins: attributes without
# underscores that still reach frames and code objects (a frame's f_globals would hand over the
# worker's own modules). Every name starting with "__" is forbidden too, except `__annotations__`.
_FORBIDDEN_NAMES = frozenset(
    "open exec eval compile globals locals vars getattr setattr delattr hasattr dir id input "
    "breakpoint help exit quit memoryview type object super classmethod staticmethod property "
    "copyright credits license mro gi_frame gi_code gi_yieldfrom cr_frame cr_code cr_await cr_origin "
    "ag_frame ag_code ag_await tb_frame tb_next f_back f_globals f_locals f_builtins f_code".split()
)
# Names the worker's rewrite of a program uses. Neither is an identifier, so no program can bind or
# shadow them (a program that rebinds the guard's name to `abs` would switch the guard off).
_EXPONENT_CHECK = "exponent check"  # added to globals: the run-time guard for computed exponents
_LAST_VALUE = "last value"  # where a bare last expression's value goes when `call` is None
_ALLOWED_DUNDER = "__annotations__"  # module-level annotations (`x: int = 1`) fill it
_FORBIDDEN_OPCODES = {
    dis.opmap[name]: reason
    for names, reason in [
        (("LOAD_BUILD_CLASS",), "class definitions not allowed"),
        (("STORE_ATTR", "DELETE_ATTR"), "attribute assignment not allowed"),
        # `case C(attr=...)` reads attributes named by constants, out of sight of the name check
        (("MATCH_CLASS",), "class patterns not allowed"),
    ]
    for name in names
}
_IMPORT_NAME = dis.opmap["IMPORT_NAME"]
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Sources whose syntax tree must be checked (see `_compile`).
_TREE_NEEDED = re.compile(r"\*\*|global|nonlocal")


# ---------------------------------------------------------------------------------------------
# Parent side: the pool.


@dataclass(frozen=True)
class _WorkerSettings:
    timeout_s: float
    memory_mb: int
    modules: tuple[str, ...]
    python_layer: bool
    import_paths: tuple[str, ...]  # where the worker finds the allowed modules and pyseccomp


class Sandbox:
    """A pool of worker processes that run programs; use as a context manager, or call `close()`.

    Safe for many `run()` calls in sequence (not from several threads at once). Results are
    deterministic: identical programs get identical results, and every program runs in fresh
    globals.

    modules: the modules programs may import (DEFAULT_MODULES); each must be installed.
    python_layer: False switches the Python layer off, for the test that proves the OS layer alone
        contains every escape attempt; refused unless the OS layer is in force.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 1.0, memory_mb: int = 512, chunk_size: int = 256,
                 modules: Sequence[str] = DEFAULT_MODULES, python_layer: bool = True):
        if workers < 1 or timeout_s <= 0 or memory_mb < 64 or chunk_size < 1:
            raise ValueError(
                "Sandbox needs workers >= 1, timeout_s > 0, memory_mb >= 64 and chunk_size >= 1, got "
                f"workers={workers}, timeout_s={timeout_s}, memory_mb={memory_mb}, chunk_size={chunk_size}"
            )
        if isinstance(modules, str):
            raise TypeError("Sandbox modules: give a sequence of module names, not one string")
        missing = [name for name in modules if _find_top_level(name) is None]
        if missing:
            raise ValueError(f"Sandbox modules not installed: {', '.join(missing)}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.chunk_size = chunk_size
        self._settings = _WorkerSettings(timeout_s, memory_mb, tuple(modules), python_layer,
                                         _import_paths([*modules, "pyseccomp"]))
        # Time limits count CPU time, so that results do not depend on the machine's load. The
        # wall-clock watchdog is only for a worker that stalls without using CPU: it can be generous.
        self._cpu_watch_s = timeout_s + _CPU_MARGIN_S + 1 + _CPU_WATCH_S
        self._stall_s = _WALL_CLOCK_FACTOR * (timeout_s + _CPU_MARGIN_S + 1)
        self.stalls = 0  # programs the stall watchdog ended (their worker stalled without using CPU)
        self._workers: list[_Worker] = []
        try:
            self._workers = [_Worker(self._settings) for _ in range(workers)]
            reports = [worker.wait_until_ready() for worker in self._workers]
        except BaseException:
            self.close()
            raise
        self.isolation = reports[0]
        if any(report != self.isolation for report in reports):  # same machine, same settings: cannot differ
            self.close()
            raise RuntimeError(f"sandbox workers report different isolation: {reports}")
        if self.isolation.missing and not python_layer:
            self.close()
            raise RuntimeError("Sandbox(python_layer=False) needs the whole OS layer; missing: "
                               + "; ".join(f"{part} ({why})" for part, why in self.isolation.missing.items()))
        _report_once(self.isolation)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. Idempotent."""
        for worker in self._workers:
            worker.end(patience=2.0)  # an idle worker exits at end of input
        self._workers = []

    def run(self, programs: Sequence[Program]) -> list[SandboxResult]:
        """Run `programs`; results in input order. Identical programs run once."""
        if not self._workers:
            raise RuntimeError("this Sandbox is closed")
        unique = list(dict.fromkeys(programs))
        if not all(isinstance(program, Program) for program in unique):
            raise TypeError("Sandbox.run takes a sequence of Program")
        results: list[SandboxResult | None] = [None] * len(unique)
        # Small batches are split so that every worker gets a share.
        size = max(1, min(self.chunk_size, -(-len(unique) // len(self._workers))))
        pending = deque(list(range(start, min(start + size, len(unique)))) for start in range(0, len(unique), size))
        try:
            self._dispatch(unique, pending, results)
        except BaseException:
            # Workers may still be busy with chunks nobody will collect; none can be reused safely.
            self.close()
            raise
        by_program = dict(zip(unique, results))
        return [by_program[program] for program in programs]

    def _dispatch(self, unique: list[Program], pending: deque[list[int]], results: list) -> None:
        """Hand chunks (lists of indices into `unique`) to idle workers until all have results. A
        worker that replaces a dead one starts meanwhile (loading the allowed modules takes a second
        or two) and joins when it reports ready."""
        busy: dict[_Worker, list[int]] = {}
        while pending or busy:
            for worker in [worker for worker in self._workers if worker.report is not None and worker not in busy]:
                if not pending:
                    break
                chunk = pending.popleft()
                try:
                    worker.send([unique[index] for index in chunk])
                except OSError:  # died while idle (killed from outside): start another
                    pending.appendleft(chunk)
                    worker.end(patience=1.0)
                    self._replace(worker)
                    continue
                busy[worker] = chunk
            starting = [worker for worker in self._workers if worker.report is None]
            nearest = min([worker.next_check(self._cpu_watch_s, self._stall_s) for worker in busy]
                          + [worker.start_deadline for worker in starting])
            by_connection = {worker.connection: worker for worker in [*busy, *starting]}
            for connection in wait(list(by_connection), timeout=max(0.0, nearest - time.monotonic())):
                worker = by_connection[connection]
                if worker.report is None:
                    self._admit(worker)
                    continue
                chunk = busy.pop(worker)
                try:
                    for index, result in zip(chunk, worker.receive(len(chunk)), strict=True):
                        results[index] = result
                except (EOFError, OSError):
                    self._recover(worker, chunk, pending, results, blame=None)
                except ValueError as exc:  # a subverted worker
                    self._recover(worker, chunk, pending, results, blame=SandboxResult("error", None, str(exc)))
            for worker, why in [(worker, worker.overdue(self._cpu_watch_s, self._stall_s)) for worker in busy]:
                if why is None:
                    continue
                self.stalls += why == "stalled"
                timeout = SandboxResult("timeout", None, f"time limit of {self.timeout_s:g} s exceeded")
                self._recover(worker, busy.pop(worker), pending, results, blame=timeout)
            for worker in starting:
                if worker.report is None and time.monotonic() >= worker.start_deadline:
                    worker.wait_until_ready()  # raises: it did not start in time

    def _recover(self, worker: _Worker, chunk: list[int], pending: deque, results: list,
                 blame: SandboxResult | None) -> None:
        """Blame the program the worker was running, requeue the rest of its chunk, replace it.

        blame: the result for that program; None: from how the worker died. The programs before the
        culprit had finished but their results died with the worker; running them again gives the
        same results.
        """
        position = worker.current()
        returncode = worker.end(patience=0.0 if blame is not None else 1.0)
        self._replace(worker)
        if blame is None and returncode == -signal.SIGXCPU:  # the kernel's CPU-time limit
            blame = SandboxResult("timeout", None, f"time limit of {self.timeout_s:g} s exceeded")
        elif blame is None:
            how = (signal.strsignal(-returncode) or f"signal {-returncode}") if returncode < 0 else f"exit code {returncode}"
            blame = SandboxResult("error", None, f"worker process died ({how})")
        results[chunk[position]] = blame
        rest = chunk[:position] + chunk[position + 1 :]
        if rest:
            pending.appendleft(rest)

    def _replace(self, worker: _Worker) -> None:
        """Start a fresh worker in the place of the ended `worker`; it joins when ready (`_admit`)."""
        self._workers[self._workers.index(worker)] = _Worker(self._settings)

    def _admit(self, worker: _Worker) -> None:
        """Read a started worker's report: it must match the pool's."""
        if worker.wait_until_ready() != self.isolation:
            worker.end(patience=0.0)
            raise RuntimeError(f"a replacement sandbox worker reports different isolation: {worker.report}")


def run_programs(programs: Sequence[Program], **sandbox_kwargs) -> list[SandboxResult]:
    """Run `programs` in a Sandbox opened and closed for this call."""
    with Sandbox(**sandbox_kwargs) as sandbox:
        return sandbox.run(programs)


_reported: set[str] = set()


def _report_once(isolation: Isolation) -> None:
    """Name the missing parts of the OS layer, once per process and message."""
    if not isolation.missing:
        return
    parts = "; ".join(f"{part} ({why})" for part, why in isolation.missing.items())
    consequence = ("programs may import " + ", ".join(isolation.modules)) if isolation.modules else (
        "programs may not import modules")
    message = f"sandbox: OS layer incomplete, missing: {parts}; {consequence}. See the README, 'The sandbox'."
    if message not in _reported:
        _reported.add(message)
        warnings.warn(message, SandboxIsolationWarning, stacklevel=3)


def _find_top_level(name: str):
    """The import spec of the top-level package of `name`, without importing anything."""
    top = name.partition(".")[0]
    return importlib.util.find_spec(top) if top.isidentifier() else None


def _import_paths(names: Sequence[str]) -> tuple[str, ...]:
    """The directories the worker (started with -S: no site-packages) needs on its path for `names`."""
    paths = []
    for name in names:
        spec = _find_top_level(name)
        if spec is None or not spec.origin or not os.path.isabs(spec.origin):
            continue  # not installed (pyseccomp may not be: the worker names that), or built in
        directory = os.path.dirname(spec.origin)
        if spec.submodule_search_locations is not None:  # a package: origin is its __init__.py
            directory = os.path.dirname(directory)
        if directory not in paths:
            paths.append(directory)
    return tuple(paths)


def _cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used (utime + stime in /proc/PID/stat), None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()  # the name before ")" may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Worker:
    """One worker process: a duplex pipe for chunks and results, a shared progress record, and its
    private working directory.

    The progress record (a small file mapped by both processes) holds 1 + the position in the
    current chunk of the program the worker last started, so the parent knows which program hangs or
    crashed without a message per program. A subverted worker could write anything there, so the
    parent believes it only while it moves forward within the chunk, and keeps its own clock: when it
    saw the position change, and how much CPU time the worker had used then.
    """

    def __init__(self, settings: _WorkerSettings):
        self.connection, child_end = Pipe(duplex=True)
        self.private_dir = tempfile.mkdtemp(prefix="echolab-sandbox-")
        if os.geteuid() == 0:
            os.chown(self.private_dir, _UNPRIVILEGED_ID, _UNPRIVILEGED_ID)
        # No variables of the caller's: a format string reads what a builtin reaches without calling
        # anything ('{0.__globals__[os].environ}'.format(print)), so the worker holds no secrets.
        environment = {
            "PYTHONHASHSEED": "0",  # the order of a printed set of strings must not vary
            # numpy's BLAS would start threads; the worker stays single-threaded (its filter allows no clone)
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }
        if "LD_LIBRARY_PATH" in os.environ:  # some interpreters find libpython only through it
            environment["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        with tempfile.TemporaryFile() as progress_file:
            progress_file.truncate(_PROGRESS_BYTES)
            self._progress = memoryview(mmap.mmap(progress_file.fileno(), _PROGRESS_BYTES)).cast("d")
            fds = (child_end.fileno(), progress_file.fileno())
            configuration = {
                "connection_fd": fds[0], "progress_fd": fds[1], "timeout_s": settings.timeout_s,
                "memory_mb": settings.memory_mb, "modules": settings.modules, "python_layer": settings.python_layer,
                "import_paths": settings.import_paths, "private_dir": self.private_dir,
            }
            self.process = subprocess.Popen(
                # -s -S -P and no PYTHON* variables: only the standard library, this file and import_paths.
                [sys.executable, "-s", "-S", "-P", os.path.abspath(__file__), json.dumps(configuration)],
                env=environment,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # the terminal's Ctrl-C goes to the caller, who stops the pool
            )
        child_end.close()
        self.report: Isolation | None = None  # None until the worker has started
        self.start_deadline = time.monotonic() + _START_TIMEOUT_S
        self._chunk_size = 0
        self._position = 0
        self._since = time.monotonic()
        self._cpu_at_since: float | None = None

    def wait_until_ready(self) -> Isolation:
        """Wait for the worker's start-up report (sent before it runs any program, so trusted)."""
        if not self.connection.poll(max(0.0, self.start_deadline - time.monotonic())):
            self.end(patience=0.0)
            raise RuntimeError(f"sandbox worker did not start within {_START_TIMEOUT_S:g} s")
        try:
            report = json.loads(self.connection.recv_bytes(_MAX_READY_BYTES))
        except EOFError:
            raise RuntimeError(f"sandbox worker failed to start (exit code {self.end(patience=5.0)})") from None
        self.report = Isolation(tuple(report["os_layer"]), report["missing"], tuple(report["modules"]),
                                report["python_layer"])
        return self.report

    def send(self, programs: list[Program]) -> None:
        self._progress[0] = 0
        self._chunk_size = len(programs)
        self._position = 0
        self._mark()
        message = [[program.source, program.call, list(program.preceding)] for program in programs]
        self.connection.send_bytes(json.dumps(message).encode())

    def receive(self, count: int) -> list[SandboxResult]:
        """The results of the chunk sent; ValueError for a message no honest worker sends."""
        results = json.loads(self.connection.recv_bytes(count * _MAX_RESULT_BYTES))
        if not isinstance(results, list) or len(results) != count:
            raise ValueError("worker sent a malformed message")
        checked = []
        for result in results:
            if not (isinstance(result, list) and len(result) == 3 and result[0] in _STATUSES
                    and (result[1] is None or isinstance(result[1], str)) and isinstance(result[2], str)
                    and len(result[1] or "") <= MAX_VALUE_CHARS and len(result[2]) <= _MAX_DETAIL_CHARS):
                raise ValueError("worker sent a malformed message")
            checked.append(SandboxResult(*result))
        return checked

    def current(self) -> int:
        """Position in the chunk of the program running now (0 before the first starts)."""
        reported = self._progress[0]
        if math.isfinite(reported) and self._position < int(reported) <= self._chunk_size:
            self._position = int(reported)
            self._mark()
        return max(self._position - 1, 0)

    def _mark(self) -> None:
        self._since = time.monotonic()
        self._cpu_at_since = _cpu_seconds(self.process.pid)

    def next_check(self, cpu_s: float, stall_s: float) -> float:
        """When `overdue` could next become true (time.monotonic)."""
        self.current()
        stall_at = self._since + stall_s
        used = self._cpu_used(cpu_s)
        if used is None:  # not yet worth asking (see `_cpu_used`), or /proc cannot say
            return min(self._since + cpu_s, stall_at) if self._cpu_at_since is not None else stall_at
        return min(time.monotonic() + max(cpu_s - used, _MIN_CHECK_S), stall_at)

    def overdue(self, cpu_s: float, stall_s: float) -> str | None:
        """Why the program running now must be ended: "cpu" once it has used `cpu_s` of CPU time (the
        worker's own limits did not stop it), "stalled" once it has run `stall_s` of wall-clock time
        without that (stalled without CPU); None while neither holds."""
        self.current()
        used = self._cpu_used(cpu_s)
        if used is not None and used >= cpu_s:
            return "cpu"
        return "stalled" if time.monotonic() - self._since >= stall_s else None

    def _cpu_used(self, cpu_s: float) -> float | None:
        """CPU time the worker has used since the program running now started, as far as the parent
        saw; None before `cpu_s` of wall-clock time has passed (a worker has one thread, so it cannot
        have used more CPU time than that) or where /proc cannot say."""
        if self._cpu_at_since is None or time.monotonic() - self._since < cpu_s:
            return None
        now = _cpu_seconds(self.process.pid)
        return None if now is None else now - self._cpu_at_since

    def end(self, patience: float) -> int:
        """Wait up to `patience` seconds for the process to end, then kill it; remove its directory.
        Returns its return code (negative: the signal that ended it)."""
        self.connection.close()
        try:
            returncode = self.process.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
        shutil.rmtree(self.private_dir, ignore_errors=True)
        return returncode


# ---------------------------------------------------------------------------------------------
# Worker side, the Python layer. Everything below runs only in the worker processes.


class _Timeout(BaseException):
    """Raised by the timer; a BaseException so a program's `except Exception` does not swallow it."""


class _Forbidden(BaseException):
    """Raised for what the code-object check cannot see: `global`/`nonlocal` and large exponents,
    found in the syntax tree or, for a computed exponent, at run time."""


_armed = False  # the timer raises only while a program runs (a late signal must not hit the worker)
_printed: list[str] = []
_python_layer = True
_views: dict[str, ModuleType] = {}  # module name -> what `import` gives a program
_resets: dict[str, object] = {}  # top-level module name -> restores its global state
_allowed_packages: set[str] = set()  # the top-level names of the allowlist's entries
_imported: set[str] = set()  # top-level modules the running program imported
_imports_off = ""  # why no module may be imported, when none may


def _on_timer(signum, frame) -> None:
    if _armed:
        raise _Timeout


def _exponent(value):
    """Run-time guard for `x ** n` with a computed n (inserted by `_check_tree`)."""
    if isinstance(value, int) and abs(value) > MAX_EXPONENT:
        raise _Forbidden(f"integer exponent larger than {MAX_EXPONENT}")
    return value


def _pow(base, exp, mod=None):
    """pow() with the guard of `**`; a modular power is cheap at any exponent."""
    if mod is None:
        _exponent(exp)
    return pow(base, exp, mod)


def _print(*values, sep=" ", end="\n", flush=False) -> None:
    """print() into a buffer (`flush` accepted and ignored; `file` is not accepted)."""
    _printed.append((" " if sep is None else sep).join(map(str, values)) + ("\n" if end is None else end))


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    """`__import__` for programs: views of the allowed modules.

    C code imports through the `__import__` of the frame that called it, which is this one when a
    program calls numpy: an allowed package's own modules, private ones included, come from the real
    import system (a program cannot name them: the static check admits only `_views`' names).
    """
    top = name.partition(".")[0]
    if level == 0 and name in _views and top in _views:
        _imported.add(top)
        return _views[name] if fromlist else _views[top]
    if level == 0 and top in _allowed_packages:
        return builtins.__import__(name, globals, locals, fromlist, level)
    raise ImportError(f"import of {name!r} not allowed")


_BUILTINS = {
    **{
        name: getattr(builtins, name)
        for name in (
            "abs all any bool chr dict divmod enumerate filter float format frozenset int isinstance len "
            "list map max min next ord range repr reversed round set sorted str sum tuple zip "
            "ArithmeticError Exception IndexError KeyError OverflowError StopIteration TypeError "
            "ValueError ZeroDivisionError ImportError AttributeError NameError"
        ).split()
    },
    "pow": _pow,
    "print": _print,
}


def _covered(name: str, allowed: Sequence[str]) -> bool:
    """Whether the allowlist covers module `name`: an entry or a public submodule of one."""
    return any(name == entry or name.startswith(entry + ".") for entry in allowed) and not any(
        part.startswith("_") for part in name.split("."))


def _load_modules(allowed: Sequence[str]) -> None:
    """Import the allowed modules (before the OS layer closes: no file can be opened after it), build
    the views programs get, and note how to restore each one's global state.

    A view holds a module's public attributes; an attribute that is a module appears only if the
    allowlist covers it (its own view), so `fractions.sys` or `collections._sys` reach nothing. Its
    name is none in sys.modules: `from numpy import _core` falls back to sys.modules[name + "._core"]
    when the attribute is missing, which would hand over the real module.
    """
    for name in allowed:
        importlib.import_module(name)
        _allowed_packages.add(name.partition(".")[0])
    real = {name: module for name, module in sys.modules.items()
            if isinstance(module, ModuleType) and _covered(name, allowed)}
    _views.update({name: ModuleType(f"{name} (sandbox view)", getattr(module, "__doc__", None))
                   for name, module in real.items()})
    for name, module in real.items():
        public = {}
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            if isinstance(value, ModuleType):
                value = _views.get(value.__name__)
                if value is None:
                    continue
            public[key] = value
        vars(_views[name]).update(public)
        exported = getattr(module, "__all__", None)  # `from sympy import *` takes what sympy exports
        _views[name].__all__ = [key for key in exported if key in public] if isinstance(exported, (list, tuple)) else sorted(public)
    if "decimal" in real:
        decimal = real["decimal"]
        _resets["decimal"] = lambda: decimal.setcontext(decimal.Context())
    if "numpy" in real:
        numpy = real["numpy"]
        print_options, error_handling = numpy.get_printoptions(), numpy.geterr()

        def reset_numpy():
            numpy.set_printoptions(**print_options)
            numpy.seterr(**error_handling)

        _resets["numpy"] = reset_numpy


def _compile(source: str, capture_last: bool) -> CodeType:
    """Compile a program; raises _Forbidden for what only its syntax tree shows.

    Most programs (a function to call, no `**`) compile straight from source: parsing to a tree
    and compiling the tree costs about twice as much, and walking the tree as much again.
    """
    needs_check = _python_layer and _TREE_NEEDED.search(source) is not None
    if not capture_last and not needs_check:
        return compile(source, "<program>", "exec", dont_inherit=True)
    tree = ast.parse(source)
    if needs_check:
        _check_tree(tree)
    if capture_last:
        _capture_last_expression(tree)
    return compile(tree, "<program>", "exec", dont_inherit=True)


def _check_tree(tree: ast.Module) -> None:
    """Forbid `global` and `nonlocal`, and guard powers.

    `x ** n` is fine for a constant n with |n| <= 64 and forbidden for a larger one; a computed n
    is wrapped in a call of `_exponent` and checked at run time, since compound interest
    (`(1 + rate) ** years`) is common and legitimate in model code.
    """
    for node in ast.walk(tree):  # children are queued before a node is yielded: rewrites are not walked
        kind = type(node)
        if kind is ast.Global or kind is ast.Nonlocal:
            raise _Forbidden(f"{kind.__name__.lower()} statements not allowed")
        if kind is ast.BinOp and type(node.op) is ast.Pow:
            node.right = _guarded(node.right)
        elif kind is ast.AugAssign and type(node.op) is ast.Pow:
            node.value = _guarded(node.value)


def _guarded(exponent: ast.expr) -> ast.expr:
    """The exponent as it may run: a small constant as is, a computed one wrapped in the guard."""
    value = exponent
    if type(value) is ast.UnaryOp and type(value.op) in (ast.USub, ast.UAdd):
        value = value.operand  # `-2` is a unary minus applied to the constant 2
    if type(value) is ast.Constant and type(value.value) in (int, float, complex):
        if abs(value.value) > MAX_EXPONENT:
            raise _Forbidden(f"exponent larger than {MAX_EXPONENT}")
        return exponent
    call = ast.Call(ast.Name(_EXPONENT_CHECK, ast.Load()), [exponent], [])
    ast.copy_location(call.func, exponent)
    return ast.copy_location(call, exponent)


def _capture_last_expression(tree: ast.Module) -> None:
    """A bare expression as the last statement `e` becomes an assignment of `e` to _LAST_VALUE: a
    notebook shows that value as the cell's output."""
    if tree.body and type(tree.body[-1]) is ast.Expr:
        statement = tree.body[-1]
        target = ast.copy_location(ast.Name(_LAST_VALUE, ast.Store()), statement)
        tree.body[-1] = ast.copy_location(ast.Assign([target], statement.value), statement)


def _check(code: CodeType) -> str | None:
    """Why a compiled program is forbidden, or None.

    Checks the code objects (module, functions, lambdas, comprehensions) rather than the syntax
    tree: cheaper, and it sees exactly the names and operations that will run. Every name a
    program reads, writes or looks up as an attribute is in co_names, co_varnames, co_cellvars or
    co_freevars, so attributes and variables share one rule: names may start with one underscore
    (`for _ in range(n)` is everywhere in model code) but not with two. Objects of the allowed
    modules do have single-underscore attributes; the views hide the modules' own, and the OS layer
    contains what the rest reaches.
    """
    todo = [code]
    while todo:
        code = todo.pop()
        opcodes = set(code.co_code[::2])  # wordcode: (opcode, argument) byte pairs
        forbidden = opcodes & _FORBIDDEN_OPCODES.keys()
        if forbidden:
            return _FORBIDDEN_OPCODES[min(forbidden)]
        if _IMPORT_NAME in opcodes:
            for instruction in dis.get_instructions(code):
                if instruction.opcode == _IMPORT_NAME and instruction.argval not in _views:
                    return f"import of {instruction.argval!r} not allowed{_imports_off}"
        for name in (*code.co_names, *code.co_varnames, *code.co_cellvars, *code.co_freevars):
            if name in _FORBIDDEN_NAMES or (name.startswith("__") and name != _ALLOWED_DUNDER):
                return f"{name!r} not allowed"
        todo.extend(constant for constant in code.co_consts if type(constant) is CodeType)
    return None


def _run_one(source: str, call: str | None, preceding: list[str], timeout_s: float) -> tuple[str, str | None, str]:
    """(status, value, detail) for one program."""
    cells = [*preceding, source]
    if _python_layer and sum(map(len, cells)) > MAX_SOURCE_CHARS:
        return ("forbidden", None, f"program longer than {MAX_SOURCE_CHARS} characters")
    try:
        codes = [_compile(cell, capture_last=call is None and cell is cells[-1]) for cell in cells]
    except _Forbidden as exc:
        return ("forbidden", None, str(exc))
    except Exception as exc:  # SyntaxError; also ValueError (null bytes), RecursionError, MemoryError
        return ("error", None, _describe(exc))
    for code in codes if _python_layer else ():
        reason = _check(code)
        if reason:
            return ("forbidden", None, reason)
    outcome = _timed(codes, call, timeout_s)
    if outcome[0] == "error" and outcome[2].startswith("MemoryError"):
        # Garbage from an earlier program (reference cycles) may still hold memory; the result must
        # not depend on which programs ran before, so retry once from a clean heap.
        gc.collect()
        outcome = _timed(codes, call, timeout_s)
    if any("yield" in cell for cell in cells):
        # A generator left suspended in a reference cycle runs its cleanup (`finally`) whenever the
        # collector next finds it: during a later program, which would pay for it or be blamed for
        # its hang. Collect now, while this program is the one running (the kernel's CPU limit holds).
        gc.collect()
    return outcome


def _timed(codes: list[CodeType], call: str | None, timeout_s: float) -> tuple[str, str | None, str]:
    """Execute under the CPU timer in fresh globals; then restore what the program's modules keep.

    Neither the except clause nor the first statement of `finally` makes a call, so no timer signal
    can be handled (and raise) between the program's end and `_armed = False`.
    """
    global _armed
    if _python_layer:
        namespace = {"__builtins__": _BUILTINS, "math": math, _EXPONENT_CHECK: _exponent}
    else:
        namespace = {"__builtins__": {**vars(builtins), "print": _print}, "math": math}
    _printed.clear()
    _imported.clear()
    try:
        _armed = True
        signal.setitimer(signal.ITIMER_PROF, timeout_s, _REFIRE_S)
        outcome = _execute(codes, call, namespace)
        namespace.clear()  # under the timer: closing a generator may run the program's own code
    except (_Timeout, _Forbidden) as exc:
        outcome = exc
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        namespace.clear()  # also breaks function <-> globals cycles, so memory is freed now
        _printed.clear()
        for name in _imported:
            reset = _resets.get(name)
            if reset is not None:
                reset()
    if isinstance(outcome, _Timeout):
        return ("timeout", None, f"time limit of {timeout_s:g} s exceeded")
    if isinstance(outcome, _Forbidden):
        return ("forbidden", None, str(outcome))
    return outcome


def _execute(codes: list[CodeType], call: str | None, namespace: dict) -> tuple[str, str | None, str]:
    """Run the cells and read the answer; runs under the timer, including every str() of
    program-made objects."""
    try:
        for code in codes[:-1]:
            try:
                exec(code, namespace)
            except Exception:  # a notebook goes on after a cell's error, as the model saw it do
                pass
        _printed.clear()  # what earlier cells printed is not the last cell's output
        exec(codes[-1], namespace)
        if call is not None:
            function = namespace.get(call)
            if not callable(function):
                return ("error", None, f"no function named {call!r}")
            return _answer(function())
        value = namespace.get(_LAST_VALUE)
        if value is not None:
            return _answer(value)
        printed = "".join(_printed).strip()
        if printed:
            return _answer(printed.splitlines()[-1].strip())
        return ("no_output", None, "nothing printed and no bare last expression")
    except Exception as exc:
        return ("error", None, _describe(exc))


def _answer(value) -> tuple[str, str | None, str]:
    text = _without_addresses(str(value))
    if len(text) > MAX_VALUE_CHARS:
        return ("error", None, f"answer longer than {MAX_VALUE_CHARS} characters")
    return ("ok", text, "")


def _without_addresses(text: str) -> str:
    """Drop memory addresses (`<function f at 0x7f...>`): they differ from run to run."""
    return _ADDRESS.sub("", text) if " at 0x" in text else text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        message = f"{type(exc).__name__}: {exc.msg} (line {exc.lineno})"
    else:
        try:
            text = _without_addresses(str(exc))
        except Exception:  # the message of a program's exception may not build (a deeply nested list)
            text = ""
        message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message[:_MAX_DETAIL_CHARS]


# ---------------------------------------------------------------------------------------------
# Worker side, the OS layer.

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000  # <linux/sched.h>
_PR_SET_NO_NEW_PRIVS = 38  # <linux/prctl.h>
# <linux/landlock.h>; the system call numbers are the same on every architecture.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_READ_FILE, _LANDLOCK_READ_DIR = 1 << 2, 1 << 3
_OPEN_FILES = 32  # with the file-system view in force: enough for an import (a directory, a file)
# The parts of the OS layer, in the order the worker enters them. Without the network namespace,
# sockets are still denied twice (the filter, the open-files limit); without the file-system view
# no file can be opened at all, so modules cannot load their submodules lazily (some sympy functions
# fail). Imports need all the other parts.
_OS_PARTS = ("network namespace", "private directory", "private descriptors", "unprivileged user",
             "no new privileges", "file-system view", "resource limits", "seccomp filter")
_OPTIONAL_PARTS = frozenset({"network namespace", "file-system view"})
# What a computing interpreter does once started, found by tracing workers through the test suite
# (strace -f): read and write the descriptors it holds, manage memory, run its timer and signal
# handlers, read clocks and set its CPU limit, take futexes, end; and, with the file-system view, read
# the files of modules it loads lazily (open read-only, stat, list a directory). Names missing on an
# architecture are skipped. Everything else fails with EPERM.
_ALLOWED_SYSCALLS = (
    "read", "write", "readv", "writev", "close", "lseek",
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "setitimer", "getitimer",
    "clock_gettime", "clock_getres", "gettimeofday", "getrusage", "times", "getrlimit", "prlimit64",
    "getpid", "gettid", "getuid", "geteuid", "getgid", "getegid",
    "futex", "getrandom", "sched_yield", "restart_syscall", "exit", "exit_group",
)
_FILE_READING_SYSCALLS = ("fstat", "newfstatat", "statx", "getdents64", "getcwd", "readlink")
# openat is allowed without these flags only; ioctl only as TCGETS, which `open()` uses to ask
# whether a file is a terminal (TIOCSTI, which types into a terminal, stays denied).
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | (os.O_TMPFILE & ~os.O_DIRECTORY)
_TCGETS = 0x5401


def _enter_os_layer(private_dir: str, connection_fd: int, memory_mb: int) -> dict[str, str]:
    """Enter the OS layer part by part; returns {part: why it is missing} for the parts that failed.

    The order matters: the namespace and the user change need root (or a fresh user namespace);
    Landlock needs no-new-privileges; the limits come after the last descriptor is opened; the
    filter comes last, since it denies what the earlier parts call.
    """
    import ctypes

    try:
        import pyseccomp as seccomp  # now: it finds libseccomp by running ldconfig, which the limits stop
    except Exception as exc:  # not installed, or no libseccomp.so.2 on this machine
        seccomp, seccomp_missing = None, ImportError(f"pyseccomp: {_describe(exc)}")
    libc = ctypes.CDLL(None, use_errno=True)

    def call_libc(function, *args) -> int:
        result = function(*map(ctypes.c_long, args))
        if result < 0 or (result != 0 and function is not libc.syscall):
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))
        return result

    def restrict_file_system() -> None:
        _restrict_file_system(call_libc, libc.syscall, [path for path in sys.path if os.path.isdir(path)])

    def load_filter() -> None:
        if seccomp is None:
            raise seccomp_missing
        _load_syscall_filter(seccomp, file_reading="file-system view" not in missing)

    footprint = _address_space_bytes()
    steps = {
        "network namespace": lambda: call_libc(
            libc.unshare, _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET),
        "private directory": lambda: os.chdir(private_dir),
        "private descriptors": lambda: _keep_only_descriptor(connection_fd),
        "unprivileged user": _drop_privileges,
        "no new privileges": lambda: call_libc(libc.prctl, _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        "file-system view": restrict_file_system,
        "resource limits": lambda: _limit_resources(
            footprint + memory_mb * 2**20, 0 if "file-system view" in missing else _OPEN_FILES),
        "seccomp filter": load_filter,
    }
    missing = {}
    for part in _OS_PARTS:
        try:
            steps[part]()
        except Exception as exc:
            missing[part] = _describe(exc)
    return missing


def _address_space_bytes() -> int:
    """The worker's address space now (modules loaded), so that memory_mb is what programs may add."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * mmap.PAGESIZE
    except OSError:
        return 0


def _keep_only_descriptor(connection_fd: int) -> None:
    """stdin, stdout and stderr on /dev/null (the caller's stderr may be a terminal or a pipe), and
    no descriptor but the pipe to the parent."""
    null = os.open(os.devnull, os.O_RDWR)
    for standard in (0, 1, 2):
        os.dup2(null, standard)
    os.close(null)
    os.closerange(3, connection_fd)
    os.closerange(connection_fd + 1, os.sysconf("SC_OPEN_MAX"))


def _drop_privileges() -> None:
    """Become user and group 65534 with no supplementary groups, when root; a worker started as
    another user already is unprivileged."""
    if os.geteuid() != 0:
        return
    os.setgroups([])
    os.setresgid(_UNPRIVILEGED_ID, _UNPRIVILEGED_ID, _UNPRIVILEGED_ID)
    os.setresuid(_UNPRIVILEGED_ID, _UNPRIVILEGED_ID, _UNPRIVILEGED_ID)
    if os.getresuid() != (_UNPRIVILEGED_ID,) * 3 or os.getresgid() != (_UNPRIVILEGED_ID,) * 3:
        raise OSError("the user did not change")


def _restrict_file_system(call_libc, syscall, readable: list[str]) -> None:
    """Landlock: read files and list directories beneath `readable` (Python's library directories),
    and nothing else: every file-system access this kernel's Landlock knows (write, create, remove,
    rename, execute, truncate, device ioctl) is denied everywhere, reading elsewhere too.

    Written against the system calls (three of them): the PyPI binding is a pre-release that judges
    failure by errno alone, which a successful call leaves as it was.
    """
    abi = call_libc(syscall, _LANDLOCK_CREATE_RULESET, 0, 0, 1)  # flag 1: LANDLOCK_CREATE_RULESET_VERSION
    handled = (1 << 13) - 1  # ABI 1: execute, write_file, read_file, read_dir, remove_*, make_*
    handled |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    ruleset_attr = struct.pack("=Q", handled)  # struct landlock_ruleset_attr, its first field
    ruleset = call_libc(syscall, _LANDLOCK_CREATE_RULESET, _address_of(ruleset_attr), len(ruleset_attr), 0)
    try:
        for path in readable:
            directory = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                beneath = struct.pack("=Qi", _LANDLOCK_READ_FILE | _LANDLOCK_READ_DIR, directory)  # packed struct
                call_libc(syscall, _LANDLOCK_ADD_RULE, ruleset, 1, _address_of(beneath), 0)  # 1: PATH_BENEATH
            finally:
                os.close(directory)
        call_libc(syscall, _LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)


def _address_of(data: bytes) -> int:
    import ctypes

    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value


def _limit_resources(address_space: int, open_files: int) -> None:
    """Limits that hold for the worker's whole life; CPU time is limited per program in `_serve`."""
    limits = {
        resource.RLIMIT_AS: address_space,
        resource.RLIMIT_FSIZE: 0,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: open_files,  # descriptors already open (the pipe) keep working
        resource.RLIMIT_NPROC: 0,  # counts the processes of the worker's user: holds for non-root only
    }
    for kind, value in limits.items():
        _, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))


def _load_syscall_filter(seccomp: ModuleType, file_reading: bool) -> None:
    """The seccomp allowlist, through `pyseccomp` (libseccomp's Python API over the system's
    libseccomp.so.2). libseccomp also checks the architecture, so system calls of another ABI
    (i386's int 0x80) end the process. `file_reading`: allow what loading a module from a file takes
    (the file-system view decides where)."""
    rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    allowed = [(name, ()) for name in _ALLOWED_SYSCALLS]
    if file_reading:
        allowed += [(name, ()) for name in _FILE_READING_SYSCALLS]
        allowed += [("openat", (seccomp.Arg(2, seccomp.MASKED_EQ, _WRITE_FLAGS, 0),)),
                    ("ioctl", (seccomp.Arg(1, seccomp.EQ, _TCGETS),))]
    for name, conditions in allowed:
        if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0:
            rules.add_rule(seccomp.ALLOW, name, *conditions)
    rules.load()


def _serve(configuration: dict) -> None:
    """Worker main loop: enter both layers, report, then receive a chunk, run its programs, send
    their results; exit at end of input."""
    global _python_layer, _imports_off
    connection = Connection(configuration["connection_fd"])
    progress = memoryview(mmap.mmap(configuration["progress_fd"], _PROGRESS_BYTES)).cast("d")
    os.close(configuration["progress_fd"])
    timeout_s = configuration["timeout_s"]
    warnings.simplefilter("ignore")  # compile warnings would go to stderr, maybe a file (see FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails instead of killing
    signal.signal(signal.SIGPROF, _on_timer)
    # Errors in a generator's cleanup would each be reported on stderr, the caller's, without limit
    # (RLIMIT_FSIZE does not cover a terminal or a pipe). The hook drops them; it is a builtin, so
    # the timer's signal is never handled inside it (its exception would be reported instead).
    sys.unraisablehook = id
    # The compiler imports unicodedata to normalise non-ASCII names (`ｏｐｅｎ` is `open`); once the
    # open-files limit holds, that import would fail.
    import unicodedata  # noqa: F401

    sys.path.extend(configuration["import_paths"])
    _load_modules(configuration["modules"])
    missing = _enter_os_layer(configuration["private_dir"], configuration["connection_fd"], configuration["memory_mb"])
    required_missing = sorted(set(missing) - _OPTIONAL_PARTS)
    _python_layer = configuration["python_layer"]
    if required_missing and _views:
        _views.clear()
        _imports_off = f" (imports are off: the OS layer misses {', '.join(required_missing)})"
    elif _views:
        _BUILTINS["__import__"] = _import
    # sympy and numpy bring ~50,000 objects that live as long as the worker. Out of the collector's
    # sight, a full collection (after every program with a generator, see `_run_one`) costs
    # microseconds instead of tens to hundreds of milliseconds.
    gc.freeze()
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    connection.send_bytes(json.dumps({
        "os_layer": [part for part in _OS_PARTS if part not in missing],
        "missing": missing,
        "modules": [name for name in configuration["modules"] if name in _views],
        "python_layer": _python_layer,
    }).encode())
    while True:
        try:
            chunk = json.loads(connection.recv_bytes())
        except EOFError:
            return
        results = []
        for position, (source, call, preceding) in enumerate(chunk):
            progress[0] = position + 1
            # RLIMIT_CPU counts whole seconds: the program gets timeout_s + 0.25 to 1.25 s, so the
            # timer normally stops it first; the kernel stops what the timer cannot (a loop in C
            # code, or a program that swallows the timer's exception).
            cpu_limit = math.ceil(time.process_time() + timeout_s + _CPU_MARGIN_S)
            if cpu_hard == resource.RLIM_INFINITY or cpu_limit < cpu_hard:
                resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_hard))
            results.append(_run_one(source, call, preceding, timeout_s))
        connection.send_bytes(json.dumps(results).encode())


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
