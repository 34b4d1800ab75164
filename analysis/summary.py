"""`echolab analyze`: label rollouts, compute every per-step metric, write `summary.json` and `metrics.parquet`.

`summary.json` holds SPEC.md's keys and the rest of the analysis as nested dicts whose keys are strings
(steps and layers as decimal integers, budgets k likewise). `metrics.parquet` holds the per-step tables in
one long table: columns metric, step, layer, format, expert, k, value (null where a key does not apply).
The same rollouts give byte-identical outputs whether they come from a run directory or a file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from analysis import formats_metrics as fm
from analysis import sampling
from analysis import specialists_metrics as sm
from analysis.classify import format_names, label_formats
from analysis.correctness import grade_reason_share, grade_rollouts
from analysis.forecast import FORECAST_STEPS, forecast_collapse
from analysis.information import total_variation
from analysis.load import read_rollouts, read_run_config
from analysis.output import check_output_dir
from analysis.statistics import entropy_accuracy_fit, format_change_test
from specialists.errors import UserError
from specialists.files import replace_atomically
from specialists.formats import Format, load_formats
from specialists.run_directory import METRICS_TABLE_FILE, SUMMARY_FILE, is_run_dir

DEFAULT_FORMATS = "synthetic"
METRIC_KEYS = ["metric", "step", "layer", "format", "expert", "k", "value"]


def analyze(input_path: str | Path, formats: str | None = None, out_dir: str | Path | None = None,
            collapse_threshold: float = 0.9, progress: bool = True) -> dict:
    """Analyse a run directory or a rollout file; write summary.json and metrics.parquet; return the summary.

    formats: a built-in set name or a TOML/YAML file; None (no --formats given): the run config's `formats`
    for a run directory (see `resolve_formats`), else "synthetic".
    out_dir: default the run directory itself, or `<stem>_analysis/` next to a rollout file.
    """
    input_path = Path(input_path)
    if input_path.is_dir() and not is_run_dir(input_path):
        raise UserError(f"{input_path}: not a run directory (no rollouts/*.parquet files)")
    if not 0 < collapse_threshold <= 1:
        raise UserError(f"collapse threshold must be in (0, 1], got {collapse_threshold}")
    run_dir = input_path if input_path.is_dir() else None
    out = Path(out_dir) if out_dir is not None else run_dir or input_path.with_name(f"{input_path.stem}_analysis")
    check_output_dir(out)
    format_set = resolve_formats(formats, run_dir)
    table = read_rollouts(input_path)
    table["format"] = label_formats(table, format_set, progress)
    table[["final_answer", "correct", "grade_reason"]] = grade_rollouts(table, format_set, progress)
    summary, metrics = summarise(table, format_names(format_set, table["format"]), collapse_threshold, progress)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    replace_atomically({
        out / SUMMARY_FILE: lambda path: path.write_text(text, encoding="utf-8"),
        out / METRICS_TABLE_FILE: lambda path: pq.write_table(pa.Table.from_pandas(metrics, preserve_index=False), path),
    })
    return summary


def resolve_formats(formats: str | None, run_dir: Path | None) -> tuple[Format, ...]:
    """The format set: `formats`, else the run config's `formats` (top level, or in its `analysis` table as
    echolab's pipeline writes it), else the synthetic set. A relative file named by a run config is looked
    up in the run directory first."""
    config = read_run_config(run_dir) if run_dir is not None and formats is None else {}
    name = formats if formats is not None else config.get("formats", config.get("analysis", {}).get("formats"))
    name = DEFAULT_FORMATS if name is None else str(name)
    if run_dir is not None and formats is None and (run_dir / name).is_file():
        name = str(run_dir / name)
    return load_formats(name)


def summarise(table: pd.DataFrame, names: list[str], collapse_threshold: float = 0.9,
              progress: bool = False) -> tuple[dict, pd.DataFrame]:
    """Every metric of a labelled, judged table (columns of `read_rollouts` plus `format`, `final_answer`,
    `correct`): the summary dict and the long per-step metrics table."""
    bar = tqdm(total=3, desc="metrics", unit="group", disable=not progress)
    summary, metrics = _format_metrics(table, names, collapse_threshold)
    bar.update()
    sampling_summary, sampling_metrics = _sampling_metrics(table)
    summary.update(sampling_summary)
    summary["entropy_accuracy_fit"] = _entropy_accuracy_fits(table, names)
    summary["collapse_forecast"] = _collapse_forecast(table, names, collapse_threshold)
    metrics += sampling_metrics
    bar.update()
    tokens = sm.expert_token_counts(table)
    if len(tokens):
        specialists_summary, specialists_metrics = _specialists_metrics(tokens, names)
        summary.update(specialists_summary)
        metrics += specialists_metrics
    bar.update()
    bar.close()
    long = pd.concat([_long(name, values) for name, values in metrics], ignore_index=True)
    return summary, long.sort_values(METRIC_KEYS[:-1], kind="stable", na_position="first").reset_index(drop=True)


def _format_metrics(table: pd.DataFrame, names: list[str], threshold: float) -> tuple[dict, list]:
    shares = fm.format_share(table, names)
    counts = fm.format_counts(table, names)
    dominant = fm.dominant_format(shares)
    collapse = fm.collapse_step(shares, threshold)
    entropy_nats = fm.format_entropy_nats(shares)
    per_step = {
        "format_entropy": fm.format_entropy(shares),
        "effective_format_number": fm.effective_format_number(shares),
        "max_format_share": fm.max_format_share(shares),
        "format_js_divergence": fm.js_divergence_to_first_step(shares),
        "accuracy": fm.accuracy(table).reindex(shares.index),
    }
    first, last = (int(shares.index[0]), int(shares.index[-1])) if len(shares) else (None, None)
    summary = {
        "formats": names,
        "rows": len(table),
        "prompts": int(table["prompt_id"].nunique()),
        "steps": [int(step) for step in shares.index],
        "collapse_threshold": threshold,
        "format_share": _nested(shares),
        "format_counts": _nested(counts),
        "dominant_format": dominant.iloc[-1] if len(dominant) else None,
        "dominant_format_by_step": _flat(dominant),
        "collapse_step": collapse,
        "collapse_epoch": fm.epoch_of_step(table, collapse),
        **{key: _flat(values) for key, values in per_step.items()},
        "format_entropy_nats": _flat(entropy_nats),
        "format_accuracy": _nested(fm.format_accuracy(table, names).reindex(shares.index)),
        "grade_reasons": _nested(grade_reason_share(table)),
        "format_change_test": {"from_step": first, "to_step": last,
                               **(format_change_test(counts.loc[first], counts.loc[last]) if len(counts) else {})},
    }
    metrics = [("format_share", shares), ("format_count", counts), ("format_entropy_nats", entropy_nats),
               ("format_accuracy", fm.format_accuracy(table, names))] + list(per_step.items())
    return summary, metrics


def _sampling_metrics(table: pd.DataFrame) -> tuple[dict, list]:
    budgets = sampling.sample_budgets(sampling.samples_per_prompt(table))
    per_step = {
        "coverage": sampling.coverage(table),
        "distinct_answers": sampling.distinct_answers_per_prompt(table),
        **dict(sampling.distinct_n(table, (1, 2)).items()),
    }
    if _has_token_entropy(table):
        per_step["token_entropy"] = sampling.token_entropy(table)
    pass_at_k, maj_at_k = sampling.pass_at_k_by_step(table, budgets), sampling.maj_at_k_by_step(table, budgets)
    summary = {
        "samples_per_prompt": budgets[-1] if budgets else 0,
        "budgets": budgets,
        "pass_at_k": _nested(pass_at_k),
        "maj_at_k": _nested(maj_at_k),
        **{key: _flat(values) for key, values in per_step.items()},
    }
    return summary, [("pass_at_k", pass_at_k), ("maj_at_k", maj_at_k)] + list(per_step.items())


def _has_token_entropy(table: pd.DataFrame) -> bool:
    return {"logprob", "num_tokens"} <= set(table.columns)


def _entropy_accuracy_fits(table: pd.DataFrame, names: list[str]) -> dict:
    """The Cui et al. fit over this run's steps, with the format entropy and (when logprobs exist) the token entropy."""
    accuracy = fm.accuracy(table)
    entropies = {"format_entropy": fm.format_entropy_nats(fm.format_share(table, names))}
    if _has_token_entropy(table):
        entropies["token_entropy"] = sampling.token_entropy(table)
    return {key: entropy_accuracy_fit(values.tolist(), accuracy.reindex(values.index).tolist())
            for key, values in entropies.items()}


def _collapse_forecast(table: pd.DataFrame, names: list[str], threshold: float) -> dict | None:
    """The collapse forecast made from the run's first FORECAST_STEPS steps up to its last step
    (analysis.forecast), with the fitted model's shares at every step; None for a run with no step after
    those (nothing to check the forecast against) or nothing to fit."""
    steps = sorted(table["step"].unique())
    if len(steps) <= FORECAST_STEPS:
        return None
    forecast = forecast_collapse(table[table["step"].isin(steps[:FORECAST_STEPS])], names, threshold,
                                 horizon=int(steps[-1]))
    if forecast is None:
        return None
    return {**forecast.as_dict(), "shares": _nested(forecast.shares(np.arange(steps[0], steps[-1] + 1)))}


def _specialists_metrics(tokens: pd.DataFrame, names: list[str]) -> tuple[dict, list]:
    shares = sm.expert_share(tokens)
    per_layer_step = {
        "expert_entropy": sm.expert_entropy(shares),
        "expert_cv": sm.expert_coefficient_of_variation(shares),
        "expert_max_violation": sm.expert_max_violation(shares),
        "expert_gini": sm.expert_gini(shares),
        "format_expert_mi": sm.format_expert_mutual_information(tokens),
        "routing_drift": sm.routing_drift(shares),
    }
    dominant = sm.dominant_expert(shares)
    affinity = sm.format_routing(tokens)
    steps = sorted(tokens["step"].unique())
    first, last = int(steps[0]), int(steps[-1])
    summary = {
        "layers": int(shares.index.get_level_values("layer").nunique()),
        "experts": int(shares.shape[1]),
        "expert_share": {str(layer): {str(step): _floats(row) for (_, step), row in block.iterrows()}
                         for layer, block in shares.groupby(level="layer")},
        **{key: _by_layer(values) for key, values in per_layer_step.items()},
        "dominant_expert": {str(layer): int(block.iloc[-1]) for layer, block in dominant.groupby(level="layer")},
        "dominant_expert_by_step": _by_layer(dominant),
        "format_expert_affinity": {
            str(layer): {str(step): {fmt: _floats(by_step.loc[(layer, step, fmt)])
                                     for fmt in names if (layer, step, fmt) in by_step.index}
                         for step, by_step in block.groupby(level="step") if step in (first, last)}
            for layer, block in affinity.groupby(level="layer")},
        "routing_shift": _routing_shift(tokens, first, last),
    }
    metrics = [("expert_share", shares), ("format_expert_affinity", affinity),
               ("dominant_expert", dominant.astype(np.float64))] + list(per_layer_step.items())
    return summary, metrics


def _routing_shift(tokens: pd.DataFrame, first: int, last: int) -> dict:
    decomposition = sm.routing_shift_decomposition(tokens, first, last)
    within = sm.within_format_routing_drift(tokens, first, last)
    shift = {}
    for layer, block in decomposition.groupby(level="layer"):
        parts = block.droplevel("layer")
        shift[str(layer)] = {
            "from_step": first, "to_step": last,
            **{part: _floats(parts.loc[part]) for part in parts.index},
            **{f"{part}_tv": _float(total_variation(parts.loc[part].to_numpy(), 0.0)) for part in parts.index},
            "within_format_tv": {fmt: _float(value) for fmt, value in within.loc[layer].items()} if layer in within.index else {},
        }
    return shift


# ---------------------------------------------------------------- JSON and long-table shapes

def _float(value: object) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _floats(values: pd.Series) -> list[float | None]:
    return [_float(value) for value in values]


def _value(value: object) -> object:
    return value if isinstance(value, str) else _float(value) if isinstance(value, (float, np.floating)) else int(value)


def _flat(series: pd.Series) -> dict:
    """{step: value} with string keys."""
    return {str(int(step)): _value(value) for step, value in series.items()}


def _nested(frame: pd.DataFrame) -> dict:
    """{step: {column: value}} with string keys (columns: formats or budgets k)."""
    return {str(int(step)): {str(column): _value(value) for column, value in row.items()} for step, row in frame.iterrows()}


def _by_layer(series: pd.Series) -> dict:
    """(layer, step)-indexed series -> {layer: {step: value}}."""
    return {str(layer): _flat(block.droplevel("layer")) for layer, block in series.groupby(level="layer")}


def _long(metric: str, values: pd.Series | pd.DataFrame) -> pd.DataFrame:
    """A metric table (index and columns named among step, layer, format, expert, k) as long rows."""
    if isinstance(values, pd.DataFrame):  # melt keeps NaN cells, whatever the pandas version
        frame = values.reset_index().melt(id_vars=list(values.index.names), var_name=values.columns.name,
                                          value_name="value")
    else:
        frame = values.rename("value").reset_index()
    frame.insert(0, "metric", metric)
    for key in METRIC_KEYS:
        if key not in frame.columns:
            frame[key] = None
    frame = frame[METRIC_KEYS]
    return frame.astype({"metric": str, "step": "Int64", "layer": "Int64", "format": object, "expert": "Int64",
                         "k": "Int64", "value": np.float64})
