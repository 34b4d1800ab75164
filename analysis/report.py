"""`echolab report`: one self-contained HTML file (figures as embedded base64 PNG, no network) for one run or
several side by side.

Runs whose configs differ only in seeds (any config key named `seed`, at any depth) form a group; a group's
curves are means over its runs with seeded bootstrap 95% bands. With several groups, the first given is
the baseline the others are compared with. Each run's summary.json is (re)computed with `analyze` when
missing, unreadable or older than the run's rollouts or config. The HTML file is replaced atomically.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from analysis.load import CONFIG_FILES, read_run_config
from analysis.output import check_output_file
from analysis.statistics import bootstrap_band, combined_format_change_test, compare_groups, entropy_accuracy_fit
from analysis.summary import analyze
from specialists.errors import UserError
from specialists.files import replace_atomically
from specialists.run_directory import SUMMARY_FILE, is_run_dir, rollout_files

SEED_KEY = "seed"
NAME_KEY = "name"
REPORT_KEYS = ("steps", "formats", "format_share", "accuracy", "format_accuracy", "pass_at_k", "budgets",
               "format_entropy", "format_entropy_nats", "format_change_test", "collapse_step")


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict
    summary: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def last_step(self) -> str:
        return str(self.summary["steps"][-1])


@dataclass(frozen=True)
class Group:
    label: str
    runs: tuple[Run, ...]


def write_report(run_dirs: list[str | Path], out_file: str | Path, progress: bool = True) -> Path:
    """Write the HTML report of `run_dirs` (analysing runs whose summary is missing or stale) to `out_file`."""
    if not run_dirs:
        raise UserError("report needs at least one run directory")
    out_file = Path(out_file)
    check_output_file(out_file)  # before the runs are analysed, which can take a while
    runs = [load_run(Path(path), progress) for path in run_dirs]
    text = render_html(group_runs(runs))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically({out_file: lambda path: path.write_text(text, encoding="utf-8")})
    return out_file


def load_run(path: Path, progress: bool = True) -> Run:
    """The run's config and an up-to-date summary (analysed now when summary.json is missing or stale)."""
    if not is_run_dir(path):
        raise UserError(f"{path}: not a run directory (no rollouts/*.parquet files)")
    summary_path = path / SUMMARY_FILE
    inputs = rollout_files(path) + [path / name for name in CONFIG_FILES if (path / name).is_file()]
    summary = None
    if summary_path.is_file() and summary_path.stat().st_mtime >= max(file.stat().st_mtime for file in inputs):
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):  # a damaged summary is analysed afresh, like a stale one
            summary = None
    if not isinstance(summary, dict) or not all(key in summary for key in REPORT_KEYS):
        try:
            summary = analyze(path, formats=None, progress=progress)
        except UserError as error:
            raise UserError(f"{path}: no up-to-date {SUMMARY_FILE}, and analysing the run failed: {error}") from None
    return Run(path, read_run_config(path), summary)


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


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with equal configs apart from seeds, in order of first appearance; a run without a config is alone.
    Labels name the config values that tell groups apart, else the run directory."""
    keyed: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps(_without_seeds(run.config), sort_keys=True, default=str) if run.config else f"dir:{run.path}"
        keyed.setdefault(key, []).append(run)
    flats = [_without_seeds(members[0].config) for members in keyed.values()]
    differing = sorted({key for flat in flats for key in flat if len({json.dumps(f.get(key), default=str) for f in flats}) > 1})
    groups = []
    for members, flat in zip(keyed.values(), flats):
        label = ", ".join(f"{key}={flat[key]}" for key in differing if key in flat) or members[0].name
        seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
        groups.append(Group(label + seeds, tuple(members)))
    return groups


# ---------------------------------------------------------------- per-step tables from summaries

def _steps(values: dict) -> pd.Series:
    """{step: value} -> float series on integer steps."""
    return pd.Series({int(step): np.nan if value is None else value for step, value in values.items()}, dtype=np.float64)


def _by_run(group: Group, values_of) -> pd.DataFrame:
    """Rows steps, one column per run: `values_of(summary)` gives each run's {step: value}."""
    return pd.DataFrame({run.name: _steps(values_of(run.summary)) for run in group.runs}).sort_index()


def _band(group: Group, values_of) -> pd.DataFrame:
    return bootstrap_band(_by_run(group, values_of))


def _column(key: str, column: str):
    """values_of for one column of a {step: {column: value}} summary entry (e.g. pass@k for one k)."""
    return lambda summary: {step: row.get(column) for step, row in summary[key].items()}


def _mean_over_runs(group: Group, values_of) -> pd.DataFrame:
    """Mean over runs of a per-step table, `values_of(summary)` giving {step: {column: value}} or
    {step: [value, ...]}; rows steps, columns as in the first run."""
    frames = [pd.DataFrame(values_of(run.summary)).T.rename(index=int).astype(np.float64) for run in group.runs]
    return pd.concat(frames).groupby(level=0).mean().sort_index()[list(frames[0].columns)]


def _largest_common_budget(group: Group) -> str | None:
    budgets = [set(run.summary["budgets"]) for run in group.runs]
    common = set.intersection(*budgets) if budgets else set()
    return str(max(common)) if common else None


def _has_experts(group: Group) -> bool:
    return all("expert_share" in run.summary for run in group.runs)


def _mean_expert_entropy(summary: dict) -> dict:
    """{step: mean over layers of the normalised expert entropy}."""
    return pd.DataFrame({layer: _steps(values) for layer, values in summary["expert_entropy"].items()}).mean(axis=1).to_dict()


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
        shares = _mean_over_runs(group, lambda summary: summary["format_share"]).iloc[-1]
        sentences.append(f"No collapse (no format reached {threshold}); at the last step {shares.idxmax()} "
                         f"has the largest share, {_pct(shares.max())}.")
    accuracy = _band(group, lambda s: s["accuracy"])["mean"]
    budget = _largest_common_budget(group)
    if accuracy.isna().all():
        sentences.append("Accuracy unknown: the rollouts carry neither gold answers nor a `correct` column.")
    else:
        text = f"Accuracy {_num(accuracy.iloc[0])} → {_num(accuracy.iloc[-1])} (step {accuracy.index[0]} → {accuracy.index[-1]})"
        if budget is not None:
            passes = _band(group, _column("pass_at_k", budget))["mean"]
            text += f"; pass@{budget} {_num(passes.iloc[0])} → {_num(passes.iloc[-1])}"
        sentences.append(text + ".")
    test = combined_format_change_test([run.summary["format_change_test"] for run in runs])
    if test["p_value"] is not None:
        sentences.append(f"Format mix first vs last step: G = {test['statistic']:.1f}, dof {test['dof']}, "
                         f"p = {test['p_value']:.2g}" + (f" (summed over {test['runs']} runs)." if len(runs) > 1 else "."))
    if _has_experts(group):
        sentences += _expert_findings(group)
    return sentences


def _expert_findings(group: Group) -> list[str]:
    last_shares = {layer: np.mean([run.summary["expert_share"][layer][run.last_step] for run in group.runs], axis=0)
                   for layer in group.runs[0].summary["expert_share"]}
    layer = max(last_shares, key=lambda name: last_shares[name].max())
    shares = last_shares[layer]
    sentences = [f"Expert {int(shares.argmax())} of layer {layer} carries {_pct(shares.max())} of the routed tokens at "
                 f"the last step (balanced: {_pct(1 / len(shares))})."]
    shifts = [run.summary["routing_shift"] for run in group.runs if run.summary.get("routing_shift")]
    if shifts:
        layers = list(shifts[0])
        mean = {part: {name: np.mean([shift[name][f"{part}_tv"] for shift in shifts]) for name in layers}
                for part in ("total", "format_mix", "routing")}
        moved = max(layers, key=lambda name: mean["total"][name])
        first = shifts[0][moved]
        sentences.append(
            f"From step {first['from_step']} to {first['to_step']} the expert load of layer {moved} moved by "
            f"{_num(mean['total'][moved])} (total variation); the change in format mix accounts for "
            f"{_num(mean['format_mix'][moved])}, changed routing within formats for {_num(mean['routing'][moved])}"
            + (" — the specialists follow the formats." if mean["format_mix"][moved] > mean["routing"][moved]
               else " — routing changed beyond the format mix."))
    return sentences


# ---------------------------------------------------------------- figures of one group

def group_figures(group: Group) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for one group."""
    shares = _mean_over_runs(group, lambda summary: summary["format_share"])
    collapse_steps = [run.summary["collapse_step"] for run in group.runs if run.summary["collapse_step"] is not None]
    formats = group.runs[0].summary["formats"]
    accuracy = {"all formats": _band(group, lambda s: s["accuracy"])}
    for name in formats:
        accuracy[name] = _band(group, _column("format_accuracy", name))
    result = [
        ("Format shares over RL steps" + (" (mean over runs)" if len(group.runs) > 1 else ""),
         figures.format_share_areas(shares, collapse_steps, group.label)),
        ("Accuracy, overall and per format (a format's line stops where it is no longer used)",
         figures.lines_over_steps(accuracy, "accuracy", group.label)),
    ]
    budgets = sorted({k for run in group.runs for k in run.summary["budgets"]}, key=int)
    sampling = {f"pass@{k}": _band(group, _column("pass_at_k", str(k))) for k in budgets}
    sampling["coverage"] = _band(group, lambda s: s["coverage"])
    if budgets:
        k = str(max(budgets))
        sampling[f"maj@{k}"] = _band(group, _column("maj_at_k", k))
    result.append(("pass@k (unbiased estimator), maj@k and coverage over RL steps",
                   figures.lines_over_steps(sampling, "rate", group.label)))
    if _has_experts(group):
        layers = list(group.runs[0].summary["expert_share"])
        heat = {layer: _mean_over_runs(group, lambda summary, layer=layer: summary["expert_share"][layer]) for layer in layers}
        result.append(("Expert share per layer over RL steps (share of the layer's routed tokens)",
                       figures.expert_share_heatmaps(heat, group.label)))
        for which, step_of in (("first", lambda run: str(run.summary["steps"][0])), ("last", lambda run: run.last_step)):
            affinity = {layer: _mean_affinity(group, layer, step_of) for layer in layers}
            affinity = {layer: frame for layer, frame in affinity.items() if frame is not None}
            if affinity:
                result.append((f"Format × expert affinity at the {which} step: P(expert | format), mean over runs",
                               figures.affinity_heatmaps(affinity, f"{group.label}, {which} step")))
    return result


def _mean_affinity(group: Group, layer: str, step_of) -> pd.DataFrame | None:
    """Mean over runs of P(expert | format) at the step `step_of(run)`; None when no run has it."""
    frames = [pd.DataFrame(run.summary["format_expert_affinity"][layer].get(step_of(run), {})).T for run in group.runs]
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return None
    mean = pd.concat(frames).groupby(level=0).mean()
    order = [name for name in group.runs[0].summary["formats"] if name in mean.index]
    return mean.loc[order]


# ---------------------------------------------------------------- several groups / runs

COMPARED = (
    ("largest format share", lambda s: s["max_format_share"], (0, 1)),
    ("format entropy (normalised)", lambda s: s["format_entropy"], (0, 1)),
    ("accuracy", lambda s: s["accuracy"], (0, 1)),
)


def _compared_metrics(groups: list[Group]) -> list[tuple[str, object, tuple | None]]:
    metrics = list(COMPARED)
    budgets = [_largest_common_budget(group) for group in groups]
    if all(budgets):
        k = str(min(int(b) for b in budgets))
        metrics.append((f"pass@{k}", _column("pass_at_k", k), (0, 1)))
    if all(_has_experts(group) for group in groups):
        metrics.append(("expert entropy (normalised, mean over layers)", _mean_expert_entropy, (0, 1)))
    return metrics


def comparison(groups: list[Group]) -> tuple[list[tuple[str, str]], str]:
    """Figures with each group's mean and 95% band, and a table of last-step values against the baseline."""
    metrics = _compared_metrics(groups)
    plots = [(f"{name} per group: mean over runs, shaded 95% bootstrap band",
              figures.lines_over_steps({group.label: _band(group, values_of) for group in groups}, name, name, ylim))
             for name, values_of, ylim in metrics]
    baseline = groups[0]
    rows = []
    for name, values_of, _ in metrics:
        last = {group.label: [_steps(values_of(run.summary)).get(int(run.last_step)) for run in group.runs] for group in groups}
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
    header = ["metric (last step)", "group", "mean [95% CI]", "difference vs baseline [95% CI]", "Welch p"]
    return plots, _table(header, rows)


def entropy_accuracy_figure(groups: list[Group]) -> str:
    """Every run's (format entropy, accuracy) per step, with the Cui et al. fit over each group's pooled points."""
    points = {group.label: pd.DataFrame([(h, run.summary["accuracy"].get(step)) for run in group.runs
                                         for step, h in run.summary["format_entropy_nats"].items()],
                                        columns=["entropy", "accuracy"]).astype(np.float64).dropna() for group in groups}
    fits = {label: entropy_accuracy_fit(frame["entropy"].tolist(), frame["accuracy"].tolist()) for label, frame in points.items()}
    return figures.entropy_accuracy_scatter(points, fits)


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


# ---------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
.findings { background: #f4f7fb; border-left: 4px solid #3b6ea5; padding: 0.6rem 1rem; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; } figcaption { font-size: 0.9rem; color: #555; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { border: 1px solid #ccc; padding: 0.25rem 0.5rem; }
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(caption: str, png: str) -> str:
    return (f'<figure><img src="data:image/png;base64,{png}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(groups: list[Group]) -> str:
    runs = [run for group in groups for run in group.runs]
    parts = ["<h1>echolab report</h1>"]
    for group in groups:
        items = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in findings(group))
        parts.append(f'<div class="findings"><strong>{html.escape(group.label)}</strong><ul>{items}</ul></div>')
    parts.append("<h2>Runs</h2>" + _table(
        ["run", "group", "seed", "steps", "completions", "formats"],
        [[run.name, group.label, ", ".join(str(v) for k, v in _flatten(run.config).items() if k.rsplit(".", 1)[-1] == SEED_KEY),
          f"{run.summary['steps'][0]}–{run.summary['steps'][-1]}", run.summary.get("rows", ""),
          ", ".join(run.summary["formats"])] for group in groups for run in group.runs]))
    if len(runs) > 1:
        plots, table = comparison(groups)
        parts.append("<h2>Comparison</h2>" + table + "".join(_figure(caption, png) for caption, png in plots))
    for group in groups:
        parts.append(f"<h2>{html.escape(group.label)}</h2>" + "".join(_figure(c, p) for c, p in group_figures(group)))
    parts.append(forecast_section(runs))
    parts.append("<h2>Entropy and accuracy</h2>" + _figure(
        "Format entropy against accuracy, every run and step; lines: least-squares fit R = -a·exp(H) + b per group",
        entropy_accuracy_figure(groups)))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>echolab report</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
