"""Specialist (expert) metrics on hand-built tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import specialists_metrics as sm
from specialists.errors import UserError


def tokens(entries: dict[tuple[int, str], list[list[float]]]) -> pd.DataFrame:
    """Long token table from {(step, format): [per layer: per expert tokens]}."""
    return pd.DataFrame([{"step": step, "format": fmt, "layer": layer, "expert": expert, "tokens": float(value)}
                         for (step, fmt), layers in entries.items()
                         for layer, experts in enumerate(layers) for expert, value in enumerate(experts)])


def shares(*rows: list[float]) -> pd.DataFrame:
    index = pd.MultiIndex.from_tuples([(0, step) for step in range(len(rows))], names=["layer", "step"])
    return pd.DataFrame(rows, index=index).rename_axis(columns="expert")


def test_expert_token_counts_sum_completions_per_step_and_format():
    table = pd.DataFrame({"step": [0, 0, 0, 1], "format": ["a", "a", "b", "a"],
                          "expert_load": [[[1, 2], [3, 0]], [[1, 0], [0, 1]], [[0, 5], [5, 0]], None]})
    counts = sm.expert_token_counts(table).set_index(["step", "format", "layer", "expert"])["tokens"]
    assert counts[(0, "a", 0, 0)] == 2 and counts[(0, "a", 0, 1)] == 2
    assert counts[(0, "a", 1, 0)] == 3 and counts[(0, "b", 0, 1)] == 5
    assert (1, "a", 0, 0) not in counts.index  # no expert data for that row
    assert sm.expert_token_counts(table.drop(columns="expert_load")).empty


def test_ragged_or_negative_expert_load_is_a_user_error():
    with pytest.raises(UserError, match="same number of layers and experts"):
        sm.expert_load_array(pd.Series([[[1, 2]], [[1, 2], [3, 4]]]))
    with pytest.raises(UserError, match="non-negative"):
        sm.expert_load_array(pd.Series([[[1, -2]]]))
    assert sm.expert_load_array(pd.Series([[[1, 2], [3, 4]]])).shape == (1, 2, 2)


def test_expert_share_and_balance_measures():
    table = shares([1, 1, 1, 1], [4, 0, 0, 0], [2, 1, 1, 0])
    table = table.div(table.sum(axis=1), axis=0)
    assert sm.expert_entropy(table).tolist() == pytest.approx([1.0, 0.0, 1.5 * math.log(2) / math.log(4)])
    assert sm.expert_coefficient_of_variation(table).tolist() == pytest.approx([0.0, math.sqrt(3), math.sqrt(0.5)])
    assert sm.expert_max_violation(table).tolist() == pytest.approx([0.0, 3.0, 1.0])
    # Gini of (2, 1, 1, 0): sum |xi - xj| = 2 * (1 + 1 + 2 + 0 + 1 + 1) = 12; / (2 * 4 * 4) = 0.375
    assert sm.expert_gini(table).tolist() == pytest.approx([0.0, 0.75, 0.375])
    assert sm.dominant_expert(table).tolist() == [0, 0, 0]


def test_expert_share_from_tokens_and_routing_drift():
    counts = tokens({(0, "a"): [[3, 1]], (0, "b"): [[0, 4]], (1, "a"): [[8, 0]]})
    table = sm.expert_share(counts)
    assert table.loc[(0, 0)].tolist() == [3 / 8, 5 / 8]
    assert table.loc[(0, 1)].tolist() == [1.0, 0.0]
    assert sm.routing_drift(table).tolist() == pytest.approx([5 / 8])
    assert sm.routing_drift(table).index.tolist() == [(0, 1)]


def test_format_routing_and_mutual_information():
    aligned = tokens({(0, "a"): [[5, 0]], (0, "b"): [[0, 5]]})
    independent = tokens({(0, "a"): [[2, 2]], (0, "b"): [[1, 1]]})
    routing = sm.format_routing(aligned)
    assert routing.loc[(0, 0, "a")].tolist() == [1.0, 0.0]
    assert sm.format_expert_mutual_information(aligned).iloc[0] == pytest.approx(1.0)  # 1 bit
    assert sm.format_expert_mutual_information(independent).iloc[0] == pytest.approx(0.0, abs=1e-12)
    one_format = tokens({(0, "a"): [[1, 3]]})
    assert sm.format_expert_mutual_information(one_format).iloc[0] == pytest.approx(0.0, abs=1e-12)


def test_shift_decomposition_pure_mix_change():
    # each format keeps its routing; the mix goes from 50/50 to 90/10
    counts = tokens({(0, "code"): [[9, 1]], (0, "prose"): [[1, 9]], (5, "code"): [[81, 9]], (5, "prose"): [[1, 9]]})
    parts = sm.routing_shift_decomposition(counts, 0, 5).loc[0]
    assert parts.loc["total"].tolist() == pytest.approx([0.82 - 0.5, 0.18 - 0.5])
    assert parts.loc["format_mix"].tolist() == pytest.approx(parts.loc["total"].tolist())
    assert parts.loc["routing"].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert sm.within_format_routing_drift(counts, 0, 5).loc[0].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)


def test_shift_decomposition_pure_routing_change_and_exactness():
    counts = tokens({(0, "code"): [[5, 5]], (0, "prose"): [[5, 5]], (1, "code"): [[10, 0]], (1, "prose"): [[5, 5]]})
    parts = sm.routing_shift_decomposition(counts, 0, 1).loc[0]
    assert parts.loc["format_mix"].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert parts.loc["routing"].tolist() == pytest.approx([0.25, -0.25])
    rng = np.random.default_rng(0)
    random = tokens({(step, fmt): rng.integers(0, 20, (2, 3)).tolist() for step in (0, 1) for fmt in "abc"})
    decomposition = sm.routing_shift_decomposition(random, 0, 1)
    for layer in (0, 1):
        part = decomposition.loc[layer]
        assert (part.loc["format_mix"] + part.loc["routing"]).tolist() == pytest.approx(part.loc["total"].tolist())


def test_shift_decomposition_with_a_format_absent_at_one_step():
    counts = tokens({(0, "code"): [[4, 0]], (0, "prose"): [[0, 4]], (1, "code"): [[6, 2]]})
    parts = sm.routing_shift_decomposition(counts, 0, 1).loc[0]
    assert (parts.loc["format_mix"] + parts.loc["routing"]).tolist() == pytest.approx(parts.loc["total"].tolist())
    assert parts.loc["total"].tolist() == pytest.approx([0.25, -0.25])
    drift = sm.within_format_routing_drift(counts, 0, 1).loc[0]
    assert drift["code"] == pytest.approx(0.25) and "prose" not in drift.index


# ---------------------------------------------------------------- specialist dominance (BTX: experts trained apart)

SPECIALISTS = ["a", "a", "b", "b"]  # experts 0, 1 came from format a's specialist; 2, 3 from b's


def test_specialist_share_sums_each_specialists_experts():
    # step 0: experts (3, 2, 2, 1) of 8 routed tokens -> a: 5/8, b: 3/8; step 1: all 8 on expert 0 -> a: 1, b: 0
    counts = tokens({(0, "a"): [[3, 1, 0, 0]], (0, "b"): [[0, 1, 2, 1]], (1, "a"): [[8, 0, 0, 0]]})
    table = sm.specialist_share(sm.expert_share(counts), SPECIALISTS)
    assert list(table.columns) == ["a", "b"]
    assert table.loc[(0, 0)].tolist() == [5 / 8, 3 / 8] and table.loc[(0, 1)].tolist() == [1.0, 0.0]


def test_specialist_alignment_is_the_share_of_a_format_routed_to_its_own_specialist():
    # step 0: a's 4 tokens all on experts 0-1 -> 1.0; b's 4 tokens: 1 on expert 1, 3 on experts 2-3 -> 0.75.
    # step 1: only a sampled (2 of its 8 tokens on b's experts) -> a 0.75, b NaN
    counts = tokens({(0, "a"): [[3, 1, 0, 0]], (0, "b"): [[0, 1, 2, 1]], (1, "a"): [[4, 2, 1, 1]]})
    table = sm.specialist_alignment(counts, SPECIALISTS)
    assert table.loc[(0, 0)].tolist() == [1.0, 0.75]
    assert table.loc[(0, 1), "a"] == 0.75 and math.isnan(table.loc[(0, 1), "b"])


def test_specialist_alignment_ignores_formats_without_a_specialist():
    counts = tokens({(0, "a"): [[1, 1, 0, 0]], (0, "other"): [[0, 0, 4, 0]], (1, "other"): [[4, 0, 0, 0]]})
    table = sm.specialist_alignment(counts, SPECIALISTS)
    assert list(table.columns) == ["a", "b"] and table.loc[(0, 0), "a"] == 1.0 and math.isnan(table.loc[(0, 0), "b"])
    assert table.loc[(0, 1)].isna().all()  # step 1 has only `other`: a row, but nothing to align
    only_other = sm.specialist_alignment(tokens({(0, "other"): [[4, 0, 0, 0], [0, 4, 0, 0]]}), SPECIALISTS)
    assert list(only_other.index) == [(0, 0), (1, 0)] and only_other.isna().all().all()


def test_dominant_expert_is_winner_specialist_compares_with_the_steps_dominant_format():
    # step 0: expert 0 dominates (specialist a) while format b won the step -> 0; step 1: expert 2 (b), b won -> 1
    table = shares([3, 2, 2, 1], [1, 1, 5, 1])
    winners = pd.Series(["b", "b"], index=pd.Index([0, 1], name="step"))
    assert sm.dominant_expert_is_winner_specialist(table, winners, SPECIALISTS).tolist() == [0.0, 1.0]


def test_a_specialist_map_of_the_wrong_size_is_a_user_error():
    table = shares([1, 1, 1, 1])
    with pytest.raises(UserError, match="4 experts per layer but the run's config names specialists for 2"):
        sm.specialist_share(table, ["a", "b"])
