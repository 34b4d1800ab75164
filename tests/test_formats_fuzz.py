"""Property-based fuzzing of format detection and answer extraction: no text makes them fail.

Generations are model output, so anything may come: arbitrary text, and text built from the pieces
the formats look for (`def `, `<llm-code>`, `\\boxed{`, `####`, "The answer is", numbers, unicode,
very long lines). Runs are derandomised, so every run tries the same examples.
"""

from __future__ import annotations

import math
import re
import signal
from contextlib import contextmanager

from hypothesis import example, given, settings
from hypothesis import strategies as st

from specialists.formats import FORMAT_SETS, OTHER, Format, classify, parse_answer
from specialists.grading import answers_equal, grade_completions
from specialists.sandbox import Program, SandboxResult

FUZZ = settings(max_examples=200, deadline=None, derandomize=True)
ECHO = FORMAT_SETS["echo-chamber"]
REASONS = {"correct", "wrong", "no_answer", "timeout", "forbidden", "error"}

FRAGMENTS = [
    "def ", "def simple_math_problem():", "def simple_math_problem() -> int:", "return ", "return", "print(",
    "<llm-code>", "</llm-code>", "<llm-code-output>", "</llm-code-output>", "```python", "```",
    "\\boxed{", "}", "####", "The answer is ", "The final answer is: ", "the answer is", "definitely ",
    "\n", "\n\n", "    ", "\t", " ", "$", ",", ".", "-", ":", "=",
    # Arabic-Indic and fullwidth digits, a line separator, a lone surrogate (from errors="surrogateescape")
    "\u0663", "\uff11\uff12", "\u00e9", "\u2028", "\x00", "\U0001f4a5", "\ud800",
    "9" * 400, " " * 2000, "1," * 300, "x = x + 1\n" * 50,
]
NUMBERS = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.integers(-(10**9), 10**9).map(lambda n: f"{n:,}"),
    st.floats().map(repr),  # also 'inf', 'nan', '1e+300'
)
LATEX = st.sampled_from(["\\frac{1}{2}", "\\sqrt{2}", "(1, 3]", "2\\pi", "x^2"])
ANY_CHARACTER = st.characters(exclude_categories=())  # surrogates too
ARBITRARY_TEXT = st.text(ANY_CHARACTER, max_size=300)
PIECES = st.lists(st.one_of(st.sampled_from(FRAGMENTS), NUMBERS, st.text(ANY_CHARACTER, max_size=4)),
                  max_size=20).map("".join)
SPACING = st.sampled_from(["", " ", "\n", " \t\n "])
# Each format's shape with pieces inside: some still match their format, some just miss it.
SHAPED_TEXT = st.one_of(
    st.builds("def simple_math_problem():\n    {}\n    return {}".format, PIECES, PIECES),
    st.builds("<llm-code>\n{}\n</llm-code>\n<llm-code-output>\n{}\n</llm-code-output>".format, PIECES, PIECES),
    st.builds("{}\n####{}{}".format, PIECES, SPACING, NUMBERS),
    st.builds("{}\nThe answer is{}{}.".format, PIECES, SPACING, NUMBERS),
    st.builds("{}\\boxed{{{}}}".format, PIECES, NUMBERS),
)
COMPLETIONS = st.one_of(ARBITRARY_TEXT, PIECES, SHAPED_TEXT)
# A user's catch-all format last: where a built-in one matches too, classification must pick the first.
CATCH_ALL = Format(name="anything", detect=re.compile(r"(?s).*"), answer=re.compile(r"(?P<answer>\S+)\s*\Z"))
FORMAT_SETS_TRIED = {**FORMAT_SETS, "echo-chamber and a catch-all": (*ECHO, CATCH_ALL)}


def is_finite_float_or_none(value) -> bool:
    return value is None or (type(value) is float and math.isfinite(value))


@FUZZ
@given(COMPLETIONS, st.sampled_from(sorted(FORMAT_SETS_TRIED)))
def test_classify_names_the_first_matching_format_or_other(text, set_name):
    formats = FORMAT_SETS_TRIED[set_name]
    matching = [definition.name for definition in formats if definition.matches(text)]
    assert classify(text, formats) == (matching[0] if matching else OTHER)


@FUZZ
@given(COMPLETIONS)
def test_extraction_gives_an_answer_or_a_program_from_the_text(text):
    for definition in ECHO:
        answer, program = definition.written_answer(text), definition.program(text)
        assert answer is None or (definition.answer is not None and answer in text)
        if definition.code is None:
            assert program is None
            if definition.matches(text):  # a recognised answer format has its answer in the text
                assert answer is not None
            continue
        if definition.matches(text):
            assert program is not None
        if program is not None:
            cells = "\n".join(found.group("code") for found in definition.code.finditer(text.strip()))
            assert program.call == definition.call
            assert program.source == cells or _wraps_one_expression_in_print(program.source, cells)


def _wraps_one_expression_in_print(source: str, cells: str) -> bool:
    """`source` is `cells` with "print(" inserted at one place and ")" at a later one (notebook semantics)."""
    start = next((i for i, (a, b) in enumerate(zip(source, cells)) if a != b), len(cells))
    if source[start:start + 6] != "print(":
        return False
    rest = source[:start] + source[start + 6:]
    end = next((i for i, (a, b) in enumerate(zip(rest, cells)) if a != b), len(cells))
    return rest[end:end + 1] == ")" and rest[:end] + rest[end + 1:] == cells


@FUZZ
@given(st.one_of(COMPLETIONS, NUMBERS))
@example("inf")
@example("-Infinity")
@example("nan")
@example("1" * 400)  # past the largest float
def test_parse_answer_gives_a_finite_float_or_none(text):
    assert is_finite_float_or_none(parse_answer(text))


@FUZZ
@given(st.integers(-(10**15), 10**15), st.floats(allow_nan=False, allow_infinity=False))
def test_parse_answer_reads_written_numbers(integer, number):
    for written in (str(integer), f"{integer:,}", f"${integer}", f"{integer}."):
        assert parse_answer(written) == integer
    assert parse_answer(repr(number)) == number


class ScriptedSandbox:
    """Stands in for the sandbox: answers the programs with the given results, in turn."""

    def __init__(self, results: list[SandboxResult]):
        self.results = results

    def run(self, programs: list[Program]) -> list[SandboxResult]:
        return [self.results[index % len(self.results)] for index in range(len(programs))]


SANDBOX_RESULTS = st.builds(
    SandboxResult,
    status=st.sampled_from(["ok", "timeout", "forbidden", "error", "no_output"]),
    value=st.one_of(st.none(), NUMBERS, ARBITRARY_TEXT),
)


@FUZZ
@given(st.lists(st.tuples(COMPLETIONS, st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), LATEX)),
                max_size=5),
       st.lists(SANDBOX_RESULTS, min_size=1, max_size=4))
def test_grades_are_consistent_whatever_the_text_and_the_sandbox_say(cases, sandbox_results):
    texts, golds = [text for text, _ in cases], [gold for _, gold in cases]
    grades = grade_completions(texts, golds, ECHO, ScriptedSandbox(sandbox_results))
    assert len(grades) == len(texts)
    for text, gold, grade in zip(texts, golds, grades, strict=True):
        assert grade.format == classify(text, ECHO)
        assert grade.reason in REASONS
        assert grade.answer is None or isinstance(grade.answer, str)
        assert grade.correct == (grade.reason == "correct")
        if grade.correct:
            assert gold is not None and answers_equal(grade.answer, gold)
        if grade.format == OTHER:
            assert (grade.answer, grade.reason) == (None, "no_answer")


@contextmanager
def failing_instead_of_hanging(seconds: int):
    """A hang guard, not a speed limit: raise where the code inside would run for ever (Python's regular
    expression engine checks for signals while it backtracks)."""
    def give_up(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: exponential backtracking?")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_truncated_function_is_classified_at_all():
    """Regression: python_function's pattern could split each body line's indentation two ways, so a
    function without a return (cut off at the length limit) took time exponential in its lines:
    seconds for 12 lines, hours for 20; for 200 lines it would never end. Linear: a millisecond."""
    body = "    x = x + 1\n" * 200
    with failing_instead_of_hanging(seconds=60):
        assert classify("def simple_math_problem():\n" + body, ECHO) == OTHER
        assert classify("def simple_math_problem():\n" + body + "    return x\n", ECHO) == "python_function"
