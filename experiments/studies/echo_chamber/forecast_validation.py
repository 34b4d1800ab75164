"""How good is the collapse forecast (analysis.forecast)? For each run: forecast from its first K steps,
compare with what the run did. Prints a Markdown table (one row per run and K) and, per K, how often the
winner was right, how far off the collapse step was and how often the interval held it.

    python experiments/studies/echo_chamber/forecast_validation.py runs/study-core/runs/* [--steps 5 10 15]

Rollouts are read, labelled and judged step by step by the analysis' own functions (`read_steps`,
`label_formats`, `grade_rollouts`), with the format set of each run's config, as `echolab analyze` does. A run counts
as collapsed when its largest format share reaches the threshold at some step (analysis.formats_metrics).
Runs shorter than K + 1 steps are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import formats_metrics as fm
from analysis.classify import format_names, label_formats
from analysis.correctness import SANDBOX_WORKERS, grade_rollouts
from analysis.forecast import forecast_collapse, format_outcomes
from analysis.sources import open_input, read_steps
from analysis.summary import resolve_formats
from specialists.sandbox import Sandbox


def run_outcomes(run_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """The run's `format_outcomes`, its rows labelled and judged as `echolab analyze` does, and the format names."""
    formats = resolve_formats(None, run_dir)
    parts = []
    with Sandbox(workers=SANDBOX_WORKERS) as sandbox:
        for table in read_steps(open_input(run_dir)):
            table["format"] = label_formats(table, formats)
            table[["final_answer", "correct", "grade_reason", "correct_source"]] = grade_rollouts(table, formats, sandbox)
            parts.append(format_outcomes(table))
    outcomes = pd.concat(parts, ignore_index=True)
    return outcomes, format_names(formats, pd.Series(outcomes["format"].unique(), dtype=object))


def validate_run(outcomes: pd.DataFrame, names: list[str], steps: int, threshold: float) -> dict | None:
    """Forecast from the first `steps` steps to the run's last; the outcome beside it. None for a short run."""
    run_steps = sorted(outcomes["step"].unique())
    if len(run_steps) <= steps:
        return None
    counts = outcomes.groupby(["step", "format"])["completions"].sum().unstack("format", fill_value=0)
    shares = fm.shares_of(counts.reindex(columns=names, fill_value=0))
    actual_step = fm.collapse_step(shares, threshold)
    forecast = forecast_collapse(outcomes[outcomes["step"].isin(run_steps[:steps])], names, threshold,
                                 horizon=int(run_steps[-1]))
    if forecast is None:
        return None
    actual_winner = fm.dominant_format(shares).loc[actual_step] if actual_step is not None else shares.iloc[-1].idxmax()
    covered = (actual_step is not None and forecast.collapse_step is not None and forecast.low <= actual_step
               and (forecast.high is None or actual_step <= forecast.high))
    return {
        "winner": forecast.winner, "winner_probability": forecast.winner_probability, "actual_winner": actual_winner,
        "step": forecast.collapse_step, "low": forecast.low, "high": forecast.high, "actual_step": actual_step,
        "error": None if forecast.collapse_step is None or actual_step is None else forecast.collapse_step - actual_step,
        "collapse_call_right": (forecast.collapse_step is None) == (actual_step is None),
        "covered": covered,
    }


def table_rows(results: list[tuple[str, int, dict]]) -> list[str]:
    def shown(value) -> str:
        return "none" if value is None else str(value)

    lines = ["| run | K | forecast winner (p) | forecast step [95%] | actual winner | actual step | error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, steps, r in results:
        interval = f"[{shown(r['low'])}, {r['high'] if r['high'] is not None else 'later'}]" if r["step"] is not None else ""
        lines.append(f"| {name} | {steps} | {r['winner']} ({r['winner_probability']:.2f}) | {shown(r['step'])} {interval} | "
                     f"{r['actual_winner']} | {shown(r['actual_step'])} | {shown(r['error'])} |")
    return lines


def summary_rows(results: list[tuple[str, int, dict]]) -> list[str]:
    lines = ["| K | runs | winner right (runs that collapsed) | collapse / no collapse called right | "
             "median abs. error of the step | interval held the step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for steps in sorted({steps for _, steps, _ in results}):
        rows = [r for _, k, r in results if k == steps]
        errors = [abs(r["error"]) for r in rows if r["error"] is not None]
        collapsed = [r for r in rows if r["actual_step"] is not None and r["step"] is not None]
        median = f"{np.median(errors):.1f} (of {len(errors)})" if errors else "n/a"
        ended = [r for r in rows if r["actual_step"] is not None]
        lines.append(f"| {steps} | {len(rows)} | {sum(r['winner'] == r['actual_winner'] for r in ended)}/{len(ended)} | "
                     f"{sum(r['collapse_call_right'] for r in rows)}/{len(rows)} | {median} | "
                     f"{sum(r['covered'] for r in collapsed)}/{len(collapsed)} |")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--steps", nargs="+", type=int, default=[10], help="forecast from the first K steps (default 10)")
    parser.add_argument("--threshold", type=float, default=0.9, help="largest share that counts as collapse")
    args = parser.parse_args(argv)
    results = []
    for run_dir in args.run_dirs:
        outcomes, names = run_outcomes(run_dir)
        for steps in args.steps:
            result = validate_run(outcomes, names, steps, args.threshold)
            if result is not None:
                results.append((run_dir.name, steps, result))
    lines = table_rows(results) + [""] + summary_rows(results)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
