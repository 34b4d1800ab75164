"""The sandbox: answers in each mode, a corpus of escape attempts contained by each layer on its own,
the OS layer's parts seen from outside, allowed modules graded by their real results, and a pool that
survives it all."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings

import pytest

import specialists.sandbox as sandbox_module
from specialists.formats import FORMAT_SETS
from specialists.grading import grade_completions
from specialists.sandbox import (DEFAULT_MODULES, Program, Sandbox, SandboxIsolationWarning, SandboxResult,
                                 run_programs)

LIGHT = {"modules": ("math",)}  # pools for tests where modules do not matter start in a fraction of the time
TINYGSM = "def simple_math_problem():\n    apples = 7\n    apples = apples + 5\n    return apples"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=0.2) as pool:
        yield pool


def run(sandbox: Sandbox, source: str, call: str | None = None) -> SandboxResult:
    return sandbox.run([Program(source, call)])[0]


def test_call_mode_returns_the_functions_value(sandbox):
    assert run(sandbox, TINYGSM, call="simple_math_problem") == SandboxResult("ok", "12")
    assert run(sandbox, "def f():\n    return 7 / 2", call="f").value == "3.5"
    assert run(sandbox, "def f():\n    return 2 + 2 == 4", call="f").value == "True"


def test_call_mode_ignores_prints_and_needs_the_function(sandbox):
    assert run(sandbox, "print(99)\ndef f():\n    return 1", call="f").value == "1"
    missing = run(sandbox, "def g():\n    return 1", call="f")
    assert missing.status == "error" and "'f'" in missing.detail


def test_printed_line_mode_takes_the_last_printed_line(sandbox):
    assert run(sandbox, "x = 3\nprint('x is', x)\nprint(x * 2)\nprint()") == SandboxResult("ok", "6")
    assert run(sandbox, "print(1, 2, sep='-')\nx = 1").value == "1-2"


def test_last_expression_mode_is_what_a_notebook_cell_shows(sandbox):
    assert run(sandbox, "x = 3\nx / 2") == SandboxResult("ok", "1.5")
    assert run(sandbox, "total = 0\nfor _ in range(4):\n    total += 2\ntotal").value == "8"
    # A notebook shows the value after what the cell printed: it is the output's last line.
    assert run(sandbox, "print(1, 2, sep='-')\n5").value == "5"
    # Only the last statement counts, and a None value shows nothing (print() returns None).
    assert run(sandbox, "x = 3\nx\ny = 4\nprint(y)").value == "4"


def test_no_output(sandbox):
    assert run(sandbox, "x = 3").status == "no_output"
    assert run(sandbox, "def f():\n    return 1").status == "no_output"
    assert run(sandbox, "x = 3\nx\ny = 4").status == "no_output"  # the expression is not the last statement


def test_notebook_cells_share_state_and_the_last_cell_answers(sandbox):
    """OpenMathInstruct-1: the code blocks of one completion run as notebook cells."""
    cells = ["from fractions import Fraction\nrate = Fraction(1, 4)\nprint('rate', rate)",
             "price = 80\ndiscount = price * rate\ndiscount",
             "final = price - discount\nprint(final)"]
    assert run_notebook(sandbox, cells) == SandboxResult("ok", "60")
    # A cell's error does not stop the next (the notebook goes on); only the last cell's output counts.
    assert run_notebook(sandbox, ["a = 5\nprint(a)\n1 / 0", "a * 2"]) == SandboxResult("ok", "10")
    assert run_notebook(sandbox, ["print(99)", "b = 1"]).status == "no_output"
    assert run_notebook(sandbox, ["a = 1", "a / 0"]).status == "error"
    # Every cell is checked; the answer of a function call can come after earlier cells too.
    assert run_notebook(sandbox, ["import os", "1"]).status == "forbidden"
    assert sandbox.run([Program("def f():\n    return base * 3", call="f", preceding=("base = 14",))]) == [
        SandboxResult("ok", "42")]


def run_notebook(sandbox: Sandbox, cells: list[str]) -> SandboxResult:
    return sandbox.run([Program.notebook(cells)])[0]


def test_syntax_and_runtime_errors(sandbox):
    syntax = run(sandbox, "def f(:\n    return 1", call="f")
    assert syntax.status == "error" and syntax.detail.startswith("SyntaxError")
    assert run(sandbox, "1 / 0") == SandboxResult("error", None, "ZeroDivisionError: division by zero")
    assert run(sandbox, "return 5").status == "error"  # a compile-time SyntaxError


# Escape attempts: (name, source, the statuses it may end in with both layers). Each harms no more than
# this test process if it got out (no signal to every process, no PTRACE_ATTACH, which stops its target). With the OS layer
# alone any status will do: what counts is that nothing gets out. Placeholders in a source become
# expressions without quotes, so that they survive any nesting of strings: TARGET, a path in a directory
# anyone may write to, which the test then checks was not created; SECRET_FILE, a file anyone may read,
# whose text must not come back; PORT and ABSTRACT, a TCP port and an abstract Unix socket the test
# listens on. SECRET_NAME is an environment variable of the caller's.
SECRET_NAME, SECRET = "ECHOLAB_SANDBOX_SECRET", "do-not-leak-4f2a"
SECRET_FILE_TEXT = "file-secret-9b31"
FORBIDDEN = ("forbidden",)
ERROR = ("error",)  # e.g. a NameError: the builtins hold no os, sys or socket
TIMEOUT = ("timeout",)
STOPPED = ("timeout", "error")  # by the timer, the kernel's limits, a MemoryError or the worker's death
ANY = ("ok", "timeout", "forbidden", "error", "no_output")


def through_sympy(code: str) -> str:
    """A program the Python layer admits (it imports an allowed module and calls it) that runs `code`
    with the real builtins: sympy's `sympify` evaluates strings."""
    return f"import sympy\nsympy.sympify({f'exec({code!r})'!r})"


# Where the worker keeps its progress record and its pipe, for the attacks on the parent.
FIND_SERVE = "import sys\nframe = sys._getframe()\nwhile frame.f_code.co_name != '_serve':\n    frame = frame.f_back\n"
SWITCH_OFF_LIMITS = ("import signal, resource\nsignal.setitimer(signal.ITIMER_PROF, 0)\n"
                     "resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n")
ESCAPE_ATTEMPTS = [
    # files
    ("open", "open(TARGET, 'w').write('x')", FORBIDDEN),
    ("open_by_built_name", "getattr(__builtins__, 'op' + 'en')(TARGET, 'w')", FORBIDDEN),
    ("open_from_builtins_dict", "__builtins__['open'](TARGET, 'w')", FORBIDDEN),
    ("open_in_fullwidth_letters", "\uff4f\uff50\uff45\uff4e(TARGET, 'w')", FORBIDDEN),  # the parser reads `open`
    ("print_to_a_file", "print('x', file=open(TARGET, 'w'))", FORBIDDEN),
    ("pathlib", "import pathlib\npathlib.Path(TARGET).write_text('x')", FORBIDDEN),
    ("fileio_from_subclasses",
     "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'FileIO'][0](TARGET, 'w')", FORBIDDEN),
    # processes and the interpreter
    ("os_system", "import os\nos.system('touch ' + TARGET)", FORBIDDEN),
    ("from_import", "from os import system\nsystem('touch ' + TARGET)", FORBIDDEN),
    ("star_import", "from os import *\nsystem('touch ' + TARGET)", FORBIDDEN),
    ("subprocess", "import subprocess\nsubprocess.run(['touch', TARGET])", FORBIDDEN),
    ("dunder_import", "__import__('os').system('touch ' + TARGET)", FORBIDDEN),
    ("importlib", "import importlib\nimportlib.import_module('os').system('touch ' + TARGET)", FORBIDDEN),
    ("ctypes", "import ctypes\nctypes.CDLL(None).system(('touch ' + TARGET).encode())", FORBIDDEN),
    ("os_without_import", "os.system('touch ' + TARGET)", ERROR),
    ("sys_modules", "sys.modules['os'].system('touch ' + TARGET)", ERROR),
    ("fork", "import os\nif os.fork() == 0:\n    open(TARGET, 'w')", FORBIDDEN),
    ("eval_string", "eval('op' + 'en(' + repr(TARGET) + ', \"w\")')", FORBIDDEN),
    ("exec_string", "exec('import os')", FORBIDDEN),
    ("compile_string", "compile('import os', 'x', 'exec')", FORBIDDEN),
    ("breakpoint", "breakpoint()", FORBIDDEN),
    # the caller (the test process going on is the check) and the worker itself
    ("kill_the_parent", "import os\nos.kill(os.getppid(), 9)", FORBIDDEN),
    ("kill_the_parent_without_import", "os.kill(os.getppid(), 9)", ERROR),
    ("exit", "exit(1)", FORBIDDEN),
    ("sys_exit", "sys.exit(1)", FORBIDDEN),  # `exit` is a forbidden name, as an attribute too
    ("os_exit", "import os\nos._exit(0)", FORBIDDEN),
    ("raise_system_exit", "raise SystemExit(1)", ERROR),
    ("ignore_the_timer", "import signal\nsignal.signal(signal.SIGPROF, signal.SIG_IGN)\nwhile True:\n    pass",
     FORBIDDEN),
    ("raise_limits", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", FORBIDDEN),
    # network and environment
    ("socket", "import socket\nsocket.create_connection(('127.0.0.1', 22))", FORBIDDEN),
    ("socket_without_import", "socket.socket()", ERROR),
    ("environment", f"import os\nprint(os.environ[{SECRET_NAME!r}])", FORBIDDEN),
    # a format string reads attributes by name, unseen by the static check, but calls nothing
    ("environment_through_a_format_string", "print('{0.__globals__[os].environ}'.format(print))", ("ok",)),
    ("secret_through_a_format_string", f"print('{{0.__globals__[os].environ[{SECRET_NAME}]}}'.format(print))", ERROR),
    # introspection
    ("builtins", "__builtins__", FORBIDDEN),
    ("subclasses", "().__class__.__base__.__subclasses__()", FORBIDDEN),
    ("mro", "().__class__.mro()", FORBIDDEN),
    ("function_globals", "print.__globals__['os']", FORBIDDEN),
    ("getattr_of_a_built_name", "getattr(print, '__glo' + 'bals__')", FORBIDDEN),
    ("globals", "globals()['__builtins__']", FORBIDDEN),
    ("type", "type(1)", FORBIDDEN),
    ("getattr", "getattr(1, 'real')", FORBIDDEN),
    ("generator_frame", "def g():\n    yield g2.gi_frame.f_back\ng2 = g()\nnext(g2)", FORBIDDEN),
    ("generator_frame_globals", "def g():\n    yield 1\nit = g()\nit.gi_frame.f_globals['os']", FORBIDDEN),
    ("traceback_frame",
     "try:\n    1 / 0\nexcept ZeroDivisionError as error:\n    error.__traceback__.tb_frame.f_back.f_globals",
     FORBIDDEN),
    ("class", "class A:\n    def __del__(self):\n        pass", FORBIDDEN),
    ("class_pattern", "match ():\n    case tuple(__class__=c):\n        c", FORBIDDEN),
    ("attribute_assignment", "math.pi = 3", FORBIDDEN),
    ("global", "x = 1\ndef f():\n    global x\n    x = 2", FORBIDDEN),
    ("nonlocal", "def f():\n    x = 1\n    def g():\n        nonlocal x\n        x = 2", FORBIDDEN),
    ("shadow_the_exponent_guard", "__exponent = abs\nn = 10**9\n7 ** n", FORBIDDEN),
    ("shadow_the_exponent_guard_in_fullwidth", "__\uff45xponent = abs\nn = 10**9\n7 ** n", FORBIDDEN),
    ("source_too_long", "x = 1\n" * 10_000, FORBIDDEN),
    # time
    ("infinite_loop", "while True:\n    pass", TIMEOUT),
    ("swallowed_timeout", "while True:\n    try:\n        while True:\n            pass\n    except:\n        pass",
     TIMEOUT),
    ("power_tower", "10**10**10", FORBIDDEN),
    ("huge_constant_power", "2 ** 100", FORBIDDEN),
    ("huge_computed_power", "n = 10**9\n2 ** n", FORBIDDEN),
    ("small_computed_power", "n = 100\n2 ** n", FORBIDDEN),
    ("augmented_power", "x = 3\nx **= 1000", FORBIDDEN),
    ("pow", "pow(2, 10**9)", FORBIDDEN),
    ("repeated_squaring", "x = 10\nfor _ in range(40):\n    x = x * x", STOPPED),
    ("shift_then_square", "x = 1 << 10**9\nx * x", STOPPED),
    ("factorial", "math.factorial(10**8)", STOPPED),
    # memory and output
    ("list_bomb", "x = [0] * (10**9)", STOPPED),
    ("string_bomb", "'a' * 10**10", STOPPED),
    ("repeated_string_bomb", "x = 'ab' * (10**9)", STOPPED),
    ("bytes_bomb", "(1).to_bytes(10**9, 'big')", STOPPED),
    ("padding_bomb", "'{:>10000000000}'.format(1)", STOPPED),
    ("print_gigabytes", "while True:\n    print('x' * 10**6)", STOPPED),
    ("huge_answer", "print('7' * 10**6)", ERROR),
    # recursion and stack
    ("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", ERROR),
    ("deep_nesting_in_the_source", "-" * 15_000 + "1 ** 2", ERROR),
    ("error_message_that_cannot_be_built", "x = []\nfor _ in range(10**5):\n    x = [x]\nraise ValueError(x)", ERROR),
    ("c_stack_overflow", "x = ()\nfor _ in range(10**5):\n    x = (x,)\n{x}", STOPPED),  # hashing recurses in C
    # Only the OS layer can stop these: they pass the Python layer (an allowed module's escape hatch).
    ("sympy_runs_a_shell_command", through_sympy("import os\nos.system('touch ' + TARGET)"), ANY),
    ("sympy_writes_a_file", through_sympy("open(TARGET, 'w').write('x')"), ANY),
    ("sympy_reads_a_file", through_sympy("print(open(SECRET_FILE).read())"), ANY),
    ("sympy_reads_the_password_file", through_sympy("print(open('/etc/passwd').read())"), ANY),
    ("sympy_writes_its_own_memory", through_sympy("open('/proc/self/mem', 'r+b')"), ANY),
    ("sympy_forks", through_sympy("import os\nif os.fork() == 0:\n    open(TARGET, 'w')\n    os._exit(0)"), ANY),
    ("sympy_execs_a_shell", through_sympy("import os\nos.execv('/bin/sh', ['sh', '-c', 'touch ' + TARGET])"), ANY),
    ("sympy_ctypes_system", through_sympy("import ctypes\nctypes.CDLL(None).system(('touch ' + TARGET).encode())"), ANY),
    ("sympy_ctypes_fork", through_sympy("import ctypes, os\nif ctypes.CDLL(None).fork() == 0:\n    os._exit(0)"), ANY),
    # PTRACE_SEIZE (0x4206) would make the worker this process's tracer without stopping it.
    ("sympy_ptrace_the_parent", through_sympy("import ctypes, os\nctypes.CDLL(None).ptrace(0x4206, os.getppid(), 0, 0)"),
     ANY),
    ("sympy_connects_over_tcp", through_sympy("import socket\nsocket.create_connection(('127.0.0.1', PORT))"), ANY),
    ("sympy_connects_to_an_abstract_socket",
     through_sympy("import socket\nsocket.socket(socket.AF_UNIX).connect(ABSTRACT)"), ANY),
    ("sympy_signals_the_parent", through_sympy("import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)"), ANY),
    ("sympy_types_into_a_terminal",  # TIOCSTI on the caller's stderr would run commands in its shell
     through_sympy("import ctypes\nctypes.CDLL(None).ioctl(2, 0x5412, ctypes.c_char_p(b'x'))"), ANY),
    # It switches off its timer and CPU limit (the parent's CPU watchdog ends it) and writes NaN as its
    # position: a parent that believed the record would never blame it.
    ("sympy_forges_its_progress",
     through_sympy(FIND_SERVE + SWITCH_OFF_LIMITS + "frame.f_locals['progress'][0] = float('nan')\nwhile True:\n    pass"),
     TIMEOUT),
    ("sympy_sends_garbage_to_the_parent",
     through_sympy(FIND_SERVE + "frame.f_locals['connection'].send_bytes(b'not json')\nwhile True:\n    pass"), ERROR),
    ("sympy_sends_an_endless_message",
     through_sympy(FIND_SERVE + "import os\nos.write(frame.f_locals['connection'].fileno(), b'\\x7f' * 4)"
                   "\nwhile True:\n    pass"), ANY),
    ("update_wrapper_replaces_a_library_function",  # stdlib modules alone get past the Python layer
     "import functools, statistics\n"
     "functools.update_wrapper(statistics.mean, lambda data: sys.modules['os'].system('touch ' + TARGET), "
     "('__code__',), ())\nstatistics.mean([1])", ANY),
    # what a program leaves behind: generators whose cleanup runs when they are collected
    ("cleanup_that_hangs_a_later_program", """\
def g(cycle):
    try:
        yield 1
    finally:
        while True:
            try:
                while True:
                    pass
            except:
                pass
cycle = []
it = g(cycle)
cycle.append(it)
next(it)""", TIMEOUT),
    ("cleanup_errors_written_to_stderr", """\
def g():
    try:
        yield 1
    finally:
        1 / 0
while True:
    it = g()
    next(it)
    del it""", TIMEOUT),
]
# Attempts that change their worker for later programs (a function's code, a module's attribute):
# contained, but the worker is replaced afterwards so that the next attempt meets a fresh one.
CHANGES_ITS_WORKER = {"update_wrapper_replaces_a_library_function", "attribute_assignment"}
# An ordinary program that allocates enough to start a garbage collection, which would meet what an
# attempt left behind.
ORDINARY = Program("rows = [[n] for n in range(1000)]\nprint(len(rows))")


def tracer_of_this_process() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("TracerPid:")).split()[1])


def kill_workers(pool: Sandbox) -> None:
    """Kill the pool's workers from outside; it starts fresh ones for its next run. A worker still
    starting (replacing one that died) is let finish first: the pool takes a failed start as fatal."""
    for worker in pool._workers:
        if worker.report is None:
            worker.wait_until_ready()
        worker.process.kill()
        worker.process.wait()


def as_expression(text: str) -> str:
    """`text` as an expression without quotes, which any nesting of strings leaves intact."""
    return f"str().join(map(chr, {tuple(map(ord, text))}))"


@contextlib.contextmanager
def stderr_redirected_to(fd: int):
    """Make `fd` this process's stderr, which workers started meanwhile inherit."""
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Watch:
    """A pool, and everything an escape attempt could reach, watched: a directory anyone may write to
    (the targets), a secret file anyone may read, a TCP port and an abstract Unix socket this process
    listens on, this process's SIGUSR1, a pipe as the workers' stderr (under pytest's capture stderr
    is a file, which RLIMIT_FSIZE already closes to workers; a pipe or a terminal it does not), and a
    secret in this process's environment."""

    def __init__(self, python_layer: bool):
        self.directory = tempfile.mkdtemp(prefix="echolab-escape-")
        os.chmod(self.directory, 0o777)  # so that only the sandbox, not file permissions, stops a write
        self.secret_file = os.path.join(self.directory, "secret")
        with open(self.secret_file, "w") as secret:
            secret.write(SECRET_FILE_TEXT)
        os.chmod(self.secret_file, 0o644)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.abstract_address = f"\0echolab-sandbox-test-{os.getpid()}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_address)
        self.abstract.listen()
        for listener in (self.tcp, self.abstract):
            listener.setblocking(False)
        self.signals: list[int] = []
        self.previous_handler = signal.signal(signal.SIGUSR1, lambda number, frame: self.signals.append(number))
        self.stderr_read_end, self.stderr_write_end = os.pipe()
        os.set_blocking(self.stderr_read_end, False)
        with stderr_redirected_to(self.stderr_write_end):
            self.pool = Sandbox(workers=2, timeout_s=0.1, python_layer=python_layer)

    def source(self, template: str, target: str) -> str:
        for placeholder, value in [("SECRET_FILE", as_expression(self.secret_file)), ("TARGET", as_expression(target)),
                                   ("PORT", str(self.tcp.getsockname()[1])),
                                   ("ABSTRACT", as_expression(self.abstract_address))]:
            template = template.replace(placeholder, value)
        return template

    def connections(self) -> int:
        count = 0
        for listener in (self.tcp, self.abstract):
            with contextlib.suppress(BlockingIOError):
                listener.accept()[0].close()
                count += 1
        return count

    def stderr(self) -> bytes:
        try:
            return os.read(self.stderr_read_end, 1 << 16)
        except BlockingIOError:  # nothing written
            return b""

    def processes_started(self) -> list[int]:
        """Processes whose parent or session is a worker: whatever a worker started. A worker that is
        still starting (replacing one an attempt ended) has run no program; it runs ldconfig (pyseccomp
        finds libseccomp that way), and is left out."""
        workers = {worker.process.pid for worker in self.pool._workers}
        starting = {worker.process.pid for worker in self.pool._workers if worker.report is None}
        started = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in workers:
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        fields = stat.read().rpartition(")")[2].split()  # state, ppid, pgrp, session, ...
                except OSError:
                    continue
                if (int(fields[1]) in workers or int(fields[3]) in workers) and int(fields[1]) not in starting:
                    started.append(int(entry))
        return started

    def close(self) -> None:
        self.pool.close()
        signal.signal(signal.SIGUSR1, self.previous_handler)
        for listener in (self.tcp, self.abstract):
            listener.close()
        os.close(self.stderr_read_end)
        os.close(self.stderr_write_end)
        shutil.rmtree(self.directory)


@pytest.fixture(scope="module", params=[True, False], ids=["both_layers", "os_layer_alone"])
def watch(request):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_NAME, SECRET)
        watch = Watch(python_layer=request.param)
        yield watch
    watch.close()


@pytest.mark.parametrize("name, source, allowed", ESCAPE_ATTEMPTS, ids=[attempt[0] for attempt in ESCAPE_ATTEMPTS])
def test_an_escape_attempt_is_contained(watch, name, source, allowed):
    """With both layers it ends in an allowed status; with either, in bounded time without the stall
    watchdog (the CPU-time limits end it), with no file written, no secret read, no connection, no process
    started, no signal to this process, nothing on stderr, and the pool still answering an ordinary program."""
    pool = watch.pool
    target = os.path.join(watch.directory, f"escaped-{name}")
    stalls = pool.stalls
    with stderr_redirected_to(watch.stderr_write_end):  # workers started to replace dead ones inherit it too
        [result] = pool.run([Program(watch.source(source, target))])
        if name in CHANGES_ITS_WORKER:
            kill_workers(pool)
        after = pool.run([ORDINARY])
    if pool.isolation.python_layer:
        assert result.status in allowed, result
    assert pool.stalls == stalls
    assert sorted(os.listdir(watch.directory)) == ["secret"]
    assert all(os.listdir(worker.private_dir) == [] for worker in pool._workers)
    assert SECRET not in f"{result.value} {result.detail}" and SECRET_FILE_TEXT not in f"{result.value} {result.detail}"
    assert watch.connections() == 0
    assert watch.processes_started() == []
    assert watch.signals == []
    assert tracer_of_this_process() == 0
    assert watch.stderr() == b""
    assert after == [SandboxResult("ok", "1000")]


def test_the_stall_watchdog_ends_a_worker_that_stops_using_cpu():
    """A worker stopped from outside (SIGSTOP) mid-program uses no CPU time, so only the wall-clock watchdog can
    end it: the program times out, the pool counts the stall and answers the next program."""
    with Sandbox(workers=1, timeout_s=30.0, **LIGHT) as pool:
        pool._stall_s = 2.0  # the watchdog's allowance, shortened for the test (30 s of CPU are never reached)
        stop = threading.Timer(0.5, lambda: os.kill(pool._workers[0].process.pid, signal.SIGSTOP))
        stop.start()
        [result] = pool.run([Program("while True:\n    pass")])
        stop.join()
        assert result.status == "timeout" and pool.stalls == 1
        assert pool.run([ORDINARY]) == [SandboxResult("ok", "1000")] and pool.stalls == 1


def test_ordinary_model_code_is_allowed(sandbox):
    programs = [
        Program("rate = 0.05\nyears = 3\nprint(round(1000 * (1 + rate) ** years, 2))"),  # computed exponent
        Program("print(math.sqrt(16) + abs(-2) + 2 ** 10)"),
        Program("values = sorted([3, 1, 2])\nprint(sum(v for v in values if v > 1))"),
        Program("try:\n    x = 1 / 0\nexcept ZeroDivisionError:\n    x = 7\nprint(x)"),
        Program("double = lambda n: n * 2\nprint(double(21))"),
        Program("price: float = 2.5\nprint(f'{price * 4:.1f}')"),
        Program("def f():\n    return pow(3, 4) + pow(2, 10**6, 7)", call="f"),
    ]
    assert [result.value for result in sandbox.run(programs)] == ["1157.63", "1030.0", "5", "7", "42", "10.0", "83"]


def test_programs_do_not_share_state(sandbox):
    first, second = sandbox.run([Program("x = 5\nprint(x)"), Program("print(x)")])
    assert first.value == "5"
    assert second.status == "error" and second.detail.startswith("NameError")


def test_a_hang_in_c_code_loses_no_other_result(sandbox):
    """`sum(range(...))` never returns to the interpreter, so only the kernel's CPU limit stops it."""
    batch = [Program(f"print({n})") for n in range(10)]
    batch.insert(5, Program("sum(range(10**15))"))
    results = sandbox.run(batch)
    assert results[5].status == "timeout"
    assert [result.value for result in results[:5] + results[6:]] == [str(n) for n in range(10)]


def test_a_modest_list_fits_under_the_memory_limit(sandbox):
    assert run(sandbox, "x = [0] * (10**6)\nprint(len(x))").value == "1000000"


def test_a_worker_crash_blames_one_program_and_loses_no_other_result():
    batch = [Program("print(1)"), Program("s = 0\nfor i in range(10**9):\n    s += i"), Program("print(3)")]
    with Sandbox(workers=1, timeout_s=10.0, **LIGHT) as pool:
        worker = pool._workers[0]

        def crash_during_the_second_program():
            while worker.current() != 1:
                time.sleep(0.01)
            os.kill(worker.process.pid, signal.SIGSEGV)

        threading.Thread(target=crash_during_the_second_program, daemon=True).start()
        first, crashed, third = pool.run(batch)
    assert (first.value, third.value) == ("1", "3")
    assert crashed.status == "error" and "worker process died" in crashed.detail


def test_a_dead_worker_is_replaced(sandbox):
    kill_workers(sandbox)
    assert run(sandbox, "print(3)").value == "3"


def test_mixed_batch_keeps_order_and_duplicates_agree(sandbox):
    kinds = [
        Program(TINYGSM, call="simple_math_problem"),
        Program("import os"),
        Program("1 / 0"),
        Program("x = 1"),
        Program("print('done')"),
    ]
    batch = [kinds[index % len(kinds)] for index in range(1000)]
    results = sandbox.run(batch)
    expected = ["ok", "forbidden", "error", "no_output", "ok"]
    assert [result.status for result in results] == [expected[index % len(kinds)] for index in range(1000)]
    assert all(results[index] == results[index % len(kinds)] for index in range(1000))
    assert sandbox.run(batch) == results  # deterministic


def test_large_batches_are_split_into_chunks(sandbox):
    batch = [Program(f"def f():\n    return {n} * 2", call="f") for n in range(3000)]
    assert [result.value for result in sandbox.run(batch)] == [str(n * 2) for n in range(3000)]


def test_run_programs_and_closing():
    assert run_programs([Program("print(1)")], workers=1, **LIGHT) == [SandboxResult("ok", "1")]
    pool = Sandbox(workers=1, **LIGHT)
    assert pool.run([]) == []
    pool.close()
    with pytest.raises(RuntimeError):
        pool.run([Program("print(1)")])


def test_answers_do_not_vary_between_worker_processes():
    """Separate pools are separate processes: string hashing and object addresses must not show."""
    programs = [
        Program("print({'apple', 'banana', 'cherry', 'date', 'elderberry'})"),
        Program("def f():\n    return 1\nprint(f)"),
    ]
    first, second = run_programs(programs, workers=1, **LIGHT), run_programs(programs, workers=1, **LIGHT)
    assert first == second
    assert first[1].value == "<function f>"


def test_the_os_layer_is_in_force_in_every_worker(sandbox):
    """Each part, seen from outside the worker (/proc), not taken from the worker's own report."""
    assert sandbox.isolation.complete, sandbox.isolation.missing
    assert sandbox.isolation.modules == DEFAULT_MODULES
    our_network = os.readlink("/proc/self/ns/net")
    for worker in sandbox._workers:
        pid = worker.process.pid
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status.read().splitlines())
        assert fields["Uid"].split() == ["65534"] * 4 and fields["Gid"].split() == ["65534"] * 4
        assert fields["Groups"].split() == []
        assert fields["NoNewPrivs"].strip() == "1"
        assert fields["Seccomp"].strip() == "2"  # a filter
        assert fields["CapEff"].strip() == "0" * 16
        assert os.readlink(f"/proc/{pid}/ns/net") != our_network
        assert os.readlink(f"/proc/{pid}/cwd") == worker.private_dir and os.listdir(worker.private_dir) == []
        descriptors = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert [descriptors.pop(fd) for fd in (0, 1, 2)] == ["/dev/null"] * 3
        assert list(descriptors.values()) == [descriptors[min(descriptors)]] and "socket:" in descriptors[min(descriptors)]
        with open(f"/proc/{pid}/limits") as limits:
            soft = {line[:26].strip(): line[26:47].strip() for line in limits.read().splitlines()[1:]}
        assert (soft["Max processes"], soft["Max open files"], soft["Max file size"], soft["Max core file size"]) == (
            "0", "32", "0", "0")


def test_the_file_system_view_is_read_only_beneath_python(sandbox):
    """Through sympy (past the Python layer): an installed module's source can be read (sympy loads
    submodules lazily), nothing else, and nothing written. /etc/passwd is readable to user 65534, so
    the denial there is Landlock's."""
    def attempt(code: str) -> SandboxResult:
        return run(sandbox, through_sympy(code) + "\nprint(outcome)".replace("outcome", "'no exception'"))

    readable = attempt("import sympy\nprint(len(open(sympy.__file__).read()) > 1000)")
    assert readable == SandboxResult("ok", "no exception")  # the last printed line; True was printed before
    for code in ["open('/etc/passwd').read()", "import os\nos.listdir('/')", "open('/tmp/x', 'w')",
                 "import sympy, os\nopen(os.path.dirname(sympy.__file__) + '/escaped', 'w')"]:
        result = attempt(code)
        assert result.status == "error" and "PermissionError" in result.detail, (code, result)


# Real solutions that import allowed modules, in the two code formats, and their gold answers.
REAL_SOLUTIONS = [
    ("def simple_math_problem():\n    import math\n    return math.ceil(25 / 6)", 5.0),
    ("def simple_math_problem():\n    from fractions import Fraction\n    share = Fraction(3, 8) * 64\n"
     "    return int(share)", 24.0),
    ("def simple_math_problem():\n    import statistics\n    return statistics.median([3, 9, 4, 7])", 5.5),
    ("def simple_math_problem():\n    from decimal import Decimal\n    return float(Decimal('19.99') * 3)", 59.97),
    ("<llm-code>\nfrom sympy import symbols, Eq, solve\nx = symbols('x')\nsolution = solve(Eq(3 * x + 7, 22), x)\n"
     "print(solution[0])\n</llm-code>\n<llm-code-output>\n5\n</llm-code-output>", 5.0),
    ("<llm-code>\nimport numpy as np\nprices = np.array([4, 6, 5])\nprint(prices.mean() * 2)\n</llm-code>", 10.0),
    ("<llm-code>\nfrom itertools import combinations\nfrom collections import Counter\n"
     "pairs = [a + b for a, b in combinations(range(1, 5), 2)]\nprint(Counter(pairs)[5])\n</llm-code>", 2.0),
    ("<llm-code>\nimport re\nfrom functools import reduce\nnumbers = [int(n) for n in re.findall(r'\\d+', 'a3b4c5')]\n"
     "print(reduce(lambda a, b: a * b, numbers))\n</llm-code>", 60.0),
    ("<llm-code>\nimport cmath, numbers\nroot = cmath.sqrt(-16)\nprint(int(root.imag) if isinstance(root, numbers.Complex) "
     "else 0)\n</llm-code>", 4.0),
]


def test_completions_importing_allowed_modules_are_graded_by_their_real_result(sandbox):
    texts, golds = [text for text, _ in REAL_SOLUTIONS], [gold for _, gold in REAL_SOLUTIONS]
    grades = grade_completions(texts, golds, FORMAT_SETS["synthetic"], sandbox)
    assert [(grade.format, grade.reason) for grade in grades] == [("python_function", "correct")] * 4 + [
        ("llm_code", "correct")] * 5, grades
    # The same completions with a wrong gold answer are wrong: the grade comes from running them.
    assert all(grade.reason == "wrong" for grade in grade_completions(texts, [g + 1 for g in golds],
                                                                       FORMAT_SETS["synthetic"], sandbox))


def test_modules_outside_the_allowlist_and_private_parts_stay_out(sandbox):
    assert run(sandbox, "import os").detail == "import of 'os' not allowed"
    assert run(sandbox, "from numpy import _core").status == "error"  # views hold public names only
    assert run(sandbox, "from numpy import _core\n_core.os").status == "error"  # not the real module either
    assert run(sandbox, "import numpy._core").status == "forbidden"  # private modules are no views
    for source in ["import fractions\nfractions.sys", "import collections\ncollections._sys",
                   "import statistics\nstatistics.random", "from fractions import sys"]:
        result = run(sandbox, source)
        assert result.status == "error" and ("AttributeError" in result.detail or "ImportError" in result.detail), result
    assert run(sandbox, "from sympy import *\nx = Symbol('x')\nfactor(x**2 - 1)").value == "(x - 1)*(x + 1)"
    # `import sympy` does not load sympy.abc: a dotted entry in the allowlist does.
    abc = Program("from sympy.abc import x\nimport sympy\nsympy.expand((x + 1)**2)")
    assert sandbox.run([abc])[0].detail == "import of 'sympy.abc' not allowed"
    with Sandbox(workers=1, modules=("sympy", "sympy.abc")) as pool:
        assert pool.run([abc]) == [SandboxResult("ok", "x**2 + 2*x + 1")]
        assert pool.run([Program("import fractions")])[0].status == "forbidden"
    with pytest.raises(ValueError, match="not installed: no_such_module"):
        Sandbox(modules=("math", "no_such_module"))


def test_module_state_one_program_changes_is_restored_for_the_next():
    """decimal's context and numpy's print options are global; a worker restores them after a program."""
    with Sandbox(workers=1, modules=("decimal", "numpy")) as pool:  # one worker: the programs meet
        changed = pool.run([Program("import decimal\ndecimal.setcontext(decimal.Context(prec=3))\n"
                                    "decimal.Decimal(1) / 3")])
        fresh = pool.run([Program("import decimal\ndecimal.Decimal(1) / 3")])
        assert (changed[0].value, fresh[0].value) == ("0.333", "0." + "3" * 28)
        changed = pool.run([Program("import numpy\nnumpy.set_printoptions(precision=2)\nnumpy.array([1 / 3])")])
        fresh = pool.run([Program("import numpy\nnumpy.array([1 / 3])")])
        assert (changed[0].value, fresh[0].value) == ("[0.33]", "[0.33333333]")


def test_a_missing_part_of_the_os_layer_is_named_once_and_imports_stay_off(monkeypatch):
    """Without pyseccomp (the worker is not told where it is) the filter is missing: said once,
    recorded, and programs may not import; the Python layer cannot be switched off."""
    monkeypatch.setattr(sandbox_module, "_import_paths", lambda names: ())
    monkeypatch.setattr(sandbox_module, "_reported", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Sandbox(workers=1, **LIGHT) as first, Sandbox(workers=1, **LIGHT):
            isolation = first.isolation
            result = first.run([Program("import math\nmath.sqrt(4)")])[0]
            plain = first.run([Program("math.sqrt(4)")])[0]
    messages = [str(warning.message) for warning in caught if warning.category is SandboxIsolationWarning]
    assert len(messages) == 1 and "seccomp filter (ImportError: pyseccomp" in messages[0], messages
    assert "programs may not import modules" in messages[0]
    assert list(isolation.missing) == ["seccomp filter"] and isolation.modules == ()
    assert result.status == "forbidden" and "the OS layer misses seccomp filter" in result.detail
    assert plain == SandboxResult("ok", "2.0")  # math is there without an import, as always
    with pytest.raises(RuntimeError, match="needs the whole OS layer; missing: seccomp filter"):
        Sandbox(workers=1, python_layer=False, **LIGHT)
