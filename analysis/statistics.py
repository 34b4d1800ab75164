"""Statistics across runs (seeds) and tests of change: confidence bands, the format-change test, group
comparisons and the entropy-accuracy fit. Randomness is seeded: the same input gives the same numbers."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def _bootstrap_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    return values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_band(values: pd.DataFrame, resamples: int = BOOTSTRAP_RESAMPLES, level: float = CONFIDENCE,
                   seed: int = 0) -> pd.DataFrame:
    """Mean over runs and percentile-bootstrap confidence band of that mean, per step.

    values: rows steps, columns runs (NaN where a run lacks the step). Each step resamples its available runs
    with replacement (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13), with a generator
    seeded by (seed, step). Columns: mean, low, high, runs; low/high are NaN with fewer than 2 runs.
    """
    rows = []
    for step, row in values.iterrows():
        present = row.dropna().to_numpy(dtype=np.float64)
        low = high = np.nan
        if len(present) >= 2:
            rng = np.random.default_rng([seed, int(step)])
            low, high = _percentile_interval(_bootstrap_means(present, rng, resamples), level)
        rows.append((present.mean() if len(present) else np.nan, low, high, len(present)))
    return pd.DataFrame(rows, index=values.index, columns=["mean", "low", "high", "runs"])


def format_change_test(before: pd.Series, after: pd.Series) -> dict:
    """G-test of independence on the 2 x F table of format counts at two steps (Sokal & Rohlf, "Biometry",
    G = 2 sum O ln(O / E), chi-square with F' - 1 degrees of freedom, F' the formats seen at either step).
    H0: the format distribution did not change. Completions are treated as independent draws; several
    samples of one prompt share that prompt, so with many samples per prompt the p-value is somewhat
    optimistic. One format only: G = 0, dof 0, p = 1. An empty step: p None."""
    counts = np.vstack([before.to_numpy(dtype=np.float64), after.to_numpy(dtype=np.float64)])
    counts = counts[:, counts.sum(axis=0) > 0]
    if (counts.sum(axis=1) == 0).any():
        return {"test": "G", "statistic": None, "dof": 0, "p_value": None}
    if counts.shape[1] < 2:
        return {"test": "G", "statistic": 0.0, "dof": 0, "p_value": 1.0}
    result = stats.chi2_contingency(counts, correction=False, lambda_="log-likelihood")
    return {"test": "G", "statistic": float(result.statistic), "dof": int(result.dof), "p_value": float(result.pvalue)}


def combined_format_change_test(tests: Sequence[dict]) -> dict:
    """Pool per-run G-tests of independent runs: sum of G is chi-square with the summed degrees of freedom
    under H0 in every run (additivity of independent chi-square variables)."""
    usable = [test for test in tests if test["statistic"] is not None]
    if not usable:
        return {"test": "G (summed over runs)", "statistic": None, "dof": 0, "p_value": None, "runs": 0}
    statistic, dof = sum(test["statistic"] for test in usable), sum(test["dof"] for test in usable)
    p_value = float(stats.chi2.sf(statistic, dof)) if dof else 1.0
    return {"test": "G (summed over runs)", "statistic": float(statistic), "dof": int(dof), "p_value": p_value,
            "runs": len(usable)}


def compare_groups(baseline: Sequence[float], other: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                   level: float = CONFIDENCE, seed: int = 0) -> dict:
    """Difference of means other - baseline over runs, with a percentile-bootstrap interval (each group
    resampled on its own) and Welch's t-test p-value (Welch 1947). Interval and p need >= 2 runs per group."""
    a = np.asarray([v for v in baseline if v is not None and not math.isnan(v)], dtype=np.float64)
    b = np.asarray([v for v in other if v is not None and not math.isnan(v)], dtype=np.float64)
    result = {"baseline_mean": float(a.mean()) if len(a) else None, "other_mean": float(b.mean()) if len(b) else None,
              "difference": float(b.mean() - a.mean()) if len(a) and len(b) else None,
              "low": None, "high": None, "p_value": None, "runs": [len(a), len(b)]}
    if len(a) >= 2 and len(b) >= 2:
        rng = np.random.default_rng(seed)
        differences = _bootstrap_means(b, rng, resamples) - _bootstrap_means(a, rng, resamples)
        result["low"], result["high"] = _percentile_interval(differences, level)
        with warnings.catch_warnings():  # (nearly) identical values: scipy warns and returns NaN or a noisy p
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = stats.ttest_ind(b, a, equal_var=False).pvalue
        result["p_value"] = None if math.isnan(p_value) else float(p_value)
    return result


def entropy_accuracy_fit(entropy: Sequence[float], accuracy: Sequence[float]) -> dict:
    """Least-squares fit of R = -a exp(H) + b (Cui et al. 2025, "The Entropy Mechanism of Reinforcement
    Learning for Reasoning Language Models", arXiv:2505.22617, eq. 1), H entropy in nats, R accuracy;
    linear in x = exp(H). Returns a, b, r2 and the number of points; None values with < 2 distinct H."""
    pairs = [(h, r) for h, r in zip(entropy, accuracy, strict=True)
             if h is not None and r is not None and not (math.isnan(h) or math.isnan(r))]
    x = np.exp(np.asarray([h for h, _ in pairs], dtype=np.float64))
    y = np.asarray([r for _, r in pairs], dtype=np.float64)
    if len(np.unique(x)) < 2:
        return {"a": None, "b": None, "r2": None, "points": len(pairs)}
    slope, intercept = np.polyfit(x, y, 1)
    residual, spread = float(((y - (slope * x + intercept)) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"a": float(-slope), "b": float(intercept), "r2": 1 - residual / spread if spread > 0 else None,
            "points": len(pairs)}
