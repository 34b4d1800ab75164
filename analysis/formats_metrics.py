"""Format collapse metrics, per RL step, over a labelled rollout table (columns `step`, `format`, `correct`).

The measures follow Zhao et al. 2025, "Echo Chamber: RL Post-training Amplifies Behaviors Learned in
Pretraining" (arXiv:2504.07912), which tracks the share of each pretraining format over training and
the step at which one format takes over. Share tables have one row per step and one column per format
(including `other`); a format absent at a step has share 0 there.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.information import entropy, js_divergence, normalised_entropy


def format_counts(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Number of completions of each format at each step (rows: steps ascending; columns: `names`)."""
    counts = pd.crosstab(table["step"], table["format"]) if len(table) else pd.DataFrame()
    return counts.reindex(columns=names, fill_value=0).astype(np.int64).rename_axis(index="step", columns="format")


def format_share(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """share_f(t) = n_f(t) / sum_g n_g(t): the fraction of step t's completions in format f."""
    return shares_of(format_counts(table, names))


def shares_of(counts: pd.DataFrame) -> pd.DataFrame:
    """Counts per step and format (rows steps) -> shares per step (rows summing to 1)."""
    return counts.div(counts.sum(axis=1), axis=0)


def format_entropy(shares: pd.DataFrame) -> pd.Series:
    """Normalised entropy H(share(t)) / ln K, K = number of format columns (with `other`); 1 = uniform, 0 = one format."""
    return pd.Series(normalised_entropy(shares.to_numpy()), index=shares.index, name="format_entropy")


def format_entropy_nats(shares: pd.DataFrame) -> pd.Series:
    """H(share(t)) = -sum_f share_f ln share_f in nats (the entropy exp(H) and the Cui et al. fit use)."""
    return pd.Series(entropy(shares.to_numpy()), index=shares.index, name="format_entropy_nats")


def effective_format_number(shares: pd.DataFrame) -> pd.Series:
    """exp(H(share(t))): the number of equally used formats with the same entropy (Hill number of order 1;
    Hill 1973, "Diversity and evenness")."""
    return np.exp(format_entropy_nats(shares)).rename("effective_format_number")


def max_format_share(shares: pd.DataFrame) -> pd.Series:
    """max_f share_f(t): the share of the most used format."""
    return shares.max(axis=1).rename("max_format_share")


def dominant_format(shares: pd.DataFrame) -> pd.Series:
    """argmax_f share_f(t); ties go to the format listed first (`other` included: a policy can collapse onto it)."""
    return pd.Series(np.asarray(shares.columns)[shares.to_numpy().argmax(axis=1)], index=shares.index, name="dominant_format")


def js_divergence_to_first_step(shares: pd.DataFrame) -> pd.Series:
    """JS(share(t), share(t0)) in bits, t0 the first step (step 0: before the first update); 0 at t0."""
    values = js_divergence(shares.to_numpy(), shares.to_numpy()[:1]) if len(shares) else np.array([])
    return pd.Series(values, index=shares.index, name="format_js_divergence")


def collapse_step(shares: pd.DataFrame, threshold: float = 0.9) -> int | None:
    """First step t with max_f share_f(t) >= threshold (SPEC.md: the step of format collapse), else None."""
    collapsed = max_format_share(shares) >= threshold
    return int(collapsed.idxmax()) if collapsed.any() else None


def epoch_of_step(table: pd.DataFrame, step: int | None) -> float | None:
    """Passes over the RL prompt set at `step` (the smallest `epoch` recorded there); None when unknown."""
    if step is None or "epoch" not in table.columns:
        return None
    epochs = table.loc[table["step"] == step, "epoch"].dropna()
    return float(epochs.min()) if len(epochs) else None


def accuracy(table: pd.DataFrame) -> pd.Series:
    """acc(t) = mean of `correct` over step t's judged completions (rows with unknown correctness left out)."""
    return table.groupby("step")["correct"].mean().rename("accuracy")


def format_accuracy(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """acc_f(t) = mean of `correct` over step t's judged completions in format f; NaN where f has none."""
    means = table.groupby(["step", "format"])["correct"].mean().unstack("format") if len(table) else pd.DataFrame()
    return means.reindex(columns=names).rename_axis(index="step", columns="format")
