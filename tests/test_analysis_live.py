"""CollapseWatch (analysis.live) over simulated steps: when the forecast and collapse entries appear."""

from __future__ import annotations

import numpy as np

from analysis.live import CollapseWatch, step_metrics
from test_forecast import NAMES, simulate, true_shares


def steps_of(table):
    return [rows for _, rows in table.groupby("step", sort=True)]


def test_forecast_entries_appear_after_three_steps_and_give_way_to_the_collapse_step():
    table = simulate(true_shares(0.25, 30), seed=0)  # crosses 0.9 at step 16 in expectation
    watch = CollapseWatch(NAMES, last_step=29, warn_within=10)
    logged = [watch.observe(rows) for rows in steps_of(table)]
    assert all("collapse/forecast_step" not in values for values in logged[:2])  # too few steps to fit
    assert "collapse/forecast_step" in logged[5] and logged[5]["collapse/forecast_low"] <= logged[5]["collapse/forecast_step"]
    collapsed = watch.collapse_step
    shares = table.groupby("step")["format"].agg(lambda f: f.value_counts(normalize=True).max())
    assert collapsed == int(shares.index[shares >= 0.9][0])
    assert all(values["collapse/step"] == collapsed for values in logged[collapsed:])
    assert all("collapse/forecast_step" not in values for values in logged[collapsed:])
    assert not watch.imminent  # it happened: nothing left to warn about


def test_imminent_when_the_forecast_is_within_reach():
    table = simulate(true_shares(0.25, 30), seed=1)
    watch = CollapseWatch(NAMES, last_step=29, warn_within=10)
    flags = []
    for rows in steps_of(table):
        watch.observe(rows)
        flags.append(watch.imminent)
        if watch.collapse_step is not None:
            break
    first = flags.index(True)  # ValueError (a failure) if the watch never warned before the collapse
    # When the flag first rose, the forecast step was at most 10 steps ahead of that step.
    replay = CollapseWatch(NAMES, last_step=29, warn_within=10)
    for rows in steps_of(table)[:first + 1]:
        replay.observe(rows)
    assert replay.forecast.collapse_step - first <= 10


def test_rows_without_gold_answers_log_shares_but_no_accuracy_or_forecast():
    table = simulate(true_shares(0.25, 6), seed=0).assign(correct=np.nan)
    watch = CollapseWatch(NAMES, last_step=29)
    logged = [watch.observe(rows) for rows in steps_of(table)]
    assert all(not any(name.startswith(("accuracy/", "pass_at_k/", "format_accuracy/", "collapse/forecast"))
                       for name in values) for values in logged)
    assert sum(logged[0][f"format_share/{name}"] for name in NAMES) == 1.0
    assert step_metrics(steps_of(table)[0], NAMES)["diversity/max_format_share"] == max(
        logged[0][f"format_share/{name}"] for name in NAMES)
