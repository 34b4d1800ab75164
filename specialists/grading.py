"""Grade completions: classify each one's format, read its final answer, compare with the gold answer.

Code formats get their answer only from the sandbox; all programs of a batch go to the sandbox in
one call (it batches and deduplicates). Every grade carries a reason, which RL rewards and the
analysis both report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from specialists.formats import OTHER, Format, answers_equal, classify, parse_answer
from specialists.sandbox import Program, Sandbox

Reason = Literal["correct", "wrong", "no_answer", "timeout", "forbidden", "error"]


@dataclass(frozen=True)
class Grade:
    format: str
    answer: float | None
    correct: bool
    reason: Reason


def grade_completions(
    completions: Sequence[str],
    gold_answers: Sequence[float | None],
    formats: tuple[Format, ...],
    sandbox: Sandbox,
    format_names: Sequence[str] | None = None,
) -> list[Grade]:
    """One Grade per completion. `format_names` skips classification when the caller already has it.
    Without a gold answer (None) a completion is never correct."""
    if format_names is None:
        format_names = [classify(text, formats) for text in completions]
    by_name = {f.name: f for f in formats}
    answers: list[float | None] = [None] * len(completions)
    reasons: list[Reason | None] = [None] * len(completions)
    programs: list[Program] = []
    program_owner: list[int] = []
    for index, (text, name) in enumerate(zip(completions, format_names)):
        definition = by_name.get(name)
        if definition is None:  # `other` (or a name from outside this format set)
            reasons[index] = "no_answer"
        elif definition.code is not None:
            program = definition.program(text)
            if program is None:
                reasons[index] = "no_answer"
            else:
                programs.append(program)
                program_owner.append(index)
        else:
            answers[index] = definition.written_answer(text)
    for index, result in zip(program_owner, sandbox.run(programs) if programs else []):
        if result.status == "ok":
            answers[index] = parse_answer(result.value or "")
        elif result.status in ("timeout", "forbidden", "error"):
            reasons[index] = result.status
        else:
            reasons[index] = "no_answer"
    grades = []
    for name, answer, reason, gold in zip(format_names, answers, reasons, gold_answers):
        if reason is None and answer is None:
            reason = "no_answer"
        correct = reason is None and gold is not None and answers_equal(answer, gold)
        if reason is None:
            reason = "correct" if correct else "wrong"
        grades.append(Grade(name if name in by_name else OTHER, answer, correct, reason))
    return grades
