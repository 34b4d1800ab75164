"""Statistics across runs and information measures, on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import information, statistics


def test_information_measures():
    assert information.entropy(np.array([0.5, 0.5]), base=2) == pytest.approx(1.0)
    assert information.entropy(np.array([1.0, 0.0])) == 0.0
    assert information.normalised_entropy(np.array([[0.25] * 4, [1, 0, 0, 0]])).tolist() == pytest.approx([1.0, 0.0])
    assert information.normalised_entropy(np.array([1.0])) == 0.0
    assert information.js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert information.total_variation(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(0.5)
    assert information.mutual_information_bits(np.array([[1, 0], [0, 1]])) == pytest.approx(1.0)
    assert information.mutual_information_bits(np.zeros((2, 2))) == 0.0


def test_bootstrap_band_is_seeded_and_brackets_the_mean():
    values = pd.DataFrame({"r0": [0.1, 0.5, np.nan], "r1": [0.3, 0.5, 0.2], "r2": [0.2, 0.5, np.nan]},
                          index=pd.Index([0, 1, 2], name="step"))
    band = statistics.bootstrap_band(values, seed=3)
    pd.testing.assert_frame_equal(band, statistics.bootstrap_band(values, seed=3))
    assert band.loc[0, "mean"] == pytest.approx(0.2)
    assert 0.1 <= band.loc[0, "low"] <= 0.2 <= band.loc[0, "high"] <= 0.3
    assert band.loc[1, ["mean", "low", "high"]].tolist() == pytest.approx([0.5, 0.5, 0.5])  # no spread
    assert band.loc[2, "runs"] == 1 and band.loc[2, ["low", "high"]].isna().all()  # one run: no band


def test_format_change_test():
    same = statistics.format_change_test(pd.Series([10, 20, 30]), pd.Series([1, 2, 3]))
    assert same["statistic"] == pytest.approx(0.0, abs=1e-9) and same["p_value"] == pytest.approx(1.0)
    # 2 x 2 table [[10, 0], [0, 10]]: G = 2 * sum O ln(O / E) = 2 * 20 * ln 2, dof 1
    changed = statistics.format_change_test(pd.Series([10, 0, 0]), pd.Series([0, 10, 0]))
    assert changed["statistic"] == pytest.approx(40 * math.log(2)) and changed["dof"] == 1
    assert changed["p_value"] < 1e-6
    one_format = statistics.format_change_test(pd.Series([5, 0]), pd.Series([7, 0]))
    assert one_format == {"test": "G", "statistic": 0.0, "dof": 0, "p_value": 1.0}
    assert statistics.format_change_test(pd.Series([0, 0]), pd.Series([3, 1]))["p_value"] is None


def test_combined_format_change_test_sums_g_and_dof():
    tests = [{"statistic": 3.0, "dof": 2}, {"statistic": 5.0, "dof": 2}, {"statistic": None, "dof": 0}]
    combined = statistics.combined_format_change_test(tests)
    assert combined["statistic"] == 8.0 and combined["dof"] == 4 and combined["runs"] == 2
    assert combined["p_value"] == pytest.approx(math.exp(-4) * (1 + 4))  # chi-square sf with 4 dof at 8


def test_compare_groups():
    result = statistics.compare_groups([0.2, 0.3, 0.25], [0.6, 0.7, 0.65], seed=1)
    assert result["difference"] == pytest.approx(0.4)
    assert 0.3 < result["low"] < 0.4 < result["high"] < 0.5
    assert result["p_value"] < 0.01
    assert result == statistics.compare_groups([0.2, 0.3, 0.25], [0.6, 0.7, 0.65], seed=1)
    single = statistics.compare_groups([0.2], [0.6, 0.7])
    assert single["difference"] == pytest.approx(0.45) and single["low"] is None and single["p_value"] is None
    assert statistics.compare_groups([], [0.5])["difference"] is None


def test_entropy_accuracy_fit_recovers_the_curve():
    entropy = np.linspace(0.1, 1.0, 8)
    accuracy = -0.2 * np.exp(entropy) + 0.9
    fit = statistics.entropy_accuracy_fit(entropy.tolist(), accuracy.tolist())
    assert fit["a"] == pytest.approx(0.2) and fit["b"] == pytest.approx(0.9) and fit["r2"] == pytest.approx(1.0)
    assert fit["points"] == 8
    flat = statistics.entropy_accuracy_fit([0.5, 0.5, float("nan")], [0.1, 0.2, 0.3])
    assert flat == {"a": None, "b": None, "r2": None, "points": 2}
