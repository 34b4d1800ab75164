"""A run's metrics while it goes: each step's metrics as flat scalars with grouped names, for trackers
(TensorBoard, wandb, trackio, MLflow) and a trainer's own logger, and `CollapseWatch`, which adds what needs
the steps before: the collapse step so far and the collapse forecast (analysis.forecast).

Every value is computed by the same pure function `echolab analyze` uses (analysis.formats_metrics,
analysis.sampling, analysis.specialists_metrics) on the step's rows, so a live curve and the analysed
one agree step by step. Names (the part before the first `/` is the group a tracker shows them under):

    format_share/NAME                 share of the step's completions in format NAME (`other` included)
    format_accuracy/NAME              accuracy within format NAME (formats used at the step)
    diversity/format_entropy          H(shares) / ln K
    diversity/effective_format_number exp H(shares)
    diversity/max_format_share        the largest share
    diversity/token_entropy           mean surprisal of the sampled tokens (rows with `logprob`)
    accuracy/mean, accuracy/coverage  mean correctness; share of prompts solved by at least one sample
    pass_at_k/K                       unbiased pass@K for K = 1, 2, 4, ... up to the samples per prompt
    expert_share/layer_L/expert_E     share of layer L's routed tokens sent to expert E (MoE rows)
    expert_entropy/layer_L            normalised entropy of layer L's expert shares
    expert_max_violation/layer_L      MaxVio of layer L's expert load

Values that are not defined at a step (no judged completion, no logprob) are left out, not logged as NaN.
`heldout_metrics` gives a held-out evaluation's (rl.evaluation) under the group `heldout/`, as `echolab analyze`
computes summary.json's `heldout` block:

    heldout/pass_at_k/K                       unbiased pass@K over each held-out problem's samples
    heldout/accuracy/mean                     mean correctness of the held-out samples
    heldout/format_share/NAME, heldout/format_accuracy/NAME   as above, on the held-out samples

(Not maj@K: a vote needs each completion's final answer, which the record does not hold; `analyze` re-derives it,
running code formats in the sandbox, too slow to do live.)
`CollapseWatch.observe` adds:

    collapse/step                     the collapse step (first step whose largest share >= threshold), once reached
    collapse/forecast_step            before that: the forecast collapse step, when one is forecast within the run
    collapse/forecast_low, _high      its 95% bootstrap interval (high left out when open-ended)
    collapse/forecast_winner_probability  the share of bootstrap fits naming the same winner
"""

from __future__ import annotations

import math

import pandas as pd

from analysis import formats_metrics as fm
from analysis.forecast import CollapseForecast, forecast_collapse, format_outcomes
from analysis import sampling
from analysis import specialists_metrics as sm


def step_metrics(table: pd.DataFrame, names: list[str]) -> dict[str, float]:
    """The grouped metrics (module doc) of a labelled table holding one step's rows (columns as
    `analysis.load.read_rollouts` gives them, with `format` filled in); `names` are the format categories."""
    steps = table["step"].unique()
    if len(steps) != 1:
        raise ValueError(f"step_metrics takes the rows of one step, got steps {sorted(steps)}")
    step = steps[0]
    shares = fm.format_share(table, names)
    values = {f"format_share/{name}": share for name, share in shares.loc[step].items()}
    values.update({f"format_accuracy/{name}": accuracy for name, accuracy in fm.format_accuracy(table, names).loc[step].items()})
    values["diversity/format_entropy"] = fm.format_entropy(shares).loc[step]
    values["diversity/effective_format_number"] = fm.effective_format_number(shares).loc[step]
    values["diversity/max_format_share"] = fm.max_format_share(shares).loc[step]
    if {"logprob", "num_tokens"} <= set(table.columns):
        values["diversity/token_entropy"] = sampling.token_entropy(table).loc[step]
    values["accuracy/mean"] = fm.accuracy(table).get(step, math.nan)
    values["accuracy/coverage"] = sampling.coverage(table).loc[step]
    budgets = sampling.sample_budgets(sampling.samples_per_prompt(table))
    values.update({f"pass_at_k/{k}": value for k, value in sampling.pass_at_k_by_step(table, budgets).loc[step].items()})
    tokens = sm.expert_token_counts(table)
    if len(tokens):
        expert_shares = sm.expert_share(tokens)
        for (layer, _), row in expert_shares.iterrows():
            values.update({f"expert_share/layer_{layer}/expert_{expert}": share for expert, share in row.items()})
        for metric, series in (("expert_entropy", sm.expert_entropy(expert_shares)),
                               ("expert_max_violation", sm.expert_max_violation(expert_shares))):
            values.update({f"{metric}/layer_{layer}": value for (layer, _), value in series.items()})
    return {name: float(value) for name, value in values.items() if value is not None and math.isfinite(float(value))}


HELDOUT_GROUPS = ("pass_at_k/", "accuracy/mean", "format_share/", "format_accuracy/")


def heldout_metrics(table: pd.DataFrame, names: list[str]) -> dict[str, float]:
    """The grouped metrics (module doc: heldout/...) of one held-out evaluation's labelled rows (one step)."""
    return {f"heldout/{name}": value for name, value in step_metrics(table, names).items()
            if name.startswith(HELDOUT_GROUPS)}


class CollapseWatch:
    """Follows one run step by step: `observe(rows)` returns the step's metrics (`step_metrics`) plus the
    collapse step so far or, before it, the collapse forecast from all steps seen (after `forecast_after`
    of them) up to `last_step`, the run's last step. `imminent` tells when the forecast puts the
    collapse within `warn_within` steps of the latest step."""

    def __init__(self, names: list[str], last_step: int, threshold: float = 0.9, warn_within: int = 10,
                 forecast_after: int = 3, seed: int = 0):
        self.names, self.last_step, self.threshold = names, last_step, threshold
        self.warn_within, self.forecast_after, self.seed = warn_within, forecast_after, seed
        self.outcomes: list[pd.DataFrame] = []  # format_outcomes of each step seen
        self.collapse_step: int | None = None
        self.forecast: CollapseForecast | None = None
        self.latest_step: int | None = None

    @property
    def steps_seen(self) -> list[int]:
        return [int(outcomes["step"].iloc[0]) for outcomes in self.outcomes]

    def restore(self, table: pd.DataFrame) -> None:
        """Take earlier steps' labelled rows as seen (a resumed run), without computing their metrics."""
        for _, rows in table.groupby("step", sort=True):
            self._remember(rows)

    def observe(self, rows: pd.DataFrame) -> dict[str, float]:
        """The metrics of one step's labelled rows, with the collapse entries (module doc)."""
        values = step_metrics(rows, self.names)
        self._remember(rows)
        if self.collapse_step is not None:
            values["collapse/step"] = float(self.collapse_step)
            return values
        self.forecast = None
        if len(self.outcomes) >= self.forecast_after and self.latest_step < self.last_step:
            self.forecast = forecast_collapse(pd.concat(self.outcomes, ignore_index=True), self.names, self.threshold,
                                              self.last_step, seed=self.seed)
        if self.forecast is not None and self.forecast.collapse_step is not None:
            values["collapse/forecast_step"] = float(self.forecast.collapse_step)
            values["collapse/forecast_winner_probability"] = self.forecast.winner_probability
            for key, bound in (("low", self.forecast.low), ("high", self.forecast.high)):
                if bound is not None:
                    values[f"collapse/forecast_{key}"] = float(bound)
        return values

    @property
    def imminent(self) -> bool:
        """A collapse is forecast within `warn_within` steps of the latest step (and has not happened yet)."""
        forecast = self.forecast
        return (self.collapse_step is None and forecast is not None and forecast.collapse_step is not None
                and forecast.collapse_step - self.latest_step <= self.warn_within)

    def _remember(self, rows: pd.DataFrame) -> None:
        self.outcomes.append(format_outcomes(rows))
        self.latest_step = int(rows["step"].max())
        if self.collapse_step is None:
            self.collapse_step = fm.collapse_step(fm.format_share(rows, self.names), self.threshold)
