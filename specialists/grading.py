"""Grade completions: classify each one's format, read its final answer, compare with the gold answer.

Code formats get their answer from the sandbox; all programs of a batch go to the sandbox in one call
(it batches and deduplicates). Every grade carries a reason, which RL rewards and the analysis both report.

Answers are text. A gold answer that reads as a number ("1,234", "$5", "3.50") is matched by a predicted
number (`math.isclose`, 1e-6), as echolab always graded; any other gold answer (a LaTeX fraction, radical,
interval: MATH-style answers) is compared by math-verify (Hugging Face's `parse` + `verify`, symbolic
equivalence), reading both as LaTeX only: model text is never handed to sympy's Python-evaluating parser.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Literal, Sequence

from specialists.formats import OTHER, Format, classify, parse_answer
from specialists.sandbox import Program, Sandbox, SandboxResult

Reason = Literal["correct", "wrong", "no_answer", "timeout", "forbidden", "error"]
ANSWER_DECIMALS = 6  # numbers equal after rounding to this many decimals are the same answer (votes, keys)
MATH_VERIFY_TIMEOUT_S = 5  # per parse and per comparison (math-verify's own signal-based limit)

_WRAPPERS = (re.compile(r"\\boxed\{(.*)\}"), re.compile(r"\$(.*)\$"), re.compile(r"\\\((.*)\\\)"))
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\s+")


@dataclass(frozen=True)
class Grade:
    format: str
    answer: str | None  # `answer_key` of the final answer
    correct: bool
    reason: Reason


def answer_text(value: float | str | None) -> str | None:
    """An answer as text without its wrapping: 5.0 -> '5', '\\\\boxed{\\\\frac{1}{2}}.' -> '\\\\frac{1}{2}',
    '$18$' -> '18'; a GSM8K solution ('... #### 72') -> '72'; None, NaN or blank -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        return _number_text(float(value))
    text = value.strip()
    if "####" in text:  # a whole GSM8K reference solution given as the gold
        text = text.rsplit("####", 1)[1].strip()
    if not text.endswith((".", "}", "$", ")")):  # nothing to unwrap (most answers: plain numbers)
        return text or None
    changed = True
    while changed:
        text, changed = text.strip().rstrip("."), False
        for wrapper in _WRAPPERS:
            found = wrapper.fullmatch(text)
            if found:
                text, changed = found.group(1), True
    return text or None


def answer_key(value: float | str | None) -> str | None:
    """A canonical text for counting answers (majority votes, distinct answers): numbers as their rounded
    value ('1,234.0' -> '1234', '0.50' -> '0.5'), other answers with LaTeX spacing and sizing removed and
    \\dfrac / \\tfrac as \\frac (equivalent forms such as '\\frac{1}{2}' and '0.5' stay distinct keys)."""
    return _key(answer_text(value))


def _key(text: str | None, number: float | None = None) -> str | None:
    """`answer_key` of an unwrapped answer whose number (parse_answer) may be known already."""
    if text is None:
        return None
    number = parse_answer(text) if number is None else number
    if number is not None:
        return _number_text(number)
    return _LATEX_NOISE.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _number_text(value: float) -> str:
    value = round(value, ANSWER_DECIMALS) + 0.0  # + 0.0: -0.0 -> 0.0
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def answers_equal(predicted: float | str | None, gold: float | str | None) -> bool:
    """A number gold: a predicted number within 1e-6 (isclose); any other gold: math-verify's equivalence."""
    predicted, gold = answer_text(predicted), answer_text(gold)
    return _equal(predicted, None if predicted is None else parse_answer(predicted), gold,
                  None if gold is None else parse_answer(gold))


def _equal(predicted: str | None, predicted_number: float | None, gold: str | None, gold_number: float | None) -> bool:
    """`answers_equal` of unwrapped answers whose numbers are known."""
    if predicted is None or gold is None:
        return False
    if gold_number is not None:
        return predicted_number is not None and math.isclose(predicted_number, gold_number, rel_tol=1e-6, abs_tol=1e-6)
    return _latex_equal(predicted, gold)


@functools.lru_cache(maxsize=65536)
def _latex_equal(predicted: str, gold: str) -> bool:
    from math_verify import verify

    gold_parsed, predicted_parsed = _read_latex(gold), _read_latex(predicted)
    return bool(gold_parsed and predicted_parsed
                and verify(gold_parsed, predicted_parsed, timeout_seconds=MATH_VERIFY_TIMEOUT_S))


def reads_as_latex(text: str) -> bool:
    """Whether math-verify reads `text` as a LaTeX math expression, as `answers_equal` reads a text gold answer."""
    return bool(_read_latex(text))


def _read_latex(text: str) -> list:
    from math_verify import LatexExtractionConfig, parse  # imported on first use: sympy is slow to load

    return parse(f"${text}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=MATH_VERIFY_TIMEOUT_S)


def grade_completions(
    completions: Sequence[str],
    gold_answers: Sequence[float | str | None],
    formats: tuple[Format, ...],
    sandbox: Sandbox,
    format_names: Sequence[str] | None = None,
) -> list[Grade]:
    """One Grade per completion. `format_names` skips classification when the caller already has it.
    Without a gold answer (None) a completion is never correct."""
    found = written_answers(completions, formats, format_names)
    return grade_answers(found, sandbox.run(found.programs) if found.programs else [], gold_answers, formats)


@dataclass(frozen=True)
class WrittenAnswers:
    """What completions say before any code runs (`written_answers`): per completion its format, its written
    answer (None when none) and, when it has no answer at all, the reason; the programs to run for the rest."""

    formats: list[str]
    answers: list[str | None]
    reasons: list[Reason | None]
    programs: list[Program]
    program_owner: list[int]  # the completion each program answers for


def written_answers(completions: Sequence[str], formats: tuple[Format, ...],
                    format_names: Sequence[str] | None = None) -> WrittenAnswers:
    """The first half of `grade_completions`: classify (unless `format_names` is given) and read the written
    answers; the programs then run in a sandbox (`Sandbox.run`, which callers may run in the background)."""
    if format_names is None:
        format_names = [classify(text, formats) for text in completions]
    by_name = {f.name: f for f in formats}
    answers: list[str | None] = [None] * len(completions)
    reasons: list[Reason | None] = [None] * len(completions)
    programs: list[Program] = []
    program_owner: list[int] = []
    for index, (text, name) in enumerate(zip(completions, format_names)):
        definition = by_name.get(name)
        if definition is None:  # `other` (or a name from outside this format set)
            reasons[index] = "no_answer"
            continue
        answers[index] = definition.written_answer(text)
        if answers[index] is not None:
            continue
        program = definition.program(text)
        if program is None:
            reasons[index] = "no_answer"
        else:
            programs.append(program)
            program_owner.append(index)
    return WrittenAnswers(list(format_names), answers, reasons, programs, program_owner)


def grade_answers(found: WrittenAnswers, results: Sequence[SandboxResult], gold_answers: Sequence[float | str | None],
                  formats: tuple[Format, ...]) -> list[Grade]:
    """The second half of `grade_completions`: the programs' `results` (in order) complete the answers, which are
    compared with the gold answers. Completions with the same format, answer and gold share one Grade (a batch's
    samples of one prompt mostly agree): each is judged once."""
    answers, reasons = list(found.answers), list(found.reasons)
    for index, result in zip(found.program_owner, results, strict=True):
        if result.status == "ok":
            answers[index] = result.value
        elif result.status in ("timeout", "forbidden", "error"):
            reasons[index] = result.status
        else:
            reasons[index] = "no_answer"
    names = {f.name for f in formats}
    golds: dict[object, tuple[str | None, float | None]] = {}  # a batch shares few gold answers: read each once
    judged: dict[tuple, Grade] = {}
    grades = []
    for case in zip(found.formats, answers, reasons, gold_answers):
        grade = judged.get(case)
        if grade is None:
            name, answer, reason, gold = case
            if gold not in golds:
                gold_text = answer_text(gold)
                golds[gold] = (gold_text, None if gold_text is None else parse_answer(gold_text))
            grade = judged[case] = _grade(name if name in names else OTHER, answer, reason, golds[gold])
        grades.append(grade)
    return grades


def _grade(name: str, answer: str | None, reason: Reason | None, gold: tuple[str | None, float | None]) -> Grade:
    """The Grade of an answer (None with the reason it has none) against a gold answer's text and number."""
    text = answer_text(answer) if reason is None else None
    number = parse_answer(text) if text is not None else None
    key = _key(text, number)
    if reason is None and key is None:
        reason = "no_answer"
    correct = reason is None and _equal(text, number, *gold)
    if reason is None:
        reason = "correct" if correct else "wrong"
    return Grade(name, key, correct, reason)
