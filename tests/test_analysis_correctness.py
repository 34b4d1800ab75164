"""Format labels and grading of rollouts (code formats through the real sandbox)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.classify import format_names, label_formats
from analysis.correctness import NO_GOLD, grade_reason_share, grade_rollouts
from specialists.formats import FORMAT_SETS
from specialists.sandbox import Sandbox

SYNTHETIC = FORMAT_SETS["synthetic"]
FUNCTION = "def simple_math_problem():\n    x = 2\n    x = x * 3\n    return x"
LLM_CODE = "<llm-code>\nx = 4\nprint(x + 1)\n</llm-code>\n<llm-code-output>\n7\n</llm-code-output>"
PROSE = "2 * 3 = 6.\nThe answer is 6."
FORBIDDEN = "def simple_math_problem():\n    import os\n    return 6"


def test_labels_keep_given_formats_and_classify_the_rest():
    table = pd.DataFrame({"completion": [FUNCTION, PROSE, "definitely not code", PROSE],
                          "format": [None, None, None, "custom"]})
    labels = label_formats(table, SYNTHETIC)
    assert labels.tolist() == ["python_function", "natural_language", "other", "custom"]
    assert format_names(SYNTHETIC, labels) == ["python_function", "llm_code", "natural_language", "custom", "other"]


def test_grading_runs_code_and_reads_written_answers():
    table = pd.DataFrame({
        "format": ["python_function", "llm_code", "natural_language", "natural_language", "other", "python_function",
                   "python_function"],
        "completion": [FUNCTION, LLM_CODE, PROSE, PROSE, "no idea", FORBIDDEN, FUNCTION],
        "answer": ["6", "5", "6", None, "6", "6", "6"],
        "correct": [np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, 0.0],
    })
    with Sandbox() as sandbox:
        graded = grade_rollouts(table, SYNTHETIC, sandbox)
    # llm_code: the answer is what the code prints (5), not the 7 written beside it
    assert graded["final_answer"].tolist()[:3] == ["6", "5", "6"]
    assert graded["correct"].tolist()[:3] == [1.0, 1.0, 1.0]
    assert np.isnan(graded.loc[3, "correct"]) and graded.loc[3, "grade_reason"] == NO_GOLD
    assert graded.loc[4, "correct"] == 0.0 and graded.loc[4, "grade_reason"] == "no_answer"
    assert graded.loc[5, "correct"] == 0.0 and graded.loc[5, "grade_reason"] == "forbidden"
    assert graded.loc[6, "correct"] == 0.0  # the trainer's verdict is kept
    assert graded.loc[6, "final_answer"] == "6"
    assert graded["correct_source"].tolist() == ["gold", "gold", "gold", "unknown", "gold", "gold", "trainer"]


def test_correctness_from_a_column_where_there_is_no_gold():
    # rows 0-1 have a gold answer (graded), row 2 takes the column's verdict, row 3 has neither
    table = pd.DataFrame({"format": ["natural_language"] * 4, "completion": [PROSE] * 4,
                          "answer": ["6", "7", None, None], "correct": [np.nan] * 4,
                          "correct_from": [0.0, 1.0, 1.0, np.nan]})
    with Sandbox() as sandbox:
        graded = grade_rollouts(table, SYNTHETIC, sandbox)
    assert graded["correct"].tolist()[:3] == [1.0, 0.0, 1.0] and np.isnan(graded.loc[3, "correct"])
    assert graded["correct_source"].tolist() == ["gold", "gold", "column", "unknown"]


def test_grade_reason_share():
    table = pd.DataFrame({"step": [0, 0, 0, 1], "grade_reason": ["correct", "wrong", "wrong", "timeout"]})
    shares = grade_reason_share(table)
    assert shares.loc[0].to_dict() == pytest.approx({"correct": 1 / 3, "timeout": 0.0, "wrong": 2 / 3})
    assert shares.loc[1, "timeout"] == 1.0
