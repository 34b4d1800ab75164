"""Format collapse metrics on hand-built tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import formats_metrics as fm

NAMES = ["code", "prose", "other"]


def rows(*steps: list[tuple[str, float]]) -> pd.DataFrame:
    """One table from per-step lists of (format, correct)."""
    return pd.DataFrame([{"step": step, "format": fmt, "correct": correct}
                         for step, items in enumerate(steps) for fmt, correct in items])


@pytest.fixture
def table() -> pd.DataFrame:
    # step 0: code, prose, prose, other; step 1: code x 4
    return rows([("code", 1), ("prose", 0), ("prose", 1), ("other", 0)],
                [("code", 1), ("code", 1), ("code", 0), ("code", np.nan)])


def test_format_share_and_counts(table):
    shares = fm.format_share(table, NAMES)
    assert shares.loc[0].tolist() == [0.25, 0.5, 0.25]
    assert shares.loc[1].tolist() == [1.0, 0.0, 0.0]  # absent formats have share 0
    assert fm.format_counts(table, NAMES).loc[0].tolist() == [1, 2, 1]


def test_entropy_effective_number_and_max_share(table):
    shares = fm.format_share(table, NAMES)
    h0 = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert fm.format_entropy_nats(shares).tolist() == pytest.approx([h0, 0.0])
    assert fm.format_entropy(shares).tolist() == pytest.approx([h0 / math.log(3), 0.0])
    assert fm.effective_format_number(shares).tolist() == pytest.approx([math.exp(h0), 1.0])
    assert fm.max_format_share(shares).tolist() == [0.5, 1.0]
    uniform = pd.DataFrame([[1 / 3] * 3], columns=NAMES)
    assert fm.format_entropy(uniform).iloc[0] == pytest.approx(1.0)
    assert fm.effective_format_number(uniform).iloc[0] == pytest.approx(3.0)


def test_one_format_only():
    table = rows([("code", 1)], [("code", 0)])
    shares = fm.format_share(table, ["code"])
    assert fm.format_entropy(shares).tolist() == [0.0, 0.0]  # ln K = 0 for K = 1: defined as 0
    assert fm.collapse_step(shares) == 0
    assert fm.js_divergence_to_first_step(shares).tolist() == [0.0, 0.0]


def test_dominant_format_ties_go_to_the_first_listed():
    shares = pd.DataFrame([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], columns=NAMES, index=pd.Index([0, 1], name="step"))
    assert fm.dominant_format(shares).tolist() == ["code", "other"]


def test_js_divergence_to_the_first_step():
    shares = pd.DataFrame([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], columns=NAMES)
    js = fm.js_divergence_to_first_step(shares)
    # disjoint supports: 1 bit; half-overlap: H2((0.75, 0.25)) - (0 + 1) / 2
    half = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) - 0.5
    assert js.tolist() == pytest.approx([0.0, 1.0, half])


def test_collapse_step_threshold_and_epoch(table):
    shares = pd.DataFrame([[0.5, 0.5, 0], [0.89, 0.11, 0], [0.9, 0.1, 0], [0.95, 0.05, 0]], columns=NAMES,
                          index=pd.Index([0, 10, 20, 30], name="step"))
    assert fm.collapse_step(shares) == 20
    assert fm.collapse_step(shares, threshold=0.95) == 30
    assert fm.collapse_step(shares, threshold=0.99) is None
    epochs = pd.DataFrame({"step": [0, 20, 20], "epoch": [0.0, 0.6, 0.5]})
    assert fm.epoch_of_step(epochs, 20) == 0.5
    assert fm.epoch_of_step(epochs, None) is None
    assert fm.epoch_of_step(epochs.drop(columns="epoch"), 20) is None


def test_accuracy_overall_and_per_format(table):
    assert fm.accuracy(table).tolist() == pytest.approx([0.5, 2 / 3])  # unknown correctness left out
    per_format = fm.format_accuracy(table, NAMES)
    assert per_format.loc[0].tolist() == [1.0, 0.5, 0.0]
    assert per_format.loc[1, "code"] == pytest.approx(2 / 3)
    assert np.isnan(per_format.loc[1, "prose"])  # no prose at step 1: accuracy undefined, not 0


def test_empty_table():
    empty = pd.DataFrame({"step": pd.Series([], dtype=np.int64), "format": pd.Series([], dtype=object),
                          "correct": pd.Series([], dtype=np.float64)})
    shares = fm.format_share(empty, NAMES)
    assert list(shares.columns) == NAMES and len(shares) == 0
    assert fm.collapse_step(shares) is None
    assert len(fm.format_entropy(shares)) == 0 and len(fm.js_divergence_to_first_step(shares)) == 0
    assert len(fm.format_accuracy(empty, NAMES)) == 0
