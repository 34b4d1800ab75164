"""The study's tables from a finished sweep directory: one row per variant, means over seeds with
bootstrap 95% intervals (analysis.statistics), differences to the first variant with Welch's p-value.

    python experiments/studies/echo_chamber/make_tables.py runs/study-core [BASELINE_VARIANT [VARIANT ...]] > table.md

With variants named after the baseline, only those rows (and the baseline's) are shown.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from analysis.statistics import bootstrap_band, compare_groups


def run_measures(summary: dict) -> dict[str, float]:
    """Per-run numbers: the first recorded step, and the mean of the last five (one step's 64 samples are
    noisy). pass@1 is the accuracy column."""
    steps = sorted(summary["format_share"], key=int)
    first, last = steps[0], steps[-1]
    shares = summary["format_share"]
    dominant = max(shares[last], key=shares[last].get)
    window = steps[-5:]
    mean_over = lambda table: float(np.mean([table[s] for s in window]))  # noqa: E731
    budgets = sorted(summary["pass_at_k"][last], key=int)
    measures = {
        "winner": dominant,
        "collapse_step": np.nan if summary["collapse_step"] is None else summary["collapse_step"],
        "collapse_epoch": np.nan if summary.get("collapse_epoch") is None else summary["collapse_epoch"],
        "max_share_end": float(np.mean([max(shares[s].values()) for s in window])),
        "format_entropy_end": mean_over(summary["format_entropy"]),
        "accuracy_start": summary["accuracy"][first],
        "accuracy_end": mean_over(summary["accuracy"]),
        f"pass{budgets[-1]}_start": summary["pass_at_k"][first][budgets[-1]],
        f"pass{budgets[-1]}_end": float(np.mean([summary["pass_at_k"][s][budgets[-1]] for s in window])),
        # specialist diversity: the least balanced layer's normalised expert entropy (NaN for dense models)
        "expert_entropy_end": min((mean_over(by_step) for by_step in summary.get("expert_entropy", {}).values()),
                                  default=np.nan),
    }
    if "specialist_dominance" in summary:  # a model whose experts have specialists (BTX)
        measures.update(_specialist_measures(summary["specialist_dominance"], dominant))
    return measures


def _specialist_measures(dominance: dict, winner: str) -> dict[str, float]:
    """The winning format's specialist at the first and last recorded step, means over layers: its share of the
    routed tokens, the winning format's alignment with it (P(own specialist | format)), and at the last step the
    share of layers whose dominant expert is the winner's specialist (summary.json's `specialist_dominance`)."""
    def layer_mean(table: dict, end: int) -> float:
        values = [by_step[sorted(by_step, key=int)[end]].get(winner) for by_step in table.values()]
        return float(np.mean([np.nan if value is None else value for value in values]))

    led = dominance["dominant_expert_is_winner_specialist"]
    return {
        "winner_specialist_share_start": layer_mean(dominance["specialist_share"], 0),
        "winner_specialist_share_end": layer_mean(dominance["specialist_share"], -1),
        "winner_alignment_start": layer_mean(dominance["specialist_alignment"], 0),
        "winner_alignment_end": layer_mean(dominance["specialist_alignment"], -1),
        "layers_led_by_winner_specialist_end": float(np.mean([by_step[max(by_step, key=int)] for by_step in led.values()])),
    }


def main(sweep_dir: str, baseline: str | None = None, *only: str) -> None:
    sweep = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    by_variant: dict[str, list[dict]] = defaultdict(list)
    failed = []
    for run in sweep["runs"]:
        variant = Path(run["run_dir"]).name.split("-seed=")[0]
        if only and variant not in (baseline, *only):
            continue
        if run["status"] != "ok":
            failed.append(Path(run["run_dir"]).name)
            continue
        by_variant[variant].append(run_measures(json.loads((Path(run["run_dir"]) / "summary.json").read_text())))
    baseline = baseline or next(iter(by_variant))
    if baseline not in by_variant:
        raise SystemExit(f"no finished runs of variant {baseline!r}; variants: {sorted(by_variant)}")
    by_variant = {baseline: by_variant.pop(baseline), **by_variant}  # the baseline row first
    columns = [key for key in dict.fromkeys(key for runs in by_variant.values() for run in runs for key in run)
               if key != "winner"]  # every variant's columns (only BTX runs have the specialist ones)
    print("| variant | runs | winner (runs) | " + " | ".join(columns) + " |")
    print("|" + " --- |" * (3 + len(columns)))
    for variant, runs in by_variant.items():
        winners = defaultdict(int)
        for run in runs:
            winners[run["winner"]] += 1
        cells = []
        for column in columns:
            values = np.array([run.get(column, np.nan) for run in runs], dtype=float)
            values = values[~np.isnan(values)]
            if len(values) == 0:
                cells.append("none")
                continue
            band = bootstrap_band(_one_row(values)).iloc[0]
            cell = f"{band['mean']:.2f} [{band['low']:.2f}, {band['high']:.2f}]" if len(values) > 1 else f"{band['mean']:.2f}"
            if len(values) < len(runs):
                cell += f" ({len(values)}/{len(runs)})"
            if variant != baseline:
                base = [value for run in by_variant[baseline] if not np.isnan(value := run.get(column, np.nan))]
                difference = compare_groups(base, list(values))
                if difference.get("p_value") is not None:
                    cell += f", p={difference['p_value']:.2g}"
            cells.append(cell)
        winner_text = ", ".join(f"{name} ({count})" for name, count in sorted(winners.items()))
        print(f"| {variant} | {len(runs)} | {winner_text} | " + " | ".join(cells) + " |")
    if failed:
        print(f"\nFailed runs: {', '.join(failed)}")


def _one_row(values: np.ndarray):
    """bootstrap_band takes runs as columns and steps as rows: one pseudo-step holding every run."""
    import pandas as pd

    return pd.DataFrame([values], index=pd.Index([0], name="step"))


if __name__ == "__main__":
    main(*sys.argv[1:])
