"""`echolab analyze`: read any input step by step, label and grade each step's rollouts, keep the step's metrics,
then write `summary.json` (headline values) and `metrics.parquet` (every per-step metric).

Streaming: analysis.sources reads the input one step at a time; consecutive steps are analysed together in batches
of up to BATCH_ROWS rows and BATCH_CHARS characters of completions (a whole step, however large, is one batch),
and only their metrics are kept, so peak memory is bounded by two batches (the sandbox runs one batch's programs
while the next is read) or the largest steps, not by the run. `summary.json` holds SPEC.md's keys and the rest of the
analysis as nested dicts whose keys are strings (steps and layers as decimal integers, budgets k likewise), and
under `analysis` how the input was read (source, formats, columns, correct_from). `metrics.parquet` holds the
per-step tables in one long table: columns metric, step, layer, format, expert, k, value (null where a key does
not apply); the report draws its figures from it. The same rollouts give byte-identical outputs whether they come
from a run directory or a file. A run directory with held-out evaluations (heldout/, rl.evaluation) adds
summary.json's `heldout` and the heldout_* metrics (`heldout_analysis`).
"""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
from analysis.correctness import SANDBOX_WORKERS, Grading, finish_grading, grade_reason_share, start_grading
from analysis.forecast import FORECAST_STEPS, forecast_collapse, format_outcomes
from analysis.information import total_variation
from analysis.load import InputWarning, StepsOutOfOrder, joined, read_expert_specialists, read_run_config
from analysis.output import check_output_dir
from analysis.sources import Input, ReadOptions, open_input, read_steps
from analysis.statistics import entropy_accuracy_fit, format_change_test
from specialists.errors import UserError
from specialists.files import replace_atomically
from specialists.formats import Format, load_formats
from specialists.run_directory import METRICS_TABLE_FILE, SUMMARY_FILE, heldout_files
from specialists.sandbox import Sandbox

DEFAULT_FORMATS = "synthetic"
BATCH_ROWS = 32768  # steps analysed together: per-call costs (sandbox round trips, groupbys) are paid per batch
BATCH_CHARS = 32 * 2**20
METRIC_KEYS = ["metric", "step", "layer", "format", "expert", "k", "value"]


def analyze(input_path: str | Path, formats: str | None = None, out_dir: str | Path | None = None,
            collapse_threshold: float = 0.9, progress: bool = True, reading: ReadOptions | None = None) -> dict:
    """Analyse any input `analysis.sources` reads; write summary.json and metrics.parquet; return the summary.

    formats: a built-in set name or a TOML/YAML file; None (no --formats given): the run config's `formats`
    for a run directory (see `format_set_name`), else "synthetic".
    out_dir: default the run directory itself, or `<name>_analysis/` beside any other input.
    reading: the source, column map and --correct-from column (default: detect the source).
    """
    if not 0 < collapse_threshold <= 1:
        raise UserError(f"collapse threshold must be in (0, 1], got {collapse_threshold}")
    opened = open_input(input_path, reading)
    out = Path(out_dir) if out_dir is not None else opened.default_out_dir()
    check_output_dir(out)
    formats_name = format_set_name(formats, opened.run_dir)
    format_set = load_formats(formats_name)
    specialists = read_expert_specialists(read_run_config(opened.run_dir)) if opened.run_dir is not None else None
    try:
        pieces = _per_batch(read_steps(opened), format_set, progress)
    except StepsOutOfOrder as late:
        warnings.warn(f"{opened.path}: the rows of step {late.args[0]} are not together; reading the whole input "
                      f"into memory to sort it by step", InputWarning)
        pieces = _per_batch(read_steps(opened, in_memory=True), format_set, progress)
    summary, metrics = combine(pieces, format_set, collapse_threshold, specialists)
    if opened.run_dir is not None and heldout_files(opened.run_dir):
        summary["heldout"], heldout_metrics = heldout_analysis(opened.run_dir, format_set, progress)
        metrics = _sorted(pd.concat([metrics, heldout_metrics], ignore_index=True))
    summary["analysis"] = analysis_settings(opened.source, formats_name, opened.options)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    replace_atomically({
        out / SUMMARY_FILE: lambda path: path.write_text(text, encoding="utf-8"),
        out / METRICS_TABLE_FILE: lambda path: pq.write_table(pa.Table.from_pandas(metrics, preserve_index=False), path),
    })
    return summary


def analysis_settings(source: str, formats_name: str, options: ReadOptions) -> dict:
    """How an input was read and labelled (summary.json's `analysis`; `report` re-analyses when it differs)."""
    return {"source": source, "formats": formats_name, "columns": options.columns, "correct_from": options.correct_from}


def format_set_name(formats: str | None, run_dir: Path | None) -> str:
    """The format set: `formats`, else the run config's `formats` (top level, or in its `analysis` table as
    echolab's pipeline writes it), else the synthetic set. A relative file named by a run config is looked
    up in the run directory first."""
    config = read_run_config(run_dir) if run_dir is not None and formats is None else {}
    name = formats if formats is not None else config.get("formats", config.get("analysis", {}).get("formats"))
    name = DEFAULT_FORMATS if name is None else str(name)
    if run_dir is not None and formats is None and (run_dir / name).is_file():
        name = str(run_dir / name)
    return name


def resolve_formats(formats: str | None, run_dir: Path | None) -> tuple[Format, ...]:
    return load_formats(format_set_name(formats, run_dir))


# ---------------------------------------------------------------- one step at a time

@dataclass(frozen=True)
class StepMetrics:
    """The metrics of a batch of steps (frames indexed by step) and what the run-level summary needs of them."""

    rows: int
    prompts: frozenset
    samples_per_prompt: int  # the most samples any prompt has at one of the steps
    format_counts: pd.DataFrame  # columns: the formats seen in the batch
    format_accuracy: pd.DataFrame
    accuracy: pd.Series
    grade_reasons: pd.DataFrame
    correctness: dict[str, int]  # rows per source of correctness (trainer, gold, column, unknown)
    epochs: pd.Series  # the smallest epoch recorded at each step (NaN: unknown)
    pass_at_k: pd.DataFrame  # columns: the batch's budgets
    maj_at_k: pd.DataFrame
    coverage: pd.Series
    distinct_answers: pd.Series
    distinct_n: pd.DataFrame
    token_entropy: pd.Series | None
    expert_tokens: pd.DataFrame
    format_outcomes: pd.DataFrame | None  # per (step, prompt, format): the collapse forecast's input (first steps only)


def _per_batch(tables, format_set: tuple[Format, ...], progress: bool) -> list[StepMetrics]:
    """Label, grade and measure the steps in batches (see the module doc).

    Pipelined: while the sandbox workers run a batch's programs (in a background thread, which only waits on
    them), this process finishes the batch before and reads and labels the next, so the analysis keeps two
    cores busy. Batches are finished in order and each is graded as on its own: the same metrics as one by one.
    """
    pieces, batch = [], []
    # disable=None: bars on a terminal only, so that an error met mid-stream stays the one line a script reads
    with Sandbox(workers=SANDBOX_WORKERS) as sandbox, ThreadPoolExecutor(1) as background, \
            tqdm(desc="analyse", unit=" rows", unit_scale=True, disable=None if progress else True,
                 mininterval=1.0) as bar:
        def start(batch: list[pd.DataFrame]) -> tuple[Grading, Future]:
            table = joined(batch)
            table["format"] = label_formats(table, format_set)
            grading = start_grading(table, format_set)
            return grading, background.submit(sandbox.run, grading.found.programs)

        def finish(grading: Grading, results: Future) -> None:
            table = grading.table
            table[["final_answer", "correct", "grade_reason", "correct_source"]] = finish_grading(
                grading, results.result(), format_set)
            seen_steps = sum(len(earlier.epochs) for earlier in pieces)
            pieces.append(step_metrics(table, forecast_input=seen_steps < FORECAST_STEPS))  # it reads the first steps
            bar.update(len(table))
            bar.set_postfix(step=int(table["step"].iloc[-1]), refresh=False)

        running = None  # the batch whose programs the sandbox is running

        def analyse(batch: list[pd.DataFrame]) -> None:
            nonlocal running
            started = start(batch)
            if running is not None:
                finish(*running)
            running = started

        rows = chars = 0
        for table in tables:
            size = int(table["completion"].str.len().sum())
            if batch and (rows + len(table) > BATCH_ROWS or chars + size > BATCH_CHARS):
                analyse(batch)
                batch, rows, chars = [], 0, 0
            batch.append(table)
            rows, chars = rows + len(table), chars + size
        if batch:
            analyse(batch)
        if running is not None:
            finish(*running)
    return pieces


def step_metrics(table: pd.DataFrame, forecast_input: bool = True) -> StepMetrics:
    """The metrics of some steps' labelled, judged rows (columns of `analysis.load.normalise` plus `format`,
    `final_answer`, `correct`, `grade_reason`, `correct_source`). forecast_input: False leaves `format_outcomes`
    None (steps after the ones the collapse forecast is fitted to)."""
    names = sorted(table["format"].unique())
    by_prompt = _with_prompt_codes(table)
    samples = sampling.samples_per_prompt(by_prompt)
    budgets = sampling.sample_budgets(samples)
    epochs = (table.groupby("step")["epoch"].min() if "epoch" in table.columns
              else pd.Series(np.nan, index=pd.Index(table["step"].unique(), name="step")))
    return StepMetrics(
        rows=len(table),
        prompts=frozenset(table["prompt_id"].unique()),
        samples_per_prompt=samples,
        format_counts=fm.format_counts(table, names),
        format_accuracy=fm.format_accuracy(table, names),
        accuracy=fm.accuracy(table),
        grade_reasons=grade_reason_share(table),
        correctness=table["correct_source"].value_counts().to_dict(),
        epochs=epochs,
        pass_at_k=sampling.pass_at_k_by_step(by_prompt, budgets),
        maj_at_k=sampling.maj_at_k_by_step(by_prompt, budgets),
        coverage=sampling.coverage(by_prompt),
        distinct_answers=sampling.distinct_answers_per_prompt(by_prompt),
        distinct_n=sampling.distinct_n(table, (1, 2)),
        token_entropy=sampling.token_entropy(table) if _has_token_entropy(table) else None,
        expert_tokens=sm.expert_token_counts(table),
        format_outcomes=format_outcomes(table) if forecast_input else None,
    )


def _with_prompt_codes(table: pd.DataFrame) -> pd.DataFrame:
    """The table with `prompt_id` as integers numbered in the ids' sorted order: grouping by (step, prompt) then
    visits prompts in the same order as the ids (so per-step means add up in the same order), without hashing
    and comparing the id strings in every groupby and building string indexes from them."""
    codes, _ = pd.factorize(table["prompt_id"].to_numpy(dtype=object), sort=True)
    return table.assign(prompt_id=codes)


# ---------------------------------------------------------------- the run from its steps

def combine(pieces: list[StepMetrics], format_set: tuple[Format, ...], collapse_threshold: float = 0.9,
            expert_specialists: list[str] | None = None) -> tuple[dict, pd.DataFrame]:
    """Every metric of the run from its steps' metrics: the summary dict and the long per-step metrics table.
    `expert_specialists` (the format of each expert's specialist, `analysis.load.read_expert_specialists`) adds
    the specialist dominance metrics, computed from the steps' expert token counts like the other expert metrics."""
    counts = pd.concat([piece.format_counts for piece in pieces]).fillna(0).sort_index()
    names = format_names(format_set, pd.Series(list(counts.columns), dtype=object))
    counts = counts.reindex(columns=names, fill_value=0).astype(np.int64).rename_axis(index="step", columns="format")
    accuracy = pd.concat([piece.accuracy for piece in pieces]).sort_index().rename("accuracy")
    format_accuracy = (pd.concat([piece.format_accuracy for piece in pieces]).sort_index()
                       .reindex(columns=names).rename_axis(index="step", columns="format"))
    epochs = pd.concat([piece.epochs for piece in pieces]).rename("epoch").rename_axis("step").reset_index()
    reasons = pd.concat([piece.grade_reasons for piece in pieces]).fillna(0.0).sort_index()
    reasons = reasons.reindex(columns=sorted(reasons.columns)).rename_axis(index="step", columns="reason")
    format_summary, metrics = _format_metrics(counts, accuracy, format_accuracy, epochs, collapse_threshold)
    summary = {
        "formats": format_summary.pop("formats"),
        "rows": sum(piece.rows for piece in pieces),
        "prompts": len(frozenset().union(*(piece.prompts for piece in pieces))),
        **format_summary,
        "grade_reasons": _nested(reasons),
        "correctness": _correctness(pieces),
    }
    sampling_summary, sampling_metrics = _sampling_metrics(pieces)
    summary.update(sampling_summary)
    token_entropy = _concat_steps([piece.token_entropy for piece in pieces if piece.token_entropy is not None])
    summary["entropy_accuracy_fit"] = _entropy_accuracy_fits(counts, accuracy, token_entropy)
    summary["collapse_forecast"] = _collapse_forecast(pieces, names, list(counts.index), collapse_threshold)
    metrics += sampling_metrics + ([("token_entropy", token_entropy)] if token_entropy is not None else [])
    if token_entropy is not None:
        summary["token_entropy"] = _flat(token_entropy)
    tokens = pd.concat([piece.expert_tokens for piece in pieces if len(piece.expert_tokens)] or [pd.DataFrame()],
                       ignore_index=True)
    if len(tokens):
        specialists_summary, specialists_metrics = _specialists_metrics(tokens, names)
        summary.update(specialists_summary)
        metrics += specialists_metrics
        if expert_specialists is not None:
            dominance_summary, dominance_metrics = _specialist_dominance(tokens, fm.dominant_format(fm.shares_of(counts)),
                                                                         expert_specialists)
            summary["specialist_dominance"] = dominance_summary
            metrics += dominance_metrics
    return summary, _sorted(pd.concat([_long(name, values) for name, values in metrics], ignore_index=True))


def _sorted(long: pd.DataFrame) -> pd.DataFrame:
    """metrics.parquet's row order: by metric, step, layer, format, expert, k."""
    return long.sort_values(METRIC_KEYS[:-1], kind="stable", na_position="first").reset_index(drop=True)


# ---------------------------------------------------------------- the held-out evaluation (rl.evaluation)

def heldout_analysis(run_dir: Path, format_set: tuple[Format, ...], progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """The run directory's held-out evaluations (heldout/, rl.evaluation's samples of problems that are never RL
    prompts), labelled and graded like the training rollouts: summary.json's `heldout` block and the long rows
    heldout_pass_at_k (step, k), heldout_maj_at_k (step, k), heldout_accuracy (step), heldout_format_share and
    heldout_format_accuracy (step, format). pass@k is the unbiased estimator over each problem's samples
    (analysis.sampling.pass_at_k, Chen et al. 2021, eq. 1), averaged over the step's problems."""
    opened = Input(Path(run_dir), "echolab", tuple(heldout_files(run_dir)))
    pieces = _per_batch(read_steps(opened), format_set, progress)
    counts = pd.concat([piece.format_counts for piece in pieces]).fillna(0).sort_index()
    names = format_names(format_set, pd.Series(list(counts.columns), dtype=object))
    counts = counts.reindex(columns=names, fill_value=0).astype(np.int64).rename_axis(index="step", columns="format")
    shares = fm.shares_of(counts)
    format_accuracy = (pd.concat([piece.format_accuracy for piece in pieces]).sort_index()
                       .reindex(index=shares.index, columns=names).rename_axis(index="step", columns="format"))
    accuracy = pd.concat([piece.accuracy for piece in pieces]).sort_index().reindex(shares.index).rename("accuracy")
    budgets = sampling.sample_budgets(max(piece.samples_per_prompt for piece in pieces))
    by_k = {name: _by_budget(pieces, name, budgets) for name in ("pass_at_k", "maj_at_k")}
    summary = {
        "steps": [int(step) for step in shares.index],
        "problems": len(frozenset().union(*(piece.prompts for piece in pieces))),
        "samples_per_problem": budgets[-1] if budgets else 0,
        "budgets": budgets,
        "pass_at_k": _nested(by_k["pass_at_k"]),
        "maj_at_k": _nested(by_k["maj_at_k"]),
        "accuracy": _flat(accuracy),
        "formats": names,
        "format_share": _nested(shares),
        "format_accuracy": _nested(format_accuracy),
    }
    metrics = [("heldout_pass_at_k", by_k["pass_at_k"]), ("heldout_maj_at_k", by_k["maj_at_k"]),
               ("heldout_accuracy", accuracy), ("heldout_format_share", shares),
               ("heldout_format_accuracy", format_accuracy)]
    return summary, pd.concat([_long(name, values) for name, values in metrics], ignore_index=True)


def _collapse_forecast(pieces: list[StepMetrics], names: list[str], steps: list[int], threshold: float) -> dict | None:
    """The collapse forecast made from the run's first FORECAST_STEPS steps up to its last step
    (analysis.forecast), with the fitted model's shares at every step; None for a run with no step after
    those (nothing to check the forecast against) or nothing to fit."""
    if len(steps) <= FORECAST_STEPS:
        return None
    outcomes = pd.concat([piece.format_outcomes for piece in pieces if piece.format_outcomes is not None],
                         ignore_index=True)
    forecast = forecast_collapse(outcomes[outcomes["step"].isin(steps[:FORECAST_STEPS])], names, threshold,
                                 horizon=int(steps[-1]))
    if forecast is None:
        return None
    return {**forecast.as_dict(), "shares": _nested(forecast.shares(np.arange(steps[0], steps[-1] + 1)))}


def _correctness(pieces: list[StepMetrics]) -> dict[str, int]:
    """Rows whose correctness came from the trainer's `correct`, from grading against a gold answer, from the
    --correct-from column, or is unknown."""
    total = {source: 0 for source in ("trainer", "gold", "column", "unknown")}
    for piece in pieces:
        for source, count in piece.correctness.items():
            total[source] += int(count)
    return total


def _concat_steps(series: list[pd.Series]) -> pd.Series | None:
    return pd.concat(series).sort_index() if series else None


def _format_metrics(counts: pd.DataFrame, accuracy: pd.Series, format_accuracy: pd.DataFrame, epochs: pd.DataFrame,
                    threshold: float) -> tuple[dict, list]:
    shares = fm.shares_of(counts)
    dominant = fm.dominant_format(shares)
    collapse = fm.collapse_step(shares, threshold)
    entropy_nats = fm.format_entropy_nats(shares)
    per_step = {
        "format_entropy": fm.format_entropy(shares),
        "effective_format_number": fm.effective_format_number(shares),
        "max_format_share": fm.max_format_share(shares),
        "format_js_divergence": fm.js_divergence_to_first_step(shares),
        "accuracy": accuracy.reindex(shares.index),
    }
    first, last = int(shares.index[0]), int(shares.index[-1])
    summary = {
        "formats": list(counts.columns),
        "steps": [int(step) for step in shares.index],
        "collapse_threshold": threshold,
        "format_share": _nested(shares),
        "format_counts": _nested(counts),
        "dominant_format": dominant.iloc[-1],
        "dominant_format_by_step": _flat(dominant),
        "collapse_step": collapse,
        "collapse_epoch": fm.epoch_of_step(epochs.dropna(), collapse),
        **{key: _flat(values) for key, values in per_step.items()},
        "format_entropy_nats": _flat(entropy_nats),
        "format_accuracy": _nested(format_accuracy.reindex(shares.index)),
        "format_change_test": {"from_step": first, "to_step": last,
                               **format_change_test(counts.loc[first], counts.loc[last])},
    }
    metrics = [("format_share", shares), ("format_count", counts), ("format_entropy_nats", entropy_nats),
               ("format_accuracy", format_accuracy)] + list(per_step.items())
    return summary, metrics


def _sampling_metrics(pieces: list[StepMetrics]) -> tuple[dict, list]:
    budgets = sampling.sample_budgets(max(piece.samples_per_prompt for piece in pieces))
    by_k = {name: _by_budget(pieces, name, budgets) for name in ("pass_at_k", "maj_at_k")}
    distinct = pd.concat([piece.distinct_n for piece in pieces]).sort_index()
    per_step = {
        "coverage": pd.concat([piece.coverage for piece in pieces]).sort_index().rename("coverage"),
        "distinct_answers": pd.concat([piece.distinct_answers for piece in pieces]).sort_index(),
        **{column: distinct[column] for column in distinct.columns},
    }
    summary = {
        "samples_per_prompt": budgets[-1] if budgets else 0,
        "budgets": budgets,
        "pass_at_k": _nested(by_k["pass_at_k"]),
        "maj_at_k": _nested(by_k["maj_at_k"]),
        **{key: _flat(values) for key, values in per_step.items()},
    }
    return summary, [("pass_at_k", by_k["pass_at_k"]), ("maj_at_k", by_k["maj_at_k"])] + list(per_step.items())


def _by_budget(pieces: list[StepMetrics], name: str, budgets: list[int]) -> pd.DataFrame:
    """The steps' `name` (pass_at_k or maj_at_k) as rows steps x columns the run's budgets k."""
    # a step's own budgets cover the run's: a budget above a step's samples per prompt is NaN there anyway
    return (pd.concat([getattr(piece, name) for piece in pieces]).sort_index().reindex(columns=budgets)
            .rename_axis(index="step", columns="k"))


def _has_token_entropy(table: pd.DataFrame) -> bool:
    return {"logprob", "num_tokens"} <= set(table.columns)


def _entropy_accuracy_fits(counts: pd.DataFrame, accuracy: pd.Series, token_entropy: pd.Series | None) -> dict:
    """The Cui et al. fit over this run's steps, with the format entropy and (when logprobs exist) the token entropy."""
    entropies = {"format_entropy": fm.format_entropy_nats(fm.shares_of(counts))}
    if token_entropy is not None:
        entropies["token_entropy"] = token_entropy
    return {key: entropy_accuracy_fit(values.tolist(), accuracy.reindex(values.index).tolist())
            for key, values in entropies.items()}


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


def _specialist_dominance(tokens: pd.DataFrame, dominant_format: pd.Series,
                          expert_specialists: list[str]) -> tuple[dict, list]:
    """The per-step specialist metrics (rows of metrics.parquet) and their headline in summary.json: the map, and
    per layer each specialist's share, each format's alignment and whether the dominant expert is the winning
    format's specialist at the first and last step (as `format_expert_affinity`)."""
    shares = sm.expert_share(tokens)
    specialist_share = sm.specialist_share(shares, expert_specialists)
    alignment = sm.specialist_alignment(tokens, expert_specialists)
    winner = sm.dominant_expert_is_winner_specialist(shares, dominant_format, expert_specialists)
    steps = sorted(tokens["step"].unique())
    ends = [steps[0], steps[-1]]
    summary = {
        "expert_specialists": list(expert_specialists),
        "specialist_share": _by_layer_nested(specialist_share, ends),
        "specialist_alignment": _by_layer_nested(alignment, ends),
        "dominant_expert_is_winner_specialist": {
            layer: {step: bool(value) for step, value in by_step.items()}
            for layer, by_step in _by_layer(winner[winner.index.get_level_values("step").isin(ends)]).items()},
    }
    metrics = [("specialist_share", specialist_share), ("specialist_alignment", alignment),
               ("dominant_expert_is_winner_specialist", winner)]
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


def _by_layer_nested(frame: pd.DataFrame, steps: list[int]) -> dict:
    """(layer, step)-indexed frame -> {layer: {step: {column: value}}} at `steps`."""
    frame = frame[frame.index.get_level_values("step").isin(steps)]
    return {str(layer): _nested(block.droplevel("layer")) for layer, block in frame.groupby(level="layer")}


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
