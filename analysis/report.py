"""`echolab report`: one self-contained HTML file (figures as embedded base64 PNG, no network) for one input or
several side by side: anything `analyze` reads (echolab run directories and rollout files, verl dumps, TRL
completion logs, tables).

Runs whose configs differ only in seeds (any config key named `seed`, at any depth) form a group, labelled by its
sweep variant (the run's `name` as `echolab sweep` sets it) or else by the settings that tell the groups apart; a
group's curves are means over its runs with seeded bootstrap 95% bands. Inputs without a config (other trainers' runs)
are groups of their own. The report opens with the format shares over steps of every group, then the findings in
plain language, then tables and the other figures; figures are drawn from each run's long-format
`metrics.parquet`, headline values (collapse step, tests) come from `summary.json`. With several groups the
baseline (`--baseline NAME`, default the first given) is the one the others are compared with. The training
story follows: each group's settings (from config.json), its RL metrics over steps (from metrics.jsonl, in the
run directory's metrics vocabulary), its held-out pass@k over the evaluated steps (runs with rl.evaluation) and
sample completions per format at the first and last steps, and where the policy left its base (the KL to the base
and token entropy by completion position, analysis.base_divergence, for echolab runs whose base is at hand; cached
in the run directory). When the groups differ in exactly two config keys crossed as a grid (a sweep over two
keys), a phase diagram shows each cell's winning format (the majority over its seeds) and mean collapse step.
Each input's analysis is (re)computed with `analyze` when missing, unreadable, older than its rollouts, held-out
evaluations or config, without the `heldout` block its held-out evaluations call for, or made with other settings
(formats, source, columns, --correct-from). The HTML file is replaced atomically.
"""

from __future__ import annotations

import html
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis import figures
from analysis.base_divergence import read_base_divergence
from analysis.classify import label_formats
from analysis.load import CONFIG_FILES, InputWarning, read_run_config
from analysis.output import check_output_file
from analysis.position_metrics import kl_concentration, position_profile
from analysis.run_files import checkpoint_model_size, read_training_metrics
from analysis.sources import Input, ReadOptions, first_and_last_steps, open_input
from analysis.statistics import bootstrap_band, combined_format_change_test, compare_groups, entropy_accuracy_fit
from analysis.summary import analysis_settings, analyze, format_set_name
from specialists.errors import UserError
from specialists.files import replace_atomically
from specialists.formats import load_formats
from specialists.run_directory import METRICS_TABLE_FILE, SUMMARY_FILE, heldout_files

SEED_KEY = "seed"
NAME_KEY = "name"
REPORT_KEYS = ("steps", "formats", "collapse_step", "dominant_format_by_step", "format_change_test", "budgets",
               "analysis", "correctness")


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict
    summary: dict
    metrics: pd.DataFrame | None = None  # the long table of metrics.parquet
    label: str = ""  # the input's name (analysis.sources.Input.name); default the path's last part
    training: pd.DataFrame | None = None  # metrics.jsonl: rows steps, columns metrics (None: the run has none)
    samples: tuple[pd.DataFrame, pd.DataFrame] | None = None  # the first and last steps' rows (SAMPLE_COLUMNS)
    model_size: dict | None = None  # analysis.run_files.checkpoint_model_size (None: no checkpoint)
    divergence: pd.DataFrame | None = None  # analysis.base_divergence's per-token table (None: no base or checkpoint)

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def last_step(self) -> int:
        return int(self.summary["steps"][-1])

    def series(self, metric: str, **keys) -> pd.Series:
        """One metric over steps (float, indexed by step), its other keys fixed: series("pass_at_k", k=8)."""
        rows = self.rows(metric, keys)
        return pd.Series(rows["value"].to_numpy(dtype=np.float64), index=rows["step"].astype(int).to_numpy()).sort_index()

    def table(self, metric: str, column: str, **keys) -> pd.DataFrame:
        """One metric as rows steps x columns `column` (format, k, expert), its other keys fixed."""
        rows = self.rows(metric, keys)
        wide = rows.pivot_table(index="step", columns=column, values="value", aggfunc="first", dropna=False)
        wide.index = wide.index.astype(int)
        return wide.astype(np.float64).sort_index()

    def rows(self, metric: str, keys: dict) -> pd.DataFrame:
        rows = self.metrics[self.metrics["metric"] == metric]
        for key, value in keys.items():
            rows = rows[rows[key] == value]
        return rows


@dataclass(frozen=True)
class Group:
    name: str  # a sweep's variant, the settings that tell groups apart, or the run directory's name
    runs: tuple[Run, ...]

    @property
    def label(self) -> str:
        return f"{self.name} ({len(self.runs)} seeds)" if len(self.runs) > 1 else self.name


def write_report(inputs: list[str | Path], out_file: str | Path, formats: str | None = None,
                 reading: ReadOptions | None = None, baseline: str | None = None, progress: bool = True) -> Path:
    """Write the HTML report of `inputs` (analysing those whose analysis is missing or stale) to `out_file`.
    formats, reading: as for `analyze`, the same for every input. baseline: a group label (with or without its
    " (N seeds)") or input name."""
    if not inputs:
        raise UserError("report needs at least one input")
    out_file = Path(out_file)
    check_output_file(out_file)  # before the runs are analysed, which can take a while
    opened = [open_input(path, reading) for path in inputs]
    shells = [Run(item.path, read_run_config(item.run_dir) if item.run_dir else {}, {}, None, item.name) for item in opened]
    baseline_index = _baseline_index(group_runs(shells), baseline)  # a bad --baseline is named before any analysis
    runs = [load_run(item, formats, progress) for item in opened]
    groups = group_runs(runs)
    groups.insert(0, groups.pop(baseline_index))
    text = render_html(groups)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically({out_file: lambda path: path.write_text(text, encoding="utf-8")})
    return out_file


def _baseline_index(groups: list[Group], baseline: str | None) -> int:
    if baseline is None:
        return 0
    for index, group in enumerate(groups):
        if baseline in (group.label, group.name) or baseline in (run.name for run in group.runs):
            return index
    names = [group.label for group in groups] + [run.name for group in groups for run in group.runs]
    raise UserError(f"--baseline {baseline!r}: no such group or input (names: {', '.join(dict.fromkeys(names))})")


def load_run(item: Input | str | Path, formats: str | None = None, progress: bool = True) -> Run:
    """The input's config and up-to-date analysis (analysed now when its summary.json or metrics.parquet is
    missing, unreadable, stale or made with other settings)."""
    item = item if isinstance(item, Input) else open_input(item)
    out = item.default_out_dir()
    wanted = analysis_settings(item.source, format_set_name(formats, item.run_dir), item.options)
    summary_path, metrics_path = out / SUMMARY_FILE, out / METRICS_TABLE_FILE
    heldout = heldout_files(item.run_dir) if item.run_dir else []
    inputs = list(item.files) + heldout + ([item.run_dir / name for name in CONFIG_FILES
                                            if (item.run_dir / name).is_file()] if item.run_dir else [])
    newest = max(path.stat().st_mtime for path in inputs)
    summary, metrics = None, None
    if all(path.is_file() and path.stat().st_mtime >= newest for path in (summary_path, metrics_path)):
        summary, metrics = _read_analysis(summary_path, metrics_path)
    if (not isinstance(summary, dict) or not all(key in summary for key in REPORT_KEYS) or summary["analysis"] != wanted
            or (heldout and "heldout" not in summary)):
        try:
            summary = analyze(item.path, formats=formats, out_dir=out, progress=progress, reading=item.options)
        except UserError as error:
            raise UserError(f"{item.path}: no up-to-date {SUMMARY_FILE}, and analysing it failed: {error}") from None
        metrics = _read_analysis(summary_path, metrics_path)[1]
    config = read_run_config(item.run_dir) if item.run_dir else {}
    training = read_training_metrics(item.run_dir) if item.run_dir else None
    model_size = checkpoint_model_size(item.run_dir) if item.run_dir else None
    samples = _samples(item, wanted["formats"])
    divergence = read_base_divergence(item.run_dir, wanted["formats"], progress=progress) if item.run_dir else None
    return Run(item.path, config, summary, metrics, item.name, training, samples, model_size, divergence)


def _samples(item: Input, format_set: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of the first and last steps, labelled with the analysis' format set (SAMPLE_COLUMNS)."""
    formats = load_formats(format_set)
    with warnings.catch_warnings():  # what reading the input warns about, `analyze` has said already
        warnings.simplefilter("ignore", InputWarning)
        steps = first_and_last_steps(item)
    labelled = []
    for table in steps:
        table = table.assign(format=label_formats(table, formats))
        labelled.append(table[[column for column in SAMPLE_COLUMNS if column in table.columns]])
    return labelled[0], labelled[1]


def _read_analysis(summary_path: Path, metrics_path: Path) -> tuple[dict | None, pd.DataFrame | None]:
    """summary.json and metrics.parquet as written by `analyze`; (None, None) when either is damaged (it is then
    analysed afresh, like a stale one)."""
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        metrics = pq.read_table(metrics_path).to_pandas()
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, pa.ArrowException):
        return None, None
    return summary, metrics


# ---------------------------------------------------------------- grouping runs

def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _without_seeds(config: dict) -> dict[str, object]:
    """The flattened config minus its seeds and its `name` (a label, which sweeps set per run)."""
    return {key: value for key, value in _flatten(config).items()
            if key.rsplit(".", 1)[-1] != SEED_KEY and key != NAME_KEY}


def _sweep_variant(config: dict) -> str | None:
    """A sweep run's variant: its `name` as `echolab sweep` sets it (SWEEP/VARIANT-KEY=VALUE-...) without the sweep
    and the seed parts, e.g. "btx/joint_grpo-seed=2" -> "joint_grpo"; None for a name a sweep did not set."""
    name = config.get(NAME_KEY)
    if not isinstance(name, str) or "/" not in name:
        return None
    parts = name.split("/", 1)[1].split("-")
    variant = "-".join(part for part in parts if part.partition("=")[0].rsplit(".", 1)[-1] != SEED_KEY)
    return variant or None


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with equal configs apart from seeds, in order of first appearance; a run without a config is alone.
    Labels are the sweep's variant names when every group is one variant of one sweep (the settings table spells
    them out), else the config values that tell groups apart, else the run directory."""
    keyed: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps(_without_seeds(run.config), sort_keys=True, default=str) if run.config else f"dir:{run.path}"
        keyed.setdefault(key, []).append(run)
    flats = [_without_seeds(members[0].config) for members in keyed.values()]
    differing = sorted({key for flat in flats for key in flat if len({json.dumps(f.get(key), default=str) for f in flats}) > 1})
    names = [{_sweep_variant(run.config) if run.config else None for run in members} for members in keyed.values()]
    variants = [next(iter(group_names)) if len(group_names) == 1 else None for group_names in names]
    by_variant = None not in variants and len(set(variants)) == len(variants)  # one variant a group, each its own
    groups = []
    for members, flat, variant in zip(keyed.values(), flats, variants):
        name = variant if by_variant else ", ".join(f"{key}={flat[key]}" for key in differing if key in flat)
        groups.append(Group(name or members[0].name, tuple(members)))
    return groups


# ---------------------------------------------------------------- per-step tables from metrics.parquet

def _by_run(group: Group, values_of) -> pd.DataFrame:
    """Rows steps, one column per run: `values_of(run)` gives each run's per-step series."""
    return pd.DataFrame({index: values_of(run) for index, run in enumerate(group.runs)}).sort_index()


def _band(group: Group, values_of) -> pd.DataFrame:
    return bootstrap_band(_by_run(group, values_of))


def _metric(metric: str, **keys):
    """values_of for one metric with its other keys fixed (e.g. pass@k for one k)."""
    return lambda run: run.series(metric, **keys)


def _mean_over_runs(group: Group, table_of) -> pd.DataFrame:
    """Mean over runs of a per-step table (`table_of(run)`: rows steps); columns as in the first run."""
    frames = [table_of(run) for run in group.runs]
    return pd.concat(frames).groupby(level=0).mean().sort_index()[list(frames[0].columns)]


def _mean_shares(group: Group) -> pd.DataFrame:
    return _mean_over_runs(group, lambda run: run.table("format_share", "format")[run.summary["formats"]])


def _largest_common_budget(group: Group) -> int | None:
    budgets = [set(run.summary["budgets"]) for run in group.runs]
    common = set.intersection(*budgets) if budgets else set()
    return max(common) if common else None


def _has_experts(group: Group) -> bool:
    return all("expert_share" in run.summary for run in group.runs)


def _layers(run: Run) -> list[int]:
    return sorted(int(layer) for layer in run.metrics.loc[run.metrics["metric"] == "expert_share", "layer"].unique())


def _mean_expert_entropy(run: Run) -> pd.Series:
    """Per step: the mean over layers of the normalised expert entropy."""
    return run.table("expert_entropy", "layer").mean(axis=1)


def _pct(value: float | None) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{100 * value:.0f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------- plain-language findings

def findings(group: Group) -> list[str]:
    """Sentences a person can read first: collapse, accuracy, dominant expert, where the expert shift came from."""
    runs, sentences = group.runs, []
    collapsed = [run for run in runs if run.summary["collapse_step"] is not None]
    threshold = _pct(runs[0].summary.get("collapse_threshold", 0.9))
    if len(runs) == 1 and collapsed:
        summary = runs[0].summary
        epoch = f" (epoch {summary['collapse_epoch']:g})" if summary.get("collapse_epoch") is not None else ""
        format_at_collapse = summary["dominant_format_by_step"][str(summary["collapse_step"])]
        sentences.append(f"Collapsed onto {format_at_collapse} at step {summary['collapse_step']}{epoch}: "
                         f"one format had at least {threshold} of the completions.")
    elif collapsed:
        steps_by_format: dict[str, list[str]] = {}
        for run in collapsed:
            step = run.summary["collapse_step"]
            steps_by_format.setdefault(run.summary["dominant_format_by_step"][str(step)], []).append(str(step))
        detail = "; ".join(f"onto {name} at step{'s' if len(steps) > 1 else ''} {', '.join(steps)}"
                           for name, steps in steps_by_format.items())
        sentences.append(f"{len(collapsed)} of {len(runs)} runs collapsed (one format >= {threshold}): {detail}.")
    else:
        shares = _mean_shares(group).iloc[-1]
        sentences.append(f"No collapse (no format reached {threshold}); at the last step {shares.idxmax()} "
                         f"has the largest share, {_pct(shares.max())}.")
    accuracy = _band(group, _metric("accuracy"))["mean"]
    budget = _largest_common_budget(group)
    if accuracy.isna().all():
        sentences.append(_why_accuracy_is_unknown(runs[0]))
    else:
        text = f"Accuracy {_num(accuracy.iloc[0])} → {_num(accuracy.iloc[-1])} (step {accuracy.index[0]} → {accuracy.index[-1]})"
        if budget is not None:
            passes = _band(group, _metric("pass_at_k", k=budget))["mean"]
            text += f"; pass@{budget} {_num(passes.iloc[0])} → {_num(passes.iloc[-1])}"
        sentences.append(text + ".")
    test = combined_format_change_test([run.summary["format_change_test"] for run in runs])
    if test["p_value"] is not None:
        sentences.append(f"Format mix first vs last step: G = {test['statistic']:.1f}, dof {test['dof']}, "
                         f"p = {test['p_value']:.2g}" + (f" (summed over {test['runs']} runs)." if len(runs) > 1 else "."))
    if _has_experts(group):
        sentences += _expert_findings(group)
    if _has_specialists(group):
        sentences.append(_specialist_finding(group))
    if _has_divergence(group):
        sentences += _divergence_finding(group)
    return sentences


def _why_accuracy_is_unknown(run: Run) -> str:
    settings = run.summary["analysis"]
    if settings.get("correct_from"):
        return (f"Accuracy unknown: no gold answers or `correct` values, and the --correct-from column "
                f"{settings['correct_from']!r} holds no values.")
    where = {"verl": "no `gts` in the dump", "trl": "no `answer` column in the completion logs"}.get(
        settings["source"], "no `answer` column")
    return (f"Accuracy unknown: the rollouts carry no gold answers ({where}) and no `correct` column; "
            f"--correct-from COLUMN (e.g. a reward column) takes correctness from a column whose value > 0.")


def _expert_findings(group: Group) -> list[str]:
    layers = _layers(group.runs[0])
    last_shares = {layer: np.mean([run.table("expert_share", "expert", layer=layer).loc[run.last_step].to_numpy()
                                   for run in group.runs], axis=0) for layer in layers}
    layer = max(last_shares, key=lambda name: last_shares[name].max())
    shares = last_shares[layer]
    sentences = [f"Expert {int(shares.argmax())} of layer {layer} carries {_pct(shares.max())} of the routed tokens at "
                 f"the last step (balanced: {_pct(1 / len(shares))})."]
    shifts = [run.summary["routing_shift"] for run in group.runs if run.summary.get("routing_shift")]
    if shifts:
        names = list(shifts[0])
        mean = {part: {name: np.mean([shift[name][f"{part}_tv"] for shift in shifts]) for name in names}
                for part in ("total", "format_mix", "routing")}
        moved = max(names, key=lambda name: mean["total"][name])
        first = shifts[0][moved]
        sentences.append(
            f"From step {first['from_step']} to {first['to_step']} the expert load of layer {moved} moved by "
            f"{_num(mean['total'][moved])} (total variation); the change in format mix accounts for "
            f"{_num(mean['format_mix'][moved])}, changed routing within formats for {_num(mean['routing'][moved])}"
            + (" — the specialists follow the formats." if mean["format_mix"][moved] > mean["routing"][moved]
               else " — routing changed beyond the format mix."))
    return sentences


# ---------------------------------------------------------------- figures

def format_share_overview(groups: list[Group]) -> str:
    """The picture a reader wants first: each group's format shares over steps, one panel per group."""
    panels = {group.label: _mean_shares(group) for group in groups}
    collapses = {group.label: [run.summary["collapse_step"] for run in group.runs if run.summary["collapse_step"] is not None]
                 for group in groups}
    return figures.format_share_panels(panels, collapses)


def group_figures(group: Group) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for one group (its format shares are in the overview on top)."""
    formats = group.runs[0].summary["formats"]
    accuracy = {"all formats": _band(group, _metric("accuracy"))}
    for name in formats:
        accuracy[name] = _band(group, _metric("format_accuracy", format=name))
    result = [("Accuracy, overall and per format (a format's line stops where it is no longer used)",
               figures.lines_over_steps(accuracy, "accuracy", group.label))]
    budgets = sorted({k for run in group.runs for k in run.summary["budgets"]})
    sampling = {f"pass@{k}": _band(group, _metric("pass_at_k", k=k)) for k in budgets}
    sampling["coverage"] = _band(group, _metric("coverage"))
    if budgets:
        sampling[f"maj@{budgets[-1]}"] = _band(group, _metric("maj_at_k", k=budgets[-1]))
    result.append(("pass@k (unbiased estimator), maj@k and coverage over RL steps",
                   figures.lines_over_steps(sampling, "rate", group.label)))
    if all("heldout" in run.summary for run in group.runs):
        heldout_budgets = sorted({k for run in group.runs for k in run.summary["heldout"]["budgets"]})
        heldout = {f"held-out pass@{k}": _band(group, _metric("heldout_pass_at_k", k=k)) for k in heldout_budgets}
        heldout["training batch pass@1"] = _band(group, _metric("pass_at_k", k=1))
        result.append(("Held-out pass@k (unbiased estimator) at the evaluated RL steps: rl.evaluation's problems, never "
                       "RL prompts, beside the training batches' pass@1",
                       figures.lines_over_steps(heldout, "rate", group.label)))
    if _has_experts(group):
        layers = _layers(group.runs[0])
        heat = {str(layer): _mean_over_runs(group, lambda run, layer=layer: run.table("expert_share", "expert", layer=layer))
                for layer in layers}
        result.append(("Expert share per layer over RL steps (share of the layer's routed tokens)",
                       figures.expert_share_heatmaps(heat, group.label)))
        for which, step_of in (("first", lambda run: int(run.summary["steps"][0])), ("last", lambda run: run.last_step)):
            affinity = {str(layer): _mean_affinity(group, layer, step_of) for layer in layers}
            affinity = {layer: frame for layer, frame in affinity.items() if frame is not None}
            if affinity:
                result.append((f"Format × expert affinity at the {which} step: P(expert | format), mean over runs",
                               figures.affinity_heatmaps(affinity, f"{group.label}, {which} step")))
    if _has_specialists(group):
        result.append(_specialist_figure(group))
    if _has_divergence(group):
        result += _divergence_figure(group)
    return result


# ---------------------------------------------------------------- where the policy leaves its base

FIRST_TOKENS = 3  # the completion positions counted as where a completion commits to its format
MIN_COMPLETIONS = 4  # a position is drawn for a format and step when at least this many completions reach it


def _has_divergence(group: Group) -> bool:
    return all(run.divergence is not None and len(run.divergence) for run in group.runs)


def _divergence_finding(group: Group) -> list[str]:
    """The sequence KL to the base at the last step every run measured, and how much of it is in the first tokens
    (analysis.position_metrics.kl_concentration; formats pooled, means over runs); none without such a step."""
    per_run = [kl_concentration(run.divergence, FIRST_TOKENS, by=("step",)).set_index("step") for run in group.runs]
    common = set.intersection(*(set(frame.index) for frame in per_run))
    if not common:
        return []
    step = max(common)
    mean = pd.concat([frame.loc[[step]] for frame in per_run]).mean()
    runs = " per run" if len(group.runs) > 1 else ""
    return [f"KL to the base at step {step} (exact, {int(mean['completions'])} sampled completions{runs}): "
            f"{_num(mean['kl_per_sequence'])} nats per completion, {_pct(mean['share_first'])} of it in the first "
            f"{FIRST_TOKENS} of about {mean['mean_tokens']:.0f} tokens; the per-token mean a KL penalty sees is "
            f"{_num(mean['kl_per_token'], 3)}."]


def _divergence_figure(group: Group) -> list[tuple[str, str]]:
    """KL to the base and token entropy by completion position, a pair of panels per format, a line per measured
    step (the group's runs pooled); nothing when no format has MIN_COMPLETIONS completions at any position."""
    profile = position_profile(pd.concat([run.divergence for run in group.runs], ignore_index=True))
    profile = profile[profile["completions"] >= MIN_COMPLETIONS]
    order = list(dict.fromkeys([*group.runs[0].summary["formats"], *profile["format"]]))
    panels = {}
    for name in (name for name in order if (profile["format"] == name).any()):
        rows = profile[profile["format"] == name]
        panels[f"KL to base (nats) · {name}"] = rows.pivot(index="position", columns="step", values="kl")
        panels[f"token entropy (nats) · {name}"] = rows.pivot(index="position", columns="step", values="entropy")
    if not panels:
        return []
    sampled = kl_concentration(group.runs[0].divergence, FIRST_TOKENS, by=("step",))["completions"].max()
    return [("Where the policy leaves its base: exact KL(policy of the step || base) and the policy's token entropy at "
             f"each completion position, per format; means over the completions sampled at each measured step (up to "
             f"{int(sampled)} per step{' and run' if len(group.runs) > 1 else ''}; step 0 is the base itself, KL 0); "
             f"positions fewer than {MIN_COMPLETIONS} completions reach are left out",
             figures.position_panels(panels))]


# ---------------------------------------------------------------- specialist dominance (experts trained apart)

def _has_specialists(group: Group) -> bool:
    return all("specialist_dominance" in run.summary for run in group.runs)


def _layer_mean(run: Run, metric: str) -> pd.DataFrame:
    """A per-(layer, step, format) metric of metrics.parquet as rows steps x columns the specialists' formats
    (in the map's order), the mean over layers."""
    rows = run.rows(metric, {})
    wide = rows.groupby(["step", "format"])["value"].mean().unstack("format")
    wide.index = wide.index.astype(int)
    specialists = list(dict.fromkeys(run.summary["specialist_dominance"]["expert_specialists"]))
    return wide.reindex(columns=specialists).astype(np.float64).sort_index()


def _specialist_tables(group: Group) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Specialist share, format share and alignment (rows steps, columns the specialists' formats), means over
    layers and runs."""
    share = _mean_over_runs(group, lambda run: _layer_mean(run, "specialist_share"))
    alignment = _mean_over_runs(group, lambda run: _layer_mean(run, "specialist_alignment"))
    formats = _mean_shares(group)
    return share, formats[[name for name in share.columns if name in formats.columns]], alignment


def _specialist_finding(group: Group) -> str:
    share, formats, alignment = _specialist_tables(group)
    first, last = share.index[0], share.index[-1]
    leader = formats.loc[last].idxmax() if formats.shape[1] else share.loc[last].idxmax()
    return (f"Specialists trained apart (means over layers): at step {last} the {leader} specialist carries "
            f"{_pct(share.loc[last, leader])} of the routed tokens (step {first}: {_pct(share.loc[first, leader])})"
            + (f", and {leader} has {_pct(formats.loc[last, leader])} of the completions" if formats.shape[1] else "")
            + "; alignment of each format with its own specialist: "
            + ", ".join(f"{name} {_num(alignment.loc[first, name])} → {_num(alignment.loc[last, name])}"
                        for name in alignment.columns) + ".")


def _specialist_figure(group: Group) -> tuple[str, str]:
    share, formats, alignment = _specialist_tables(group)
    specialists = group.runs[0].summary["specialist_dominance"]["expert_specialists"]
    chance = specialists.count(specialists[0]) / len(specialists)
    return ("Specialist dominance (experts trained apart): each specialist's share of the routed tokens beside its "
            "format's share of the completions, and how much of each format's routing goes to its own specialist "
            "(dotted: chance); means over layers" + (" and runs" if len(group.runs) > 1 else ""),
            figures.specialist_dominance(share, formats, alignment, chance, group.label))


def _mean_affinity(group: Group, layer: int, step_of) -> pd.DataFrame | None:
    """Mean over runs of P(expert | format) at the step `step_of(run)` (rows formats, columns experts); None when
    no run has it."""
    frames = []
    for run in group.runs:
        rows = run.rows("format_expert_affinity", {"layer": layer, "step": step_of(run)})
        if len(rows):
            frames.append(rows.pivot_table(index="format", columns="expert", values="value", aggfunc="first"))
    if not frames:
        return None
    mean = pd.concat(frames).groupby(level=0).mean()
    mean.columns = [int(column) for column in mean.columns]
    order = [name for name in group.runs[0].summary["formats"] if name in mean.index]
    return mean.loc[order]


# ---------------------------------------------------------------- several groups / runs

COMPARED = (
    ("largest format share", _metric("max_format_share"), (0, 1)),
    ("format entropy (normalised)", _metric("format_entropy"), (0, 1)),
    ("accuracy", _metric("accuracy"), (0, 1)),
)


def _compared_metrics(groups: list[Group]) -> list[tuple[str, object, tuple | None]]:
    metrics = list(COMPARED)
    budgets = [_largest_common_budget(group) for group in groups]
    if all(budgets):
        k = min(budgets)
        metrics.append((f"pass@{k}", _metric("pass_at_k", k=k), (0, 1)))
    if all(_has_experts(group) for group in groups):
        metrics.append(("expert entropy (normalised, mean over layers)", _mean_expert_entropy, (0, 1)))
    return metrics


def comparison(groups: list[Group]) -> tuple[list[tuple[str, str]], str]:
    """Figures with each group's mean and 95% band, and a table of last-step values against the baseline (the
    first group)."""
    metrics = _compared_metrics(groups)
    plots = [(f"{name} per group: mean over runs, shaded 95% bootstrap band",
              figures.lines_over_steps({group.label: _band(group, values_of) for group in groups}, name, name, ylim))
             for name, values_of, ylim in metrics]
    baseline = groups[0]
    rows = []
    for name, values_of, _ in metrics:
        last = {group.label: [values_of(run).get(run.last_step, np.nan) for run in group.runs] for group in groups}
        for group in groups:
            mean, low, high = bootstrap_band(pd.DataFrame([last[group.label]]))[["mean", "low", "high"]].iloc[0]
            cells = [name, group.label, f"{_num(mean)} [{_num(low)}, {_num(high)}]"]
            if group is baseline:
                cells += ["baseline", ""]
            else:
                diff = compare_groups(last[baseline.label], last[group.label])
                cells += [f"{_num(diff['difference'])} [{_num(diff['low'])}, {_num(diff['high'])}]",
                          "n/a" if diff["p_value"] is None else f"{diff['p_value']:.2g}"]
            rows.append(cells)
    header = ["metric (last step)", "group", "mean [95% CI]", f"difference vs baseline ({baseline.label}) [95% CI]",
              "Welch p"]
    return plots, _table(header, rows)


def entropy_accuracy_figure(groups: list[Group]) -> str:
    """Every run's (format entropy, accuracy) per step, with the Cui et al. fit over each group's pooled points."""
    points = {group.label: pd.concat([pd.DataFrame({"entropy": run.series("format_entropy_nats"),
                                                    "accuracy": run.series("accuracy")}) for run in group.runs])
              .astype(np.float64).dropna() for group in groups}
    fits = {label: entropy_accuracy_fit(frame["entropy"].tolist(), frame["accuracy"].tolist()) for label, frame in points.items()}
    return figures.entropy_accuracy_scatter(points, fits)


# ---------------------------------------------------------------- phase diagram: a sweep over two keys

@dataclass(frozen=True)
class PhaseCell:
    """One cell of a two-key sweep: the group of runs with those two values (its seeds)."""

    winners: dict[str, int]  # format -> runs whose dominant format at the last step it is, most runs first
    collapse_steps: tuple[int, ...]  # the collapse steps of the runs that collapsed

    @property
    def runs(self) -> int:
        return sum(self.winners.values())

    @property
    def winner(self) -> str | None:
        """The format most runs end on; None when two or more tie for the most."""
        counts = list(self.winners.values())
        return next(iter(self.winners)) if len(counts) == 1 or counts[0] > counts[1] else None

    @property
    def mean_collapse_step(self) -> float | None:
        return float(np.mean(self.collapse_steps)) if self.collapse_steps else None


def _axis_values(values: list) -> list:
    """An axis' distinct values: ascending when all are numbers, else in order of first appearance."""
    distinct = list(dict.fromkeys(values))
    numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in distinct)
    return sorted(distinct) if numbers else distinct


def phase_grid(groups: list[Group]) -> tuple[str, list, str, list, dict[tuple, PhaseCell]] | None:
    """The groups as the cells of a sweep over two config keys, when they are one: every group has a config and
    the groups differ in exactly two keys (seeds and names aside) with scalar values, and some value of each key
    is crossed with two values of the other (a grid, maybe with holes; not a diagonal). Returns (x key, its values,
    y key, its values, cells keyed (x value, y value)); x is the key with more values. None otherwise."""
    if len(groups) < 3 or not all(run.config for group in groups for run in group.runs):
        return None
    flats = [_without_seeds(group.runs[0].config) for group in groups]
    keys = sorted({key for flat in flats for key in flat
                   if len({json.dumps(other.get(key), sort_keys=True, default=str) for other in flats}) > 1})
    if len(keys) != 2 or not all(isinstance(flat.get(key), (str, int, float)) for flat in flats for key in keys):
        return None
    if any(pd.Series([flat[key] for flat in flats]).value_counts().max() < 2 for key in keys):
        return None  # no value of this key has two cells: a diagonal
    values = {key: _axis_values([flat[key] for flat in flats]) for key in keys}
    x_key, y_key = sorted(keys, key=lambda key: -len(values[key]))
    cells = {}
    for group, flat in zip(groups, flats):
        winners = pd.Series([run.summary["dominant_format"] for run in group.runs]).value_counts(sort=True)
        collapsed = tuple(int(run.summary["collapse_step"]) for run in group.runs if run.summary["collapse_step"] is not None)
        cells[(flat[x_key], flat[y_key])] = PhaseCell(dict(winners.items()), collapsed)
    return x_key, values[x_key], y_key, values[y_key], cells


def _phase_labels(cell: PhaseCell | None) -> tuple[str, str, str, str]:
    """(winner, its count, mean collapse step, runs collapsed) as text; a tie's winner names the tied formats."""
    if cell is None:
        return "", "", "", ""
    top = next(iter(cell.winners.values()))
    if cell.winner is None:
        winner, count = "tie: " + " / ".join(sorted(name for name, n in cell.winners.items() if n == top)), f"{top}/{cell.runs} each"
    else:
        winner, count = cell.winner, f"{top}/{cell.runs}"
    mean = cell.mean_collapse_step
    return winner, count, "none" if mean is None else f"{mean:.1f}", f"{len(cell.collapse_steps)}/{cell.runs}"


def phase_section(groups: list[Group]) -> str:
    """For a sweep over two keys (`phase_grid`): a table and a figure of the winning format per cell (the
    majority over its seeds, with the count) and its mean collapse step; empty otherwise."""
    grid = phase_grid(groups)
    if grid is None:
        return ""
    x_key, xs, y_key, ys, cells = grid
    labels = {(x, y): _phase_labels(cells.get((x, y))) for x in xs for y in ys}

    def frame(value_of) -> pd.DataFrame:  # rows y values, columns x values
        return pd.DataFrame([[value_of(x, y) for x in xs] for y in ys], index=[_shown(y) for y in ys],
                            columns=[_shown(x) for x in xs])

    winners = frame(lambda x, y: cells[(x, y)].winner if (x, y) in cells else None)
    collapse = frame(lambda x, y: np.nan if (x, y) not in cells or cells[(x, y)].mean_collapse_step is None
                     else cells[(x, y)].mean_collapse_step)
    # in the figure's cells, two short lines each; a tie is just "tie"
    winner_text = frame(lambda x, y: "" if (x, y) not in cells else
                        f"{'tie' if cells[(x, y)].winner is None else labels[(x, y)][0]}\n({labels[(x, y)][1]})")
    collapse_text = frame(lambda x, y: f"{labels[(x, y)][2]}\n({labels[(x, y)][3]})" if (x, y) in cells else "")
    png = figures.phase_diagram(winners, winner_text, collapse, collapse_text, x_key, y_key)
    rows = [[f"{y_key}={_shown(y)}", *(f"{winner} ({count}) · collapse {step} ({collapsed})" if winner else ""
                                       for winner, count, step, collapsed in (labels[(x, y)] for x in xs))] for y in ys]
    threshold = _pct(groups[0].runs[0].summary.get("collapse_threshold", 0.9))
    return ("<h2>Phase diagram</h2>"
            + f"<p>The runs form a sweep over two keys, {html.escape(x_key)} and {html.escape(y_key)}. Per cell: the "
              f"format most of its runs end on (dominant at the last step; runs won / runs), and the mean step at "
              f"which one format first reached {threshold} of the completions (runs collapsed / runs).</p>"
            + _table([f"{y_key} / {x_key}", *(f"{x_key}={_shown(x)}" for x in xs)], rows)
            + _figure(f"Phase diagram over {x_key} and {y_key}: winning format per cell (majority over seeds) and "
                      "mean collapse step (grey: no run collapsed; blank: no runs)", png))


# ---------------------------------------------------------------- collapse forecast

def forecast_section(runs: list[Run]) -> str:
    """Per run with a forecast in its summary (analysis.forecast, made by `analyze` from the first steps): the
    forecast against what happened. Empty when no run has one."""
    figures_ = []
    for run in runs:
        forecast = run.summary.get("collapse_forecast")
        if not forecast:
            continue
        fitted = forecast["fitted_steps"]
        predicted = (f"collapse onto {forecast['winner']} at step {forecast['collapse_step']} "
                     f"[{forecast['low']}, {forecast['high'] if forecast['high'] is not None else 'later'}]"
                     if forecast["collapse_step"] is not None else f"no collapse by step {forecast['horizon']}")
        happened = (f"collapsed onto {run.summary['dominant_format_by_step'][str(run.summary['collapse_step'])]} at step "
                    f"{run.summary['collapse_step']}" if run.summary["collapse_step"] is not None else "no collapse")
        caption = (f"{run.name}: replicator forecast from steps {fitted[0]}–{fitted[-1]} (dashed; winner in "
                   f"{forecast['winner_probability']:.0%} of bootstrap fits): {predicted}; observed (solid): {happened}")
        observed = pd.DataFrame(run.summary["format_share"]).T.rename(index=int).astype(np.float64).sort_index()
        model = pd.DataFrame(forecast["shares"]).T.rename(index=int).astype(np.float64).sort_index()
        png = figures.collapse_forecast(observed, model, fitted[-1], forecast["threshold"],
                                        (forecast["collapse_step"], forecast["low"], forecast["high"]),
                                        run.summary["collapse_step"], run.name)
        figures_.append(_figure(caption, png))
    return "<h2>Collapse forecast</h2>" + "".join(figures_) if figures_ else ""


# ---------------------------------------------------------------- the training story: settings

# Tuning parameters of rl.mitigations switches: shown beside their switch when it is on, never as mitigations of
# their own. A copy of rl.config.MITIGATION_PARAMETERS, which is derived from the typed config's fields (each
# parameter's `Tunes`): analysis does not import rl, so tests/test_report.py holds the two equal.
MITIGATION_PARAMETERS = {"cov_ratio": ("clip_cov", "kl_cov"), "kl_cov_coef": ("kl_cov",),
                         "pretrain_replay_batch": ("pretrain_replay_coef",), "prefix_kl_tokens": ("prefix_kl_coef",),
                         "outcome_exploration_mode": ("outcome_exploration_coef",)}


def seed_labels(config: dict) -> list[str]:
    """The config's seeds by name ("seed=0", "rl.seed=2"); a seed left None (rl.seed: use the top-level seed) is
    not one."""
    return [f"{key}={value}" for key, value in _flatten(config).items()
            if key.rsplit(".", 1)[-1] == SEED_KEY and value is not None]


def _group_seeds(group: Group) -> str:
    """Each seed key with its values over the group's runs: "seed 0; rl.seed 0, 1, 2"."""
    values: dict[str, list[str]] = {}
    for run in group.runs:
        for label in seed_labels(run.config):
            key, value = label.split("=", 1)
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    return "; ".join(f"{key} {', '.join(found)}" for key, found in values.items()) or "none recorded"


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _mitigations(flat: dict[str, object]) -> str:
    prefix = "rl.mitigations."
    settings = {key.removeprefix(prefix): value for key, value in flat.items() if key.startswith(prefix)}
    on = [name for name, value in settings.items() if value and name not in MITIGATION_PARAMETERS]
    shown = []
    for name in on:
        parameters = [f"{parameter}={_shown(settings[parameter])}" for parameter, switches in MITIGATION_PARAMETERS.items()
                      if name in switches and parameter in settings]
        value = "" if settings[name] is True else f"={_shown(settings[name])}"
        shown.append(f"{name}{value}" + (f" ({', '.join(parameters)})" if parameters else ""))
    if flat.get("rl.epsilon_high") is not None:
        shown.append(f"clip-higher (epsilon_high={_shown(flat['rl.epsilon_high'])})")
    if flat.get("rl.grpo.dynamic_sampling"):
        shown.append(f"dynamic sampling (dynamic_sampling_rounds={_shown(flat.get('rl.grpo.dynamic_sampling_rounds'))})")
    return ", ".join(shown) or "none"


def _model(flat: dict[str, object], size: dict | None) -> tuple[str, str]:
    """(kind or path, size) from the config's `model` section, or a TRL run's model name, and the checkpoint."""
    if any(key.startswith("model.") for key in flat):
        kind = f"{flat['model.path']} (model.path)" if flat.get("model.path") else f"{flat.get('model.kind')} (built-in)"
    else:
        kind = _shown(flat["model"]) if flat.get("model") is not None else "n/a"
    if size is not None:
        experts = (f", {size['experts']} experts ({size['experts_per_token']} per token)" if size["experts"] else ", dense")
        return kind, f"{size['parameters']:,} parameters{experts}, {size['layers']} layers ({size['model_type']})"
    if flat.get("model.path") is None and "model.num_layers" in flat:  # a built-in model without a checkpoint here
        experts = (f", {flat['model.num_experts']} experts ({flat['model.experts_per_token']} per token)"
                   if flat.get("model.kind") in ("moe", "btx") else ", dense")
        return kind, f"parameters n/a (no checkpoint){experts}, {flat['model.num_layers']} layers"
    return kind, "n/a"


def settings_of(run: Run) -> dict[str, str]:
    """What a reader needs to know about how a run was trained, from its config.json (echolab's, or the TRL
    callback's `trl` section of GRPOConfig arguments) and its checkpoint; "n/a" where the config does not say."""
    flat = _flatten(run.config)

    def first(*keys: str) -> str:
        return next((_shown(flat[key]) for key in keys if flat.get(key) is not None), "n/a")

    algorithm = first("rl.algorithm", "trainer")
    clip = first("rl.epsilon", "trl.epsilon")
    high = first("rl.epsilon_high", "trl.epsilon_high")
    kind, size = _model(flat, run.model_size)
    settings = {
        "algorithm": algorithm + (f" (loss {first('rl.grpo.loss_type')})" if algorithm == "grpo" else ""),
        "learning rate": first("rl.learning_rate", "trl.learning_rate"),
        "KL coefficient (beta)": first("rl.beta", "trl.beta"),
        "clip range (epsilon low / high)": clip + (f" / {high}" if high != "n/a" else ""),
        "samples per prompt": first("rl.sampling.samples_per_prompt", "trl.num_generations"),
        "prompts per step": first("rl.prompts_per_step"),
        "steps": first("rl.steps", "trl.max_steps"),
        "temperature": first("rl.sampling.temperature", "trl.temperature"),
        "max_new_tokens": first("rl.sampling.max_new_tokens", "trl.max_completion_length"),
        "mitigations on": _mitigations(flat) if "rl.algorithm" in flat else "n/a",
        "model": kind,
        "model size": size,
        "engine": (first("rl.engine.kind") + (f" ({first('rl.engine.dtype')})" if "rl.engine.dtype" in flat else "")
                   if "rl.engine.kind" in flat else
                   ("vLLM (TRL use_vllm)" if flat["trl.use_vllm"] else "transformers generate (TRL)")
                   if "trl.use_vllm" in flat else "n/a"),
        "format set": run.summary["analysis"]["formats"],
    }
    return settings


def settings_table(groups: list[Group]) -> str:
    """Rows settings, one column per group (its first run's settings: the runs of a group differ only in seeds),
    and the seeds of each group's runs by name."""
    columns = [settings_of(group.runs[0]) for group in groups]
    rows = [[name] + [column[name] for column in columns] for name in columns[0]]
    rows.append(["seeds"] + [_group_seeds(group) for group in groups])
    return _table(["setting"] + [group.label for group in groups], rows)


# ---------------------------------------------------------------- the training story: RL metrics over steps

# From the run directory's metrics vocabulary (specialists.run_directory): the quantities a reader checks first.
TRAINING_METRICS = {
    "reward_mean": "reward (mean)",
    "loss": "loss",
    "kl_to_reference": "KL to reference",
    "entropy": "token entropy",
    "clip_fraction": "clip fraction",
    "grad_norm": "grad norm",
    "rollout_tokens_per_s": "rollout tokens/s",
    "step_time_s": "step time (s)",
}


def _training_metric(metric: str):
    """values_of for a metrics.jsonl key; empty for a run without it."""
    def values_of(run: Run) -> pd.Series:
        if run.training is None or metric not in run.training.columns:
            return pd.Series(dtype=np.float64)
        return run.training[metric]
    return values_of


def training_bands(groups: list[Group]) -> dict[str, dict[str, pd.DataFrame]]:
    """metric -> group label -> band (mean over the group's runs and 95% bootstrap band across seeds, rows steps),
    for each TRAINING_METRICS key, over the groups that recorded it."""
    bands = {}
    for metric in TRAINING_METRICS:
        recorded = {group.label: _band(group, _training_metric(metric)) for group in groups}
        recorded = {label: band for label, band in recorded.items() if band["mean"].notna().any()}
        if recorded:
            bands[metric] = recorded
    return bands


def training_section(groups: list[Group]) -> str:
    """The RL metrics any group recorded, one panel each with a line per group; one line of text for the groups
    without metrics.jsonl and for the metrics no run recorded."""
    bands = training_bands(groups)
    notes = []
    without = [group.label for group in groups if all(run.training is None for run in group.runs)]
    if without:
        notes.append(f"No RL metrics for {', '.join(without)}: no metrics.jsonl (a run from another trainer keeps its "
                     f"own logs).")
    missing = [metric for metric in TRAINING_METRICS if metric not in bands]
    if missing and len(without) < len(groups):
        notes.append(f"Not recorded by these runs: {', '.join(missing)}.")
    text = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
    figure = (_figure("RL metrics over steps from metrics.jsonl, per group: mean over its runs, shaded 95% bootstrap "
                      "band across seeds (a gap: the step recorded no value, e.g. no update at the final step)",
                      figures.metric_panels({TRAINING_METRICS[metric]: by_group for metric, by_group in bands.items()}))
              if bands else "")
    return "<h2>Training</h2>" + text + figure


# ---------------------------------------------------------------- the training story: sample completions

SAMPLE_COLUMNS = ["step", "prompt_id", "completion", "format", "reward", "correct"]
SAMPLES_PER_FORMAT = 3
SAMPLE_CHARS = 2000  # a longer completion is cut, with a note


def sample_section(group: Group) -> str:
    """Per step (the first and the last of each run) and format: a few distinct completions of the group's runs,
    HTML-escaped, each format in a collapsible <details>."""
    parts = []
    for index, which in ((0, "first"), (1, "last")):
        tables = [run.samples[index].assign(run=run.name) for run in group.runs if run.samples is not None]
        if not tables:
            continue
        rows = pd.concat(tables, ignore_index=True)
        steps = ", ".join(str(step) for step in dict.fromkeys(rows["step"].astype(int)))
        parts.append(f"<h4>{which.capitalize()} step ({html.escape(steps)})</h4>")
        order = list(dict.fromkeys([*group.runs[0].summary["formats"], *rows["format"]]))  # the analysis' order
        for name in (name for name in order if (rows["format"] == name).any()):
            of_format = rows[rows["format"] == name]
            shown = of_format.drop_duplicates("completion").head(SAMPLES_PER_FORMAT)
            samples = "".join(_sample(row) for row in shown.itertuples(index=False))
            parts.append(f"<details><summary>{html.escape(str(name))}: {len(of_format)} of {len(rows)} completions "
                         f"({len(shown)} shown)</summary>{samples}</details>")
    if not parts:
        return ""
    return "<h3>Sample completions per format</h3>" + "".join(parts)


def _sample(row) -> str:
    grade = []
    if "reward" in row._fields and not pd.isna(row.reward):
        grade.append(f"reward {_num(row.reward)}")
    if "correct" in row._fields and not pd.isna(row.correct):
        grade.append("correct" if row.correct else "wrong")
    text = row.completion if len(row.completion) <= SAMPLE_CHARS else (
        row.completion[:SAMPLE_CHARS] + f"\n… (cut: {len(row.completion)} characters in all)")
    meta = ", ".join([f"run {row.run}", f"step {row.step}", f"prompt {row.prompt_id}", *grade])
    return f'<div class="sample"><div class="meta">{html.escape(meta)}</div><pre>{html.escape(text)}</pre></div>'


# ---------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
.findings { background: #f4f7fb; border-left: 4px solid #3b6ea5; padding: 0.6rem 1rem; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; } figcaption { font-size: 0.9rem; color: #555; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { border: 1px solid #ccc; padding: 0.25rem 0.5rem; }
details { margin: 0.3rem 0; } summary { cursor: pointer; }
.sample .meta { font-size: 0.8rem; color: #555; margin-top: 0.5rem; }
.sample pre { background: #f7f7f7; padding: 0.5rem; white-space: pre-wrap; overflow-wrap: anywhere; margin: 0.2rem 0; }
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(caption: str, png: str) -> str:
    return (f'<figure><img src="data:image/png;base64,{png}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(groups: list[Group]) -> str:
    """The report: format shares of every group first, then findings, the runs, their settings, the comparison
    against the baseline (the first group), the RL metrics, each group's figures and sample completions, the
    collapse forecast, and entropy against accuracy."""
    runs = [run for group in groups for run in group.runs]
    parts = ["<h1>echolab report</h1>", _figure("Format shares over RL steps, one panel per group"
                                                + (" (mean over a group's runs)" if len(runs) > len(groups) else "")
                                                + "; dotted: collapse", format_share_overview(groups))]
    for group in groups:
        items = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in findings(group))
        parts.append(f'<div class="findings"><strong>{html.escape(group.label)}</strong><ul>{items}</ul></div>')
    parts.append("<h2>Runs</h2>" + _table(
        ["run", "group", "source", "seed", "steps", "completions", "formats"],
        [[run.name, group.label, run.summary["analysis"]["source"],
          ", ".join(seed_labels(run.config)),
          f"{run.summary['steps'][0]}–{run.summary['steps'][-1]}", run.summary.get("rows", ""),
          ", ".join(run.summary["formats"])] for group in groups for run in group.runs]))
    parts.append("<h2>Settings</h2>" + settings_table(groups))
    if len(runs) > 1:
        plots, table = comparison(groups)
        parts.append("<h2>Comparison</h2>" + table + "".join(_figure(caption, png) for caption, png in plots))
    parts.append(phase_section(groups))
    parts.append(training_section(groups))
    for group in groups:
        parts.append(f"<h2>{html.escape(group.label)}</h2>" + "".join(_figure(c, p) for c, p in group_figures(group))
                     + sample_section(group))
    parts.append(forecast_section(runs))
    parts.append("<h2>Entropy and accuracy</h2>" + _figure(
        "Format entropy against accuracy, every run and step; lines: least-squares fit R = -a·exp(H) + b per group",
        entropy_accuracy_figure(groups)))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>echolab report</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
