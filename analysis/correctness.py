"""Final answers and correctness of rollouts, through the shared grader (`specialists.grading`).

The grader reads each completion's final answer with its format's extractor (the sandbox runs code
formats) and compares it with the gold answer, so the analysis judges exactly as the RL reward does.
Each distinct (format, completion, gold) is graded once, in batches. `correct` is kept
where the trainer gave it; elsewhere it is the grader's verdict, and unknown (NaN) without a gold answer.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from tqdm import tqdm

from specialists.formats import Format
from specialists.grading import Grade, grade_completions
from specialists.sandbox import Sandbox

GRADE_BATCH = 4096  # completions per call to the grader, so the progress bar moves
SANDBOX_WORKERS = max(2, os.cpu_count() or 2)
NO_GOLD = "no_gold"  # grade reason of a row with an answer but no gold to compare it with
GRADE_KEYS = ["format", "completion", "answer"]


def grade_rollouts(table: pd.DataFrame, formats: tuple[Format, ...], progress: bool = True) -> pd.DataFrame:
    """Per row: `final_answer` (float, NaN when none), `correct` (1.0 / 0.0 / NaN) and `grade_reason`
    (the grader's reason: correct, wrong, no_answer, timeout, forbidden, error; or no_gold).
    Needs the columns `format`, `completion`, `answer` (gold, NaN when unknown) and `correct`."""
    codes = table.groupby(GRADE_KEYS, dropna=False, sort=False).ngroup().to_numpy()
    unique = table[GRADE_KEYS].iloc[np.unique(codes, return_index=True)[1]]
    grades: list[Grade] = []
    with Sandbox(workers=SANDBOX_WORKERS) as sandbox, tqdm(total=len(unique), desc="grade", unit="completion",
                                                           disable=not progress, mininterval=1.0) as bar:
        for start in range(0, len(unique), GRADE_BATCH):
            batch = unique.iloc[start:start + GRADE_BATCH]
            golds = [None if np.isnan(gold) else gold for gold in batch["answer"]]
            grades += grade_completions(batch["completion"].tolist(), golds, formats, sandbox, batch["format"].tolist())
            bar.update(len(batch))
    answers = np.array([np.nan if grade.answer is None else grade.answer for grade in grades])
    has_gold = unique["answer"].notna().to_numpy()
    judged = np.where(has_gold, [float(grade.correct) for grade in grades], np.nan)
    reasons = np.array([grade.reason if gold or grade.answer is None else NO_GOLD for grade, gold in zip(grades, has_gold)],
                       dtype=object)
    given = table["correct"].to_numpy()
    return pd.DataFrame({"final_answer": answers[codes], "correct": np.where(np.isnan(given), judged[codes], given),
                         "grade_reason": pd.Series(reasons[codes], index=table.index, dtype=object)}, index=table.index)


def grade_reason_share(table: pd.DataFrame) -> pd.DataFrame:
    """Share of step t's completions per grade reason (why answers were right, wrong or missing, e.g. code
    that timed out); rows steps, columns reasons (sorted)."""
    shares = pd.crosstab(table["step"], table["grade_reason"], normalize="index")
    return shares.reindex(columns=sorted(shares.columns)).rename_axis(index="step", columns="reason")
