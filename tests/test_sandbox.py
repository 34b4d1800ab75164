"""The sandbox: answers in each mode, a corpus of escape attempts, limits, and a pool that survives them."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest

from specialists.sandbox import Program, Sandbox, SandboxResult, run_programs

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
    assert run(sandbox, "print(1, 2, sep='-')\n5").value == "1-2"  # printing wins over expressions


def test_last_expression_mode(sandbox):
    assert run(sandbox, "x = 3\nx / 2") == SandboxResult("ok", "1.5")
    assert run(sandbox, "total = 0\nfor _ in range(4):\n    total += 2\ntotal").value == "8"


def test_no_output(sandbox):
    assert run(sandbox, "x = 3").status == "no_output"
    assert run(sandbox, "def f():\n    return 1").status == "no_output"


def test_syntax_and_runtime_errors(sandbox):
    syntax = run(sandbox, "def f(:\n    return 1", call="f")
    assert syntax.status == "error" and syntax.detail.startswith("SyntaxError")
    assert run(sandbox, "1 / 0") == SandboxResult("error", None, "ZeroDivisionError: division by zero")
    assert run(sandbox, "return 5").status == "error"  # a compile-time SyntaxError


# Escape attempts: (name, source, the statuses it may end in). TARGET in a source becomes a path the
# test then checks was not created; SECRET_NAME is an environment variable of the caller's.
SECRET_NAME, SECRET = "ECHOLAB_SANDBOX_SECRET", "do-not-leak-4f2a"
FORBIDDEN = ("forbidden",)
ERROR = ("error",)  # e.g. a NameError: the builtins hold no os, sys or socket
TIMEOUT = ("timeout",)
STOPPED = ("timeout", "error")  # by the timer, the kernel's limits, a MemoryError or the worker's death
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
# An ordinary program that allocates enough to start a garbage collection, which would meet what an
# attempt left behind.
ORDINARY = Program("rows = [[n] for n in range(1000)]\nprint(len(rows))")


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


@pytest.fixture(scope="module")
def watched_sandbox():
    """A pool whose caller has a secret in its environment and whose workers write stderr into a pipe
    (yielded: the pool, the pipe's write end, its read end). Under pytest's capture stderr is a file,
    which RLIMIT_FSIZE already closes to workers; a pipe or a terminal it does not."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_NAME, SECRET)
        with stderr_redirected_to(write_end):
            pool = Sandbox(workers=2, timeout_s=0.1)
        with pool:
            yield pool, write_end, read_end
    os.close(write_end)
    os.close(read_end)


@pytest.mark.parametrize("source, allowed", [attempt[1:] for attempt in ESCAPE_ATTEMPTS],
                         ids=[attempt[0] for attempt in ESCAPE_ATTEMPTS])
def test_an_escape_attempt_is_contained(watched_sandbox, tmp_path, source, allowed):
    """It ends in an allowed status, in bounded time, with no file written, no secret read, nothing on
    stderr, and the pool still answering an ordinary program."""
    pool, stderr_write_end, stderr_read_end = watched_sandbox
    target = tmp_path / "escaped"
    started = time.monotonic()
    with stderr_redirected_to(stderr_write_end):  # workers started to replace dead ones inherit it too
        [result] = pool.run([Program(source.replace("TARGET", repr(str(target))))])
        after = pool.run([ORDINARY])
    assert result.status in allowed, result
    assert time.monotonic() - started < pool._stall_s  # none may need the watchdog, which is for stalls
    assert list(tmp_path.iterdir()) == []
    assert SECRET not in f"{result.value} {result.detail}"
    try:
        written = os.read(stderr_read_end, 1 << 16)
    except BlockingIOError:  # nothing written
        written = b""
    assert written == b""
    assert after == [SandboxResult("ok", "1000")]


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
    """`sum(range(...))` never returns to the interpreter, so only the watchdog can stop it."""
    batch = [Program(f"print({n})") for n in range(10)]
    batch.insert(5, Program("sum(range(10**15))"))
    results = sandbox.run(batch)
    assert results[5].status == "timeout"
    assert [result.value for result in results[:5] + results[6:]] == [str(n) for n in range(10)]


def test_a_modest_list_fits_under_the_memory_limit(sandbox):
    assert run(sandbox, "x = [0] * (10**6)\nprint(len(x))").value == "1000000"


def test_a_worker_crash_blames_one_program_and_loses_no_other_result():
    batch = [Program("print(1)"), Program("s = 0\nfor i in range(10**9):\n    s += i"), Program("print(3)")]
    with Sandbox(workers=1, timeout_s=10.0) as pool:
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
    for worker in sandbox._workers:
        worker.process.kill()
        worker.process.wait()
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
    assert run_programs([Program("print(1)")], workers=1) == [SandboxResult("ok", "1")]
    pool = Sandbox(workers=1)
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
    first, second = run_programs(programs, workers=1), run_programs(programs, workers=1)
    assert first == second
    assert first[1].value == "<function f>"
