"""The collapse forecast (analysis.forecast) on trajectories whose answer is known: replicator dynamics
simulated with sampling noise, constant shares, an already collapsed window."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from analysis.forecast import ReplicatorFit, fit_replicator, forecast_collapse, format_outcomes, outcome_arrays

NAMES = ["python_function", "llm_code", "natural_language", "other"]
# A base like the study's quick base as an AVX-512 CPU pretrains it (its README's Setup: each CPU pretrains a
# slightly different base): equal shares, accuracies 0.82 / 0.12 / 0.07
START = np.array([0.33, 0.33, 0.32, 0.02])
ACCURACY = np.array([0.82, 0.12, 0.07, 0.0])
PROMPTS, SAMPLES = 8, 8  # the study's batch: 8 prompts x 8 samples per step


def true_shares(eta: float, steps: int, start=START, accuracy=ACCURACY) -> np.ndarray:
    """The replicator solution s_f(t) = s_f(0) exp(eta a_f t) / sum_g s_g(0) exp(eta a_g t): (steps, formats)."""
    return ReplicatorFit(tuple(NAMES), np.asarray(accuracy), np.log(start), eta, 0).shares(np.arange(steps))


def simulate(shares: np.ndarray, seed: int, accuracy=ACCURACY) -> pd.DataFrame:
    """A rollout table drawn from given shares: each step PROMPTS x SAMPLES completions, formats drawn from
    the step's shares, correctness from the format's accuracy."""
    rng = np.random.default_rng(seed)
    rows = []
    for step, step_shares in enumerate(shares):
        for prompt in range(PROMPTS):
            formats = rng.choice(len(NAMES), size=SAMPLES, p=step_shares)
            correct = rng.random(SAMPLES) < np.asarray(accuracy)[formats]
            rows += [(step, f"p{step}-{prompt}", NAMES[f], float(c)) for f, c in zip(formats, correct, strict=True)]
    return pd.DataFrame(rows, columns=["step", "prompt_id", "format", "correct"])


def crossing(shares: np.ndarray, threshold: float = 0.9) -> int | None:
    crossed = shares.max(axis=1) >= threshold
    return int(np.argmax(crossed)) if crossed.any() else None


def test_fit_recovers_the_parameters_of_noiseless_counts():
    # Counts exactly proportional to the model's shares (N = 10^6 per step): the maximum-likelihood fit is the truth.
    shares = true_shares(0.2, 8)
    n = shares * 1e6
    counts = np.stack([n, n, n * ACCURACY], axis=1)  # all judged; pooled accuracy = ACCURACY (+1/+2 negligible here)
    fit = fit_replicator(np.arange(8), counts, NAMES)
    assert fit.eta == pytest.approx(0.2, rel=1e-4)
    np.testing.assert_allclose(fit.shares(np.arange(8)), shares, atol=1e-6)


def test_newton_solution_equals_scipy_on_noisy_counts():
    table = simulate(true_shares(0.15, 6), seed=1)
    steps, position, rows = outcome_arrays(format_outcomes(table), NAMES)
    per_step = np.stack([rows[position == i].sum(axis=0) for i in range(len(steps))])  # (steps, outcomes, formats)
    fit = fit_replicator(steps, per_step, NAMES)
    counts = per_step[:, 0]
    a = fit.accuracy

    def negative_log_likelihood(theta):  # the same model written directly, for a general-purpose optimiser
        x = np.concatenate([[0.0], theta[:-1]])[None, :] + theta[-1] * a[None, :] * steps[:, None]
        return -(counts * (x - np.logaddexp.reduce(x, axis=1, keepdims=True))).sum()

    reference = minimize(negative_log_likelihood, np.zeros(len(NAMES)), method="Nelder-Mead",
                         options={"xatol": 1e-9, "fatol": 1e-10, "maxiter": 20000})
    assert fit.eta == pytest.approx(reference.x[-1], abs=1e-4)
    assert -negative_log_likelihood(np.concatenate([fit.logits[1:] - fit.logits[0], [fit.eta]])) >= -reference.fun - 1e-6


def test_forecast_finds_winner_and_crossing_step_from_the_first_ten_steps():
    # eta = 0.16 puts the true crossing of 0.9 at step 26 of a 40-step run (the study's GRPO runs collapsed at 19-25).
    shares = true_shares(0.16, 40)
    truth = crossing(shares)
    assert truth == 26
    runs = 30
    right_winner = covered = 0
    errors = []
    for seed in range(runs):
        first_ten = format_outcomes(simulate(shares, seed).query("step < 10"))
        forecast = forecast_collapse(first_ten, NAMES, horizon=39, seed=seed)
        right_winner += forecast.winner == "python_function"
        covered += forecast.low <= truth and (forecast.high is None or truth <= forecast.high)
        errors.append(abs((forecast.collapse_step or 40) - truth))
    # Nominal coverage is 95%; a bound of 25/30 fails only if the true coverage is far below it (P < 1% at 0.95).
    assert right_winner == runs
    assert covered >= 25
    assert np.median(errors) <= 5


def test_no_collapse_is_forecast_when_formats_are_equally_accurate():
    accuracy = np.array([0.5, 0.5, 0.5, 0.5])
    shares = true_shares(0.16, 40, accuracy=accuracy)  # = START at every step: nothing to amplify
    forecasts = [forecast_collapse(format_outcomes(simulate(shares, seed, accuracy).query("step < 10")), NAMES,
                                   horizon=39, seed=seed) for seed in range(20)]
    assert sum(f.collapse_step is None for f in forecasts) >= 18


def test_no_collapse_is_forecast_when_shares_do_not_follow_accuracy():
    shares = true_shares(0.0, 40)  # accuracies differ, but the policy does not move (eta = 0)
    forecasts = [forecast_collapse(format_outcomes(simulate(shares, seed).query("step < 10")), NAMES, horizon=39,
                                   seed=seed) for seed in range(20)]
    assert sum(f.collapse_step is None for f in forecasts) >= 18
    assert np.median([abs(f.fit.eta) for f in forecasts]) < 0.05


def test_a_window_that_already_collapsed_reports_the_observed_step():
    shares = true_shares(0.5, 12)  # fast: crosses within the window
    table = simulate(shares, seed=0)
    observed = table.groupby("step")["format"].agg(lambda f: f.value_counts(normalize=True).max())
    first = int(observed.index[observed >= 0.9][0])
    forecast = forecast_collapse(format_outcomes(table), NAMES, horizon=30)
    assert (forecast.collapse_step, forecast.low, forecast.high, forecast.winner) == (first, first, first, "python_function")


def test_too_little_data_gives_no_forecast_and_seeds_repeat():
    table = simulate(true_shares(0.16, 10), seed=0)
    outcomes = format_outcomes(table)
    assert forecast_collapse(outcomes.query("step == 0"), NAMES) is None  # one step: eta not identifiable
    assert forecast_collapse(format_outcomes(table.assign(correct=np.nan)), NAMES) is None  # nothing judged
    first, again = forecast_collapse(outcomes, NAMES, seed=3), forecast_collapse(outcomes, NAMES, seed=3)
    assert first.as_dict() == again.as_dict()
    with pytest.raises(ValueError, match="horizon"):
        forecast_collapse(outcomes, NAMES, horizon=9)


def test_a_format_absent_from_the_window_keeps_share_zero():
    table = simulate(true_shares(0.16, 8, start=np.array([0.5, 0.5, 0.0, 0.0])), seed=0)
    forecast = forecast_collapse(format_outcomes(table), NAMES, horizon=40)
    assert forecast.fit.formats == ("python_function", "llm_code")
    assert list(forecast.shares(np.array([40])).columns) == ["python_function", "llm_code"]
