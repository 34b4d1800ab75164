"""The collapse forecast on simulated runs whose answer is known: format shares follow replicator dynamics
from the quick base's shares and accuracies, with sampling noise only (8 prompts x 8 samples per step).
How often does the forecast from the first 10 steps name the winner, and hold the true collapse step in its
95% interval?

    python experiments/studies/echo_chamber/forecast_simulation.py [--runs 100]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from analysis.forecast import ReplicatorFit, forecast_collapse, format_outcomes

NAMES = ["python_function", "llm_code", "natural_language", "other"]
START = np.array([0.34, 0.31, 0.33, 0.02])  # the quick base's held-out shares (README, Setup)
ACCURACY = np.array([1.00, 0.17, 0.05, 0.0])  # and its per-format accuracies
STEPS, PROMPTS, SAMPLES, FITTED = 40, 8, 8, 10


def simulate(shares: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for step, step_shares in enumerate(shares):
        for prompt in range(PROMPTS):
            formats = rng.choice(len(NAMES), size=SAMPLES, p=step_shares)
            correct = rng.random(SAMPLES) < ACCURACY[formats]
            rows += [(step, f"p{step}-{prompt}", NAMES[f], float(c)) for f, c in zip(formats, correct)]
    return pd.DataFrame(rows, columns=["step", "prompt_id", "format", "correct"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args(argv)
    print("| eta | true collapse step | winner right | interval held the step | open-ended intervals | median abs. error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for eta in (0.12, 0.19):  # true collapse at step 27 (core.toml's GRPO) and at step 17
        shares = ReplicatorFit(tuple(NAMES), ACCURACY, np.log(START), eta, 0).shares(np.arange(STEPS))
        truth = int(np.argmax(shares.max(axis=1) >= 0.9))
        right = held = open_ended = 0
        errors = []
        for seed in range(args.runs):
            table = simulate(shares, np.random.default_rng(seed))
            first_steps = format_outcomes(table[table["step"] < FITTED])
            forecast = forecast_collapse(first_steps, NAMES, horizon=STEPS - 1, seed=seed)
            right += forecast.winner == NAMES[0]
            held += forecast.low <= truth and (forecast.high is None or truth <= forecast.high)
            open_ended += forecast.high is None
            errors.append(abs((STEPS if forecast.collapse_step is None else forecast.collapse_step) - truth))
        print(f"| {eta} | {truth} | {right}/{args.runs} | {held}/{args.runs} | {open_ended}/{args.runs} | "
              f"{np.median(errors):.0f} |")


if __name__ == "__main__":
    main()
