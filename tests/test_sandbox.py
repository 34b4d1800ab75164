"""The sandbox: answers in each mode, forbidden constructs, limits, and a pool that survives them."""

from __future__ import annotations

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


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos.system('true')",
        "from os import path",
        "().__class__.__base__.__subclasses__()",
        "__builtins__",
        "open('/tmp/echolab-sandbox-test', 'w').write('x')",
        "eval('1 + 1')",
        "exec('x = 1')",
        "type(1)",
        "getattr(1, 'real')",
        "10**10**10",
        "2 ** 100",
        "n = 100\n2 ** n",
        "x = 3\nx **= 1000",
        "pow(2, 10**6)",
        "class A:\n    pass",
        "x = 1\ndef f():\n    global x\n    x = 2",
        "def f():\n    x = 1\n    def g():\n        nonlocal x\n        x = 2",
        "math.pi = 3",
        "def g():\n    yield g2.gi_frame.f_back\ng2 = g()\nnext(g2)",
        "match ():\n    case tuple(__class__=c):\n        c",
        "x = 1\n" * 10_000,
    ],
)
def test_forbidden_constructs(sandbox, source):
    assert run(sandbox, source).status == "forbidden"


def test_a_file_write_is_forbidden_and_writes_nothing(sandbox, tmp_path):
    target = tmp_path / "written.txt"
    assert run(sandbox, f"open({str(target)!r}, 'w').write('x')").status == "forbidden"
    assert not target.exists()


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


def test_infinite_loop_times_out_and_the_pool_still_works(sandbox):
    result = run(sandbox, "while True:\n    pass")
    assert result.status == "timeout"
    assert run(sandbox, TINYGSM, call="simple_math_problem").value == "12"


def test_a_swallowed_timeout_still_times_out(sandbox):
    source = "while True:\n    try:\n        while True:\n            pass\n    except:\n        pass"
    assert run(sandbox, source).status == "timeout"
    assert run(sandbox, "print(1)").value == "1"


def test_a_hang_in_c_code_loses_no_other_result(sandbox):
    """`sum(range(...))` never returns to the interpreter, so only the watchdog can stop it."""
    batch = [Program(f"print({n})") for n in range(10)]
    batch.insert(5, Program("sum(range(10**15))"))
    results = sandbox.run(batch)
    assert results[5].status == "timeout"
    assert [result.value for result in results[:5] + results[6:]] == [str(n) for n in range(10)]


def test_memory_bomb_is_stopped_and_the_pool_still_works(sandbox):
    assert run(sandbox, "x = [0] * (10**9)").status in ("error", "timeout")
    assert run(sandbox, "x = 'ab' * (10**9)").status in ("error", "timeout")
    assert run(sandbox, "x = [0] * (10**6)\nprint(len(x))").value == "1000000"  # a modest list still fits


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
