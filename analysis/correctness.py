"""Final answers and correctness of rollouts, through the shared grader (`specialists.grading`).

The grader reads each completion's final answer with its format's extractor (the sandbox runs code
formats) and compares it with the gold answer, so the analysis judges exactly as the RL reward does.
Each distinct (format, completion, gold) is graded once, in batches. Correctness, in order of precedence:
the trainer's `correct` where it gave one; the grader's verdict where there is a gold answer; the
`--correct-from` column (value > 0) where it is named; else unknown (NaN).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from specialists.formats import Format
from specialists.grading import Grade, WrittenAnswers, grade_answers, written_answers
from specialists.sandbox import Sandbox, SandboxResult

SANDBOX_WORKERS = max(2, os.cpu_count() or 2)
NO_GOLD = "no_gold"  # grade reason of a row with an answer but no gold to compare it with
GRADE_KEYS = ["format", "completion", "answer"]


def grade_rollouts(table: pd.DataFrame, formats: tuple[Format, ...], sandbox: Sandbox) -> pd.DataFrame:
    """Per row: `final_answer` (the answer's `specialists.grading.answer_key`, None when none), `correct`
    (1.0 / 0.0 / NaN, see the module doc), `grade_reason` (the grader's reason: correct, wrong, no_answer,
    timeout, forbidden, error; or no_gold) and `correct_source` (trainer, gold, column or unknown). Needs the columns `format`, `completion`, `answer` (gold text,
    None when unknown) and `correct`; `correct_from` when present."""
    grading = start_grading(table, formats)
    return finish_grading(grading, sandbox.run(grading.found.programs), formats)


@dataclass(frozen=True)
class Grading:
    """`grade_rollouts` under way: the table, its distinct (format, completion, answer) cases (`codes`: each row's)
    and their written answers; `found.programs` are to run in the sandbox, whose results `finish_grading` takes."""

    table: pd.DataFrame
    codes: np.ndarray
    golds: list
    has_gold: np.ndarray
    found: WrittenAnswers


def start_grading(table: pd.DataFrame, formats: tuple[Format, ...]) -> Grading:
    """Everything of `grade_rollouts` before the sandbox runs the programs."""
    codes = _case_codes(table)
    unique = table[GRADE_KEYS].iloc[np.unique(codes, return_index=True)[1]]
    found = written_answers(unique["completion"].tolist(), formats, unique["format"].tolist())
    return Grading(table, codes, unique["answer"].tolist(), unique["answer"].notna().to_numpy(), found)


def _case_codes(table: pd.DataFrame) -> np.ndarray:
    """Each row's (format, completion, answer) case, numbered in order of first appearance (as groupby(GRADE_KEYS,
    dropna=False, sort=False).ngroup() numbers them), from codes per column: no index of the texts is built."""
    codes = np.zeros(len(table), dtype=np.int64)
    for column in GRADE_KEYS:
        column_codes, values = pd.factorize(table[column].to_numpy(dtype=object), use_na_sentinel=False)
        codes = pd.factorize(codes * len(values) + column_codes)[0]
    return codes


def finish_grading(grading: Grading, results: Sequence[SandboxResult], formats: tuple[Format, ...]) -> pd.DataFrame:
    """`grade_rollouts`' result, given the sandbox's results for `grading.found.programs`."""
    table, codes = grading.table, grading.codes
    grades: list[Grade] = grade_answers(grading.found, results, grading.golds, formats)
    answers = np.array([grade.answer for grade in grades], dtype=object)
    has_gold = grading.has_gold
    judged = np.where(has_gold, [float(grade.correct) for grade in grades], np.nan)
    reasons = np.array([grade.reason if gold or grade.answer is None else NO_GOLD for grade, gold in zip(grades, has_gold)],
                       dtype=object)
    given = table["correct"].to_numpy(dtype=np.float64)
    graded = judged[codes]
    column = table["correct_from"].to_numpy(dtype=np.float64) if "correct_from" in table.columns else np.full(len(table), np.nan)
    sources = np.select([~np.isnan(given), ~np.isnan(graded), ~np.isnan(column)], ["trainer", "gold", "column"], "unknown")
    correct = np.where(~np.isnan(given), given, np.where(~np.isnan(graded), graded, column))
    return pd.DataFrame({"final_answer": pd.Series(answers[codes], index=table.index, dtype=object),
                         "correct": correct,
                         "grade_reason": pd.Series(reasons[codes], index=table.index, dtype=object),
                         "correct_source": pd.Series(sources, index=table.index, dtype=object)}, index=table.index)


def grade_reason_share(table: pd.DataFrame) -> pd.DataFrame:
    """Share of step t's completions per grade reason (why answers were right, wrong or missing, e.g. code
    that timed out); rows steps, columns reasons (sorted)."""
    shares = pd.crosstab(table["step"], table["grade_reason"], normalize="index")
    return shares.reindex(columns=sorted(shares.columns)).rename_axis(index="step", columns="reason")
