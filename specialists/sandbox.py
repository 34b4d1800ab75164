"""Run untrusted, model-written programs in separate, resource-limited worker processes.

Model-written Python never runs in the calling process. A `Sandbox` keeps a pool of worker
processes, each a fresh interpreter running this file (standard library only), started with
`subprocess` rather than `multiprocessing`: the "spawn" and "forkserver" contexts re-import the
caller's `__main__` (torch, vLLM) into every worker, which costs seconds and gigabytes of address
space and would leave nothing under the worker's memory limit; fork is unsafe once the caller has
threads. A fresh interpreter is spawn without that re-import.

Layers of defence, each covering what the previous one cannot:
1. A static check rejects imports, class definitions, `global`/`nonlocal`, names and attributes
   starting with "__", frame-introspection attributes, attribute assignment, dangerous builtin
   names, class patterns and large integer exponents (status "forbidden"). The program then runs
   with a small whitelist of builtins, so whatever the check misses finds no `open` or `__import__`.
2. In the worker: a CPU-time timer interrupts Python-level loops (status "timeout"); rlimits bound
   address space (memory bombs raise MemoryError), file size, open files, child processes, and
   CPU time per program: the kernel ends a worker stuck in C code that never returns to the
   interpreter to see the timer (`sum(range(10**12))`). The worker gets none of the caller's
   environment variables and prints nothing to stderr on a program's behalf; a program's
   generators are cleaned up before the next program starts, so one program cannot make another
   slow or fail.
3. In the parent: when a worker dies, the program it was running is reported ("timeout" or
   "error"), the rest of its chunk is rerun in a fresh worker, so no result is lost. A wall-clock
   watchdog kills a worker that stalls without using CPU.

Throughput: programs are deduplicated per call and sent in chunks; a worker compiles a typical
program straight from source and checks the compiled code objects (about 40 us for a short
function, on one core); only programs that need a rewrite go through a syntax tree first.
Results cross back as JSON, never pickle, so a subverted worker cannot run code in the parent.
"""

from __future__ import annotations

import ast
import builtins
import dis
import gc
import json
import math
import mmap
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from types import CodeType
from typing import Literal

Status = Literal["ok", "timeout", "forbidden", "error", "no_output"]


@dataclass(frozen=True)
class Program:
    """A program to run. `call`: name of a zero-argument function defined by `source` whose return
    value is the answer; None: the answer is the last printed line, else the last expression's value."""

    source: str
    call: str | None = None


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    value: str | None = None  # str() of the answer when status == "ok"
    detail: str = ""


MAX_SOURCE_CHARS = 20_000
MAX_EXPONENT = 64  # |n| for integer exponents: 10**10**10 would hold the interpreter in C for hours
MAX_VALUE_CHARS = 10_000  # a longer answer is not a number; capping it bounds the result messages
_MAX_DETAIL_CHARS = 200
_REFIRE_S = 0.05  # the timer keeps firing after the limit, in case the program swallows the first one
_CPU_MARGIN_S = 0.25  # at least this much CPU time past timeout_s before the kernel ends a worker
_WALL_CLOCK_FACTOR = 10  # the parent's watchdog allows this many times a program's CPU allowance
_START_TIMEOUT_S = 60.0
_PROGRESS_BYTES = 16  # two doubles: 1 + position of the running program, its start time

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
_LAST_VALUE = "last value"  # where the last expression statement's value goes when `call` is None
_ALLOWED_DUNDER = "__annotations__"  # module-level annotations (`x: int = 1`) fill it
_FORBIDDEN_OPCODES = {
    dis.opmap[name]: reason
    for names, reason in [
        (("IMPORT_NAME", "IMPORT_FROM", "IMPORT_STAR"), "import not allowed"),
        (("LOAD_BUILD_CLASS",), "class definitions not allowed"),
        (("STORE_ATTR", "DELETE_ATTR"), "attribute assignment not allowed"),
        # `case C(attr=...)` reads attributes named by constants, out of sight of the name check
        (("MATCH_CLASS",), "class patterns not allowed"),
    ]
    for name in names
}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Sources whose syntax tree must be checked (see `_compile`).
_TREE_NEEDED = re.compile(r"\*\*|global|nonlocal")


# ---------------------------------------------------------------------------------------------
# Parent side: the pool.


class Sandbox:
    """A pool of worker processes that run programs; use as a context manager, or call `close()`.

    Safe for many `run()` calls in sequence (not from several threads at once). Results are
    deterministic: identical programs get identical results, and every program runs in fresh
    globals.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 1.0, memory_mb: int = 512, chunk_size: int = 256):
        if workers < 1 or timeout_s <= 0 or memory_mb < 64 or chunk_size < 1:
            raise ValueError(
                "Sandbox needs workers >= 1, timeout_s > 0, memory_mb >= 64 and chunk_size >= 1, got "
                f"workers={workers}, timeout_s={timeout_s}, memory_mb={memory_mb}, chunk_size={chunk_size}"
            )
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.chunk_size = chunk_size
        # Time limits count CPU time, so that results do not depend on the machine's load. The
        # wall-clock watchdog is only for a worker that stalls without using CPU: it can be generous.
        self._stall_s = _WALL_CLOCK_FACTOR * (timeout_s + _CPU_MARGIN_S + 1)
        self._workers: list[_Worker] = []
        try:
            self._workers = [_Worker(timeout_s, memory_mb) for _ in range(workers)]
            for worker in self._workers:
                worker.wait_until_ready()
        except BaseException:
            self.close()
            raise

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
        """Hand chunks (lists of indices into `unique`) to idle workers until all have results."""
        busy: dict[_Worker, list[int]] = {}
        while pending or busy:
            for worker in [worker for worker in self._workers if worker not in busy]:
                if pending:
                    chunk = pending.popleft()
                    try:
                        worker.send([unique[index] for index in chunk])
                    except OSError:  # died while idle (killed from outside): start another
                        worker.end(patience=1.0)
                        worker = self._replace(worker)
                        worker.send([unique[index] for index in chunk])
                    busy[worker] = chunk
            by_connection = {worker.connection: worker for worker in busy}
            nearest = min(worker.current_since() for worker in busy) + self._stall_s
            for connection in wait(list(by_connection), timeout=max(0.0, nearest - time.monotonic())):
                worker = by_connection[connection]
                chunk = busy.pop(worker)
                try:
                    for index, result in zip(chunk, worker.receive(), strict=True):
                        results[index] = SandboxResult(*result)
                except (EOFError, OSError):
                    self._recover(worker, chunk, pending, results, killed=False)
            for worker in [worker for worker in busy if worker.stuck(self._stall_s)]:
                self._recover(worker, busy.pop(worker), pending, results, killed=True)

    def _recover(self, worker: _Worker, chunk: list[int], pending: deque, results: list, killed: bool) -> None:
        """Blame the program the worker was running, requeue the rest of its chunk, replace it.

        The programs before the culprit had finished but their results died with the worker;
        running them again gives the same results.
        """
        position = worker.current()
        returncode = worker.end(patience=0.0 if killed else 1.0)
        self._replace(worker)
        if killed or returncode == -signal.SIGXCPU:  # SIGXCPU: the kernel's CPU-time limit
            results[chunk[position]] = SandboxResult("timeout", None, f"time limit of {self.timeout_s:g} s exceeded")
        else:
            how = (signal.strsignal(-returncode) or f"signal {-returncode}") if returncode < 0 else f"exit code {returncode}"
            results[chunk[position]] = SandboxResult("error", None, f"worker process died ({how})")
        rest = chunk[:position] + chunk[position + 1 :]
        if rest:
            pending.appendleft(rest)

    def _replace(self, worker: _Worker) -> _Worker:
        """Put a fresh worker in the place of the ended `worker`."""
        replacement = _Worker(self.timeout_s, self.memory_mb)
        replacement.wait_until_ready()
        self._workers[self._workers.index(worker)] = replacement
        return replacement


def run_programs(programs: Sequence[Program], **sandbox_kwargs) -> list[SandboxResult]:
    """Run `programs` in a Sandbox opened and closed for this call."""
    with Sandbox(**sandbox_kwargs) as sandbox:
        return sandbox.run(programs)


class _Worker:
    """One worker process: a duplex pipe for chunks and results, and a shared progress record.

    The progress record (a small file mapped by both processes) holds 1 + the position in the
    current chunk of the program the worker last started, and when it started (time.monotonic is
    system-wide), so the parent knows which program hangs or crashed, and since when, without a
    message per program.
    """

    def __init__(self, timeout_s: float, memory_mb: int):
        self.connection, child_end = Pipe(duplex=True)
        # No variables of the caller's: a format string reads what a builtin reaches without calling
        # anything ('{0.__globals__[os].environ}'.format(print)), so the worker holds no secrets.
        environment = {"PYTHONHASHSEED": "0"}  # the order of a printed set of strings must not vary
        if "LD_LIBRARY_PATH" in os.environ:  # some interpreters find libpython only through it
            environment["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        with tempfile.TemporaryFile() as progress_file:
            progress_file.truncate(_PROGRESS_BYTES)
            self._progress = memoryview(mmap.mmap(progress_file.fileno(), _PROGRESS_BYTES)).cast("d")
            fds = (child_end.fileno(), progress_file.fileno())
            self.process = subprocess.Popen(
                # -s -S -P and no PYTHON* variables: only the standard library and this file.
                [sys.executable, "-s", "-S", "-P", os.path.abspath(__file__), *map(str, fds), str(timeout_s), str(memory_mb)],
                env=environment,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # the terminal's Ctrl-C goes to the caller, who stops the pool
            )
        child_end.close()
        self._sent_at = time.monotonic()

    def wait_until_ready(self) -> None:
        if not self.connection.poll(_START_TIMEOUT_S):
            self.end(patience=0.0)
            raise RuntimeError(f"sandbox worker did not start within {_START_TIMEOUT_S:g} s")
        try:
            self.connection.recv_bytes()
        except EOFError:
            raise RuntimeError(f"sandbox worker failed to start (exit code {self.process.wait()})") from None

    def send(self, programs: list[Program]) -> None:
        self._progress[0] = 0
        self._sent_at = time.monotonic()
        self.connection.send_bytes(json.dumps([[program.source, program.call] for program in programs]).encode())

    def receive(self) -> list[list]:
        return json.loads(self.connection.recv_bytes())

    def current(self) -> int:
        """Position in the chunk of the program running now (0 before the first starts)."""
        return max(int(self._progress[0]) - 1, 0)

    def current_since(self) -> float:
        """When the program running now started (when the chunk was sent, before the first)."""
        return self._progress[1] if self._progress[0] else self._sent_at

    def stuck(self, limit_s: float) -> bool:
        """Whether the program running now has run for `limit_s` (and is still the same one)."""
        started = self._progress[0]
        return time.monotonic() - self.current_since() >= limit_s and self._progress[0] == started

    def end(self, patience: float) -> int:
        """Wait up to `patience` seconds for the process to end, then kill it. Returns its return
        code (negative: the signal that ended it)."""
        self.connection.close()
        try:
            return self.process.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# ---------------------------------------------------------------------------------------------
# Worker side. Everything below runs only in the worker processes.


class _Timeout(BaseException):
    """Raised by the timer; a BaseException so a program's `except Exception` does not swallow it."""


class _Forbidden(BaseException):
    """Raised for what the code-object check cannot see: `global`/`nonlocal` and large exponents,
    found in the syntax tree or, for a computed exponent, at run time."""


_armed = False  # the timer raises only while a program runs (a late signal must not hit the worker)
_printed: list[str] = []


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


_BUILTINS = {
    **{
        name: getattr(builtins, name)
        for name in (
            "abs all any bool chr dict divmod enumerate filter float format frozenset int isinstance len "
            "list map max min next ord range repr reversed round set sorted str sum tuple zip "
            "ArithmeticError Exception IndexError KeyError OverflowError StopIteration TypeError "
            "ValueError ZeroDivisionError"
        ).split()
    },
    "pow": _pow,
    "print": _print,
}


def _compile(source: str, call: str | None) -> CodeType:
    """Compile a program; raises _Forbidden for what only its syntax tree shows.

    Most programs (a function to call, no `**`) compile straight from source: parsing to a tree
    and compiling the tree costs about twice as much, and walking the tree as much again.
    """
    needs_check = _TREE_NEEDED.search(source) is not None
    if call is not None and not needs_check:
        return compile(source, "<program>", "exec", dont_inherit=True)
    tree = ast.parse(source)
    if needs_check:
        _check_tree(tree)
    if call is None:
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
    """Turn the last top-level expression statement `e` into an assignment of `e` to _LAST_VALUE."""
    for position in range(len(tree.body) - 1, -1, -1):
        statement = tree.body[position]
        if type(statement) is ast.Expr:
            target = ast.copy_location(ast.Name(_LAST_VALUE, ast.Store()), statement)
            tree.body[position] = ast.copy_location(ast.Assign([target], statement.value), statement)
            return


def _check(code: CodeType) -> str | None:
    """Why a compiled program is forbidden, or None.

    Checks the code objects (module, functions, lambdas, comprehensions) rather than the syntax
    tree: cheaper, and it sees exactly the names and operations that will run. Every name a
    program reads, writes or looks up as an attribute is in co_names, co_varnames, co_cellvars or
    co_freevars, so attributes and variables share one rule: names may start with one underscore
    (`for _ in range(n)` is everywhere in model code, and no object a program can reach has
    single-underscore attributes) but not with two.
    """
    todo = [code]
    while todo:
        code = todo.pop()
        opcodes = set(code.co_code[::2])  # wordcode: (opcode, argument) byte pairs
        forbidden = opcodes & _FORBIDDEN_OPCODES.keys()
        if forbidden:
            return _FORBIDDEN_OPCODES[min(forbidden)]
        for name in (*code.co_names, *code.co_varnames, *code.co_cellvars, *code.co_freevars):
            if name in _FORBIDDEN_NAMES or (name.startswith("__") and name != _ALLOWED_DUNDER):
                return f"{name!r} not allowed"
        todo.extend(constant for constant in code.co_consts if type(constant) is CodeType)
    return None


def _run_one(source: str, call: str | None, timeout_s: float) -> tuple[str, str | None, str]:
    """(status, value, detail) for one program."""
    if len(source) > MAX_SOURCE_CHARS:
        return ("forbidden", None, f"program longer than {MAX_SOURCE_CHARS} characters")
    try:
        code = _compile(source, call)
    except _Forbidden as exc:
        return ("forbidden", None, str(exc))
    except Exception as exc:  # SyntaxError; also ValueError (null bytes), RecursionError, MemoryError
        return ("error", None, _describe(exc))
    reason = _check(code)
    if reason:
        return ("forbidden", None, reason)
    outcome = _timed(code, call, timeout_s)
    if outcome[0] == "error" and outcome[2].startswith("MemoryError"):
        # Garbage from an earlier program (reference cycles) may still hold memory; the result must
        # not depend on which programs ran before, so retry once from a clean heap.
        gc.collect()
        outcome = _timed(code, call, timeout_s)
    if "yield" in source:
        # A generator left suspended in a reference cycle runs its cleanup (`finally`) whenever the
        # collector next finds it: during a later program, which would pay for it or be blamed for
        # its hang. Collect now, while this program is the one running (the kernel's CPU limit holds).
        gc.collect()
    return outcome


def _timed(code, call: str | None, timeout_s: float) -> tuple[str, str | None, str]:
    """Execute under the CPU timer in fresh globals.

    Neither the except clause nor the first statement of `finally` makes a call, so no timer signal
    can be handled (and raise) between the program's end and `_armed = False`.
    """
    global _armed
    namespace = {"__builtins__": _BUILTINS, "math": math, _EXPONENT_CHECK: _exponent}
    _printed.clear()
    try:
        _armed = True
        signal.setitimer(signal.ITIMER_PROF, timeout_s, _REFIRE_S)
        outcome = _execute(code, call, namespace)
        namespace.clear()  # under the timer: closing a generator may run the program's own code
    except (_Timeout, _Forbidden) as exc:
        outcome = exc
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        namespace.clear()  # also breaks function <-> globals cycles, so memory is freed now
        _printed.clear()
    if isinstance(outcome, _Timeout):
        return ("timeout", None, f"time limit of {timeout_s:g} s exceeded")
    if isinstance(outcome, _Forbidden):
        return ("forbidden", None, str(outcome))
    return outcome


def _execute(code, call: str | None, namespace: dict) -> tuple[str, str | None, str]:
    """Run the program and read its answer; runs under the timer, including every str() of
    program-made objects."""
    try:
        exec(code, namespace)
        if call is not None:
            function = namespace.get(call)
            if not callable(function):
                return ("error", None, f"no function named {call!r}")
            return _answer(function())
        printed = "".join(_printed).strip()
        if printed:
            return _answer(printed.splitlines()[-1].strip())
        if _LAST_VALUE in namespace:
            return _answer(namespace[_LAST_VALUE])
        return ("no_output", None, "nothing printed and no expression statement")
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


def _limit_resources(memory_mb: int) -> None:
    """Limits that hold for the worker's whole life; CPU time is limited per program in `_serve`."""
    limits = {
        resource.RLIMIT_AS: memory_mb * 2**20,
        resource.RLIMIT_FSIZE: 0,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: 0,  # descriptors already open (the pipe, the progress record) keep working
        resource.RLIMIT_NPROC: 0,
    }
    for kind, value in limits.items():
        _, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))


def _serve(connection_fd: int, progress_fd: int, timeout_s: float, memory_mb: int) -> None:
    """Worker main loop: receive a chunk, run its programs, send their results; exit at end of input."""
    connection = Connection(connection_fd)
    progress = memoryview(mmap.mmap(progress_fd, _PROGRESS_BYTES)).cast("d")
    os.close(progress_fd)
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
    _limit_resources(memory_mb)
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    connection.send_bytes(b"ready")
    while True:
        try:
            chunk = json.loads(connection.recv_bytes())
        except EOFError:
            return
        results = []
        for position, (source, call) in enumerate(chunk):
            progress[1] = time.monotonic()
            progress[0] = position + 1
            # RLIMIT_CPU counts whole seconds: the program gets timeout_s + 0.25 to 1.25 s, so the
            # timer normally stops it first; the kernel stops what the timer cannot (a loop in C
            # code, or a program that swallows the timer's exception).
            cpu_limit = math.ceil(time.process_time() + timeout_s + _CPU_MARGIN_S)
            if cpu_hard == resource.RLIM_INFINITY or cpu_limit < cpu_hard:
                resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_hard))
            results.append(_run_one(source, call, timeout_s))
        connection.send_bytes(json.dumps(results).encode())


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
