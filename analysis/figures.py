"""The report's figures, drawn with matplotlib's Agg backend and returned as base64 PNG for embedding.

Each function takes plain tables (steps as the index) and returns the PNG's base64 text; none reads files.
Bands are (mean, low, high) tables from `analysis.statistics.bootstrap_band`.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

WIDTH = 7.5  # inches; at DPI below, 750 px wide
DPI = 100
PALETTE = plt.get_cmap("tab10").colors


def _panel_grid(count: int, per_row: int, height: float, extra: float = 0.0, **subplots) -> tuple[plt.Figure, np.ndarray]:
    """A figure of `count` panels, up to `per_row` a row, each row `height` inches (+ `extra` for titles); the
    grid's unused cells hidden. Returns (figure, grid of axes, rows x columns)."""
    columns = min(count, per_row)
    rows = -(-count // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(WIDTH, height * rows + extra), squeeze=False, **subplots)
    for axes in grid.ravel()[count:]:
        axes.set_visible(False)
    return figure, grid


def _png(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _mark_collapse(axes: plt.Axes, collapse_steps: list[int]) -> None:
    for step in sorted(set(collapse_steps)):
        axes.axvline(step, color="black", linestyle=":", linewidth=1)
    if collapse_steps:
        axes.text(min(collapse_steps), 1.01, " collapse", transform=axes.get_xaxis_transform(), fontsize=8)


def format_share_panels(shares_by_group: dict[str, pd.DataFrame], collapse_steps: dict[str, list[int]]) -> str:
    """One stacked-area panel per group (rows steps, columns formats), formats in one colour each across panels,
    two panels a row, one legend."""
    names = list(dict.fromkeys(name for shares in shares_by_group.values() for name in shares.columns))
    colours = dict(zip(names, PALETTE * 4))
    figure, grid = _panel_grid(len(shares_by_group), 2, 2.6, 0.3, sharey=True)
    for axes, (label, shares) in zip(grid.ravel(), shares_by_group.items()):
        steps = shares.index.to_numpy()
        if len(steps) == 1:  # one step: a bar, not an invisible area
            steps = np.array([steps[0] - 0.5, steps[0] + 0.5])
            shares = pd.concat([shares, shares])
        axes.stackplot(steps, shares.to_numpy().T, colors=[colours[name] for name in shares.columns], alpha=0.85)
        axes.set(ylim=(0, 1), xlim=(steps.min(), steps.max()), xlabel="RL step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(label, fontsize=9)
        _mark_collapse(axes, collapse_steps.get(label, []))
    for axes in grid[:, 0]:
        axes.set_ylabel("share of completions")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[name], alpha=0.85) for name in names]
    figure.legend(handles, names, loc="upper center", ncol=min(len(names), 5), fontsize=8, bbox_to_anchor=(0.5, 1.0 + 0.1 / grid.shape[0]))
    figure.tight_layout()
    return _png(figure)


def lines_over_steps(series: dict[str, pd.DataFrame], ylabel: str, title: str, ylim: tuple | None = (0, 1)) -> str:
    """One line per entry, each a band table (columns mean, low, high; rows steps); shaded where low/high exist."""
    figure, axes = plt.subplots(figsize=(WIDTH, 3.2))
    for color, (label, band) in zip(PALETTE * 4, series.items()):
        axes.plot(band.index, band["mean"], marker="o", markersize=3, color=color, label=label)
        if band[["low", "high"]].notna().any().all():
            axes.fill_between(band.index, band["low"].astype(float), band["high"].astype(float), color=color, alpha=0.2,
                              linewidth=0)
    axes.set(xlabel="RL step", ylabel=ylabel, title=title)
    if ylim:
        axes.set_ylim(*ylim)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _png(figure)


def metric_panels(panels: dict[str, dict[str, pd.DataFrame]]) -> str:
    """One small panel per metric (key: its axis label), in each a line per group (band tables: columns mean, low,
    high; rows steps), shaded where there is a band; a group keeps its colour across panels, one legend on top."""
    groups = list(dict.fromkeys(label for bands in panels.values() for label in bands))
    colours = dict(zip(groups, PALETTE * 4))
    # one step axis for all panels, though a metric may be missing at some steps (no update at the last)
    figure, grid = _panel_grid(len(panels), 2, 2.1, 0.4, sharex=True)
    for axes, (metric, bands) in zip(grid.ravel(), panels.items()):
        for label, band in bands.items():
            axes.plot(band.index, band["mean"], marker="o", markersize=2.5, linewidth=1.2, color=colours[label])
            if band[["low", "high"]].notna().any().all():
                axes.fill_between(band.index, band["low"].astype(float), band["high"].astype(float),
                                  color=colours[label], alpha=0.2, linewidth=0)
        axes.set_title(metric, fontsize=9)
        axes.set_xlabel("RL step", fontsize=8)
        axes.tick_params(labelsize=7, labelbottom=True)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [plt.Line2D([], [], color=colours[label]) for label in groups]
    figure.legend(handles, groups, loc="upper center", ncol=min(len(groups), 3), fontsize=8,
                  bbox_to_anchor=(0.5, 1.0 + 0.12 / grid.shape[0]))
    figure.tight_layout()
    return _png(figure)


def entropy_accuracy_scatter(points: dict[str, pd.DataFrame], fits: dict[str, dict]) -> str:
    """Format entropy (nats) against accuracy, one colour per group (points: columns entropy, accuracy), with
    each group's fit R = -a exp(H) + b drawn over its entropy range."""
    figure, axes = plt.subplots(figsize=(WIDTH, 3.4))
    for color, (label, frame) in zip(PALETTE * 4, points.items()):
        axes.scatter(frame["entropy"], frame["accuracy"], s=14, color=color, label=label, alpha=0.8)
        fit = fits.get(label) or {}
        if fit.get("a") is not None and len(frame):
            grid = np.linspace(frame["entropy"].min(), frame["entropy"].max(), 50)
            r2 = f", R²={fit['r2']:.2f}" if fit.get("r2") is not None else ""
            axes.plot(grid, -fit["a"] * np.exp(grid) + fit["b"], color=color, linewidth=1,
                      label=f"fit: R = -{fit['a']:.3g}·exp(H) + {fit['b']:.3g}{r2}")
    axes.set(xlabel="format entropy H (nats)", ylabel="accuracy", title="Entropy vs accuracy (Cui et al. 2025 fit)")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _png(figure)


def expert_share_heatmaps(shares_by_layer: dict[str, pd.DataFrame], title: str) -> str:
    """One heatmap per layer: rows experts, columns steps, colour = share of the layer's routed tokens."""
    layers = list(shares_by_layer)
    figure, grid = _panel_grid(len(layers), 4, 2.4)
    image = None
    for axes, layer in zip(grid.ravel(), layers):
        frame = shares_by_layer[layer]
        image = axes.imshow(frame.to_numpy().T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                            extent=(-0.5, len(frame) - 0.5, -0.5, frame.shape[1] - 0.5))
        ticks = np.linspace(0, len(frame) - 1, min(len(frame), 6)).round().astype(int)
        axes.set_xticks(ticks, [str(frame.index[i]) for i in ticks], fontsize=7)
        axes.set_title(f"layer {layer}", fontsize=9)
        axes.set_xlabel("RL step", fontsize=8)
        axes.set_ylabel("expert", fontsize=8)
    figure.suptitle(title, fontsize=10, y=1.04)
    figure.colorbar(image, ax=grid.ravel().tolist(), label="token share", shrink=0.8)
    return _png(figure)


def affinity_heatmaps(affinity_by_layer: dict[str, pd.DataFrame], title: str) -> str:
    """One heatmap per layer: rows formats, columns experts, cell = P(expert | format), annotated."""
    layers = list(affinity_by_layer)
    figure, grid = _panel_grid(len(layers), 3, 2.2, 0.4)
    for axes, layer in zip(grid.ravel(), layers):
        frame = affinity_by_layer[layer]
        axes.imshow(frame.to_numpy(), aspect="auto", vmin=0, vmax=1, cmap="magma")
        # Format names only on the first column of panels, so labels never run into the panel to the left.
        axes.set_yticks(range(len(frame)), frame.index if axes.get_subplotspec().is_first_col() else [], fontsize=7)
        axes.set_xticks(range(frame.shape[1]), [str(c) for c in frame.columns], fontsize=7)
        if frame.size <= 64:
            for (i, j), value in np.ndenumerate(frame.to_numpy()):
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                          color="white" if value < 0.5 else "black")
        axes.set_title(f"layer {layer}", fontsize=9)
        axes.set_xlabel("expert", fontsize=8)
    figure.suptitle(title, fontsize=10, y=1.04)
    return _png(figure)


def specialist_dominance(specialist_share: pd.DataFrame, format_share: pd.DataFrame, alignment: pd.DataFrame,
                         chance: float, title: str) -> str:
    """Two panels over RL steps (each table: rows steps, columns the formats that have a specialist). Left: each
    specialist's share of the routed tokens (solid) beside its format's share of the completions (dashed, same
    colour). Right: each format's alignment with its own specialist, with `chance` (a specialist's share of the
    experts) dotted."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(WIDTH, 3.0), sharex=True)
    for color, name in zip(PALETTE * 4, specialist_share.columns):
        left.plot(specialist_share.index, specialist_share[name], color=color, marker="o", markersize=3, label=name)
        if name in format_share.columns:
            left.plot(format_share.index, format_share[name], color=color, linestyle="--", linewidth=1)
        if name in alignment.columns:
            right.plot(alignment.index, alignment[name], color=color, marker="o", markersize=3, label=name)
    right.axhline(chance, color="grey", linestyle=":", linewidth=1)
    left.set(xlabel="RL step", ylabel="share", ylim=(0, 1), title="specialist share of routing (dashed: format share)")
    right.set(xlabel="RL step", ylabel="P(own specialist | format)", ylim=(0, 1), title="format-specialist alignment")
    for axes in (left, right):
        axes.title.set_fontsize(9)
    right.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    figure.subplots_adjust(wspace=0.35)  # room for the right panel's axis label
    figure.suptitle(title, fontsize=10, y=1.03)
    return _png(figure)


def collapse_forecast(observed: pd.DataFrame, forecast: pd.DataFrame, fitted_until: int, threshold: float,
                      predicted: tuple[int | None, int | None, int | None], collapse_step: int | None, title: str) -> str:
    """Observed format shares (solid, rows steps, columns formats) against the replicator forecast fitted on the
    steps up to `fitted_until` (dashed); the forecast collapse step with its interval (shaded; open to the right
    when the interval's top is None) and the observed collapse step (dotted)."""
    figure, axes = plt.subplots(figsize=(WIDTH, 3.2))
    for color, name in zip(PALETTE * 4, observed.columns):
        axes.plot(observed.index, observed[name], color=color, label=name)
        if name in forecast.columns:
            axes.plot(forecast.index, forecast[name], color=color, linestyle="--", linewidth=1)
    axes.axvspan(observed.index.min(), fitted_until, color="grey", alpha=0.08, linewidth=0)
    axes.axhline(threshold, color="black", linewidth=0.6)
    step, low, high = predicted
    if step is not None:
        axes.axvspan(low, high if high is not None else observed.index.max(), color="tab:red", alpha=0.12, linewidth=0)
        axes.axvline(step, color="tab:red", linestyle="--", linewidth=1)
    if collapse_step is not None:
        axes.axvline(collapse_step, color="black", linestyle=":", linewidth=1)
    axes.set(xlabel="RL step", ylabel="share of completions", ylim=(0, 1), title=title)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _png(figure)


def position_panels(panels: dict[str, pd.DataFrame]) -> str:
    """Panels two a row (e.g. KL and entropy of each format), each a table rows completion positions x columns RL
    steps, one line per step coloured from early (dark) to late (light) in every panel, one legend on top."""
    steps = sorted({step for frame in panels.values() for step in frame.columns})
    colours = dict(zip(steps, plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(steps), 1)))))
    figure, grid = _panel_grid(len(panels), 2, 2.1, 0.4)
    for axes, (title, frame) in zip(grid.ravel(), panels.items()):
        for step in frame.columns:
            axes.plot(frame.index, frame[step], marker="o", markersize=2, linewidth=1.2, color=colours[step])
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("completion position (token)", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [plt.Line2D([], [], color=colours[step]) for step in steps]
    figure.legend(handles, [f"RL step {step}" for step in steps], loc="upper center", ncol=min(len(steps), 6),
                  fontsize=8, bbox_to_anchor=(0.5, 1.0 + 0.12 / grid.shape[0]))
    figure.tight_layout()
    return _png(figure)


def phase_diagram(winner: pd.DataFrame, winner_text: pd.DataFrame, collapse: pd.DataFrame, collapse_text: pd.DataFrame,
                  x_label: str, y_label: str) -> str:
    """Two grids over the same cells (tables rows y values x columns x values, as text), one above the other so
    that a format's name fits its cell. Top: each cell coloured by its winning format (`winner`: a format name,
    None or NaN where there is none, e.g. a tie), labelled with `winner_text`. Bottom: `collapse` (a number per
    cell, NaN where none) on a colour scale, labelled with `collapse_text`; cells without a number grey."""
    names = sorted({name for name in winner.to_numpy().ravel() if isinstance(name, str)})
    colours = dict(zip(names, PALETTE * 4))
    rows, columns = winner.shape
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(WIDTH, 2 * (0.6 * rows + 1.1)))
    codes = np.array([[names.index(name) if isinstance(name, str) else -1 for name in row] for row in winner.to_numpy()])
    cells = np.ones((rows, columns, 3))  # white where there is no winner
    for index, name in enumerate(names):
        cells[codes == index] = matplotlib.colors.to_rgb(colours[name])
    top.imshow(cells, aspect="auto", origin="lower", alpha=0.55)
    scale = np.ma.masked_invalid(collapse.to_numpy(dtype=np.float64))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = bottom.imshow(scale, aspect="auto", origin="lower", cmap=cmap, alpha=0.6)  # light enough for black text
    for axes, text in ((top, winner_text), (bottom, collapse_text)):
        for (i, j), label in np.ndenumerate(text.to_numpy()):
            axes.text(j, i, label, ha="center", va="center", fontsize=6.5)
        axes.set_xticks(range(columns), [str(value) for value in winner.columns], fontsize=8)
        axes.set_yticks(range(rows), [str(value) for value in winner.index], fontsize=8)
        axes.set_xlabel(x_label, fontsize=8)
        axes.set_ylabel(y_label, fontsize=8)
    top.set_title("winning format (runs won / runs)", fontsize=9)
    bottom.set_title("mean collapse step (runs collapsed / runs)", fontsize=9)
    if scale.count():
        figure.colorbar(image, ax=bottom, label="collapse step", shrink=0.8)
    figure.tight_layout()
    return _png(figure)
