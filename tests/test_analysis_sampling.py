"""Sampling-quality metrics on hand-built tables with known answers."""

from __future__ import annotations

import math
from math import comb

import numpy as np
import pandas as pd
import pytest

from analysis import sampling


def samples(step: int, prompt: str, answers: list[float | None], gold: float = 1.0) -> list[dict]:
    return [{"step": step, "prompt_id": prompt, "sample_index": i, "completion": f"answer {a}",
             "final_answer": None if a is None else str(a), "correct": float(a == gold)} for i, a in enumerate(answers)]


def test_pass_at_k_estimator():
    assert sampling.pass_at_k(4, 1, 2) == pytest.approx(1 - comb(3, 2) / comb(4, 2))  # 0.5
    assert sampling.pass_at_k(5, 0, 3) == 0.0
    assert sampling.pass_at_k(5, 5, 3) == 1.0
    assert sampling.pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct sample
    assert sampling.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert math.isnan(sampling.pass_at_k(2, 1, 4))  # k larger than the samples: not estimable


def test_sample_budgets():
    assert sampling.sample_budgets(0) == []
    assert sampling.sample_budgets(1) == [1]
    assert sampling.sample_budgets(6) == [1, 2, 4, 6]
    assert sampling.sample_budgets(8) == [1, 2, 4, 8]


def test_pass_at_k_by_step_with_k_larger_than_some_prompts():
    table = pd.DataFrame(samples(0, "a", [1, 2, 2, 2]) + samples(0, "b", [2, 2]) + samples(1, "a", [1, 1, 1, 1]))
    result = sampling.pass_at_k_by_step(table, [1, 2, 4, 8])
    assert result.loc[0, 1] == pytest.approx((0.25 + 0.0) / 2)
    assert result.loc[0, 2] == pytest.approx((0.5 + 0.0) / 2)
    assert result.loc[0, 4] == 1.0  # only prompt a has 4 samples
    assert result.loc[1].tolist()[:3] == [1.0, 1.0, 1.0]
    assert result[8].isna().all()


def test_maj_at_k_plurality_ties_and_abstentions():
    table = pd.DataFrame(
        samples(0, "a", [2, 1, 1, 2, 1])  # first 2: tie 2 vs 1 -> 2 (seen first); first 4: tie -> 2; all 5: 1 wins
        + samples(0, "b", [None, None, 1])  # first 2 give no answer -> 0; all 3: 1
        + samples(1, "a", [3, 3, 1]))
    result = sampling.maj_at_k_by_step(table, [1, 2, 3, 4, 5, 6])
    assert result.loc[0, 1] == 0.0
    assert result.loc[0, 2] == 0.0
    assert result.loc[0, 3] == pytest.approx(1.0)  # a: [2, 1, 1] -> 1; b: [-, -, 1] -> 1
    assert result.loc[0, 4] == 0.0  # only a qualifies: [2, 1, 1, 2] tie -> 2
    assert result.loc[0, 5] == 1.0
    assert result.loc[1, 3] == 0.0
    assert np.isnan(result.loc[0, 6]) and np.isnan(result.loc[1, 4])


def test_maj_at_k_takes_samples_in_sample_index_order():
    table = pd.DataFrame(samples(0, "a", [1, 2, 2]))
    assert sampling.maj_at_k_by_step(table, [1]).loc[0, 1] == 1.0
    reversed_rows = table.iloc[::-1].reset_index(drop=True)
    assert sampling.maj_at_k_by_step(reversed_rows, [1]).loc[0, 1] == 1.0


def test_coverage_and_distinct_answers():
    table = pd.DataFrame(samples(0, "a", [1, 2, 2]) + samples(0, "b", [3, None, 4]) + samples(1, "a", [2, 2, 2]))
    assert sampling.coverage(table).tolist() == [0.5, 0.0]
    assert sampling.distinct_answers_per_prompt(table).tolist() == [2.0, 1.0]


def test_unknown_correctness_is_left_out():
    table = pd.DataFrame(samples(0, "a", [1, 2]))
    table.loc[1, "correct"] = np.nan
    assert sampling.samples_per_prompt(table) == 2
    assert sampling.pass_at_k_by_step(table, [1, 2]).loc[0].tolist()[0] == 1.0
    assert np.isnan(sampling.pass_at_k_by_step(table, [1, 2]).loc[0, 2])


def test_distinct_n():
    table = pd.DataFrame({"step": [0, 0, 0, 1, 1], "completion": ["a b a", "a b a", "c  d\n", "x", "   "]})
    result = sampling.distinct_n(table, (1, 2, 3))
    # step 0 unigrams: a b a a b a c d -> 4 distinct / 8; bigrams: ab ba ab ba cd -> 3 / 5; trigrams: aba aba -> 1 / 2
    assert result.loc[0].tolist() == pytest.approx([4 / 8, 3 / 5, 1 / 2])
    assert result.loc[1, "distinct_1"] == 1.0
    assert result.loc[1, ["distinct_2", "distinct_3"]].isna().all()  # no bigram at step 1



def test_distinct_n_matches_a_direct_count():
    """The vectorised counts against str.split() per step, on steps that share completions and whitespace."""
    rng = np.random.default_rng(3)
    words = ["a", "b", "c", "dd", " ", "  ", "\n", "\t", ""]
    completions = ["".join(rng.choice(words, size=int(rng.integers(0, 9)))) for _ in range(40)]
    table = pd.DataFrame({"step": rng.integers(0, 5, 120), "completion": rng.choice(completions, size=120)})
    result = sampling.distinct_n(table, (1, 2, 3))
    for step, rows in table.groupby("step"):
        for order in (1, 2, 3):
            grams = [tuple(tokens[i:i + order]) for tokens in rows["completion"].map(str.split)
                     for i in range(len(tokens) - order + 1)]
            expected = len(set(grams)) / len(grams) if grams else np.nan
            assert result.loc[step, f"distinct_{order}"] == pytest.approx(expected, nan_ok=True)

def test_token_entropy():
    table = pd.DataFrame({"step": [0, 0, 1], "logprob": [-2.0, -4.0, np.nan], "num_tokens": [2, 4, 3]})
    result = sampling.token_entropy(table)
    assert result.loc[0] == 1.0  # 6 nats over 6 tokens
    assert np.isnan(result.loc[1])


def test_maj_at_k_without_judged_samples_is_nan():
    table = pd.DataFrame(samples(0, "a", [1, 2])).assign(correct=np.nan)
    assert sampling.maj_at_k_by_step(table, [1, 2]).isna().all().all()
