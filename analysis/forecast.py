"""Collapse forecast: from a run's first steps, which format will take over and at which step its share
will reach the collapse threshold, with a bootstrap interval.

The model is the replicator equation (Taylor & Jonker 1978, "Evolutionary stable strategies and game
dynamics", Mathematical Biosciences 40:145-156): a format's share grows in proportion to its accuracy
advantage over the current mean,

    d s_f / dt = eta s_f (a_f - abar(t)),    abar(t) = sum_g s_g(t) a_g.

Why it should describe RL on formats: the expected policy-gradient update of a softmax over formats
with a mean-reward baseline is exactly this (Börgers & Sarin 1997, "Learning through reinforcement and
replicator dynamics", Journal of Economic Theory 77:1-14), with a_f the probability that a completion
in format f is rewarded. With the accuracies a_f held constant the equation has the closed form

    s_f(t) = s_f(t0) exp(eta a_f (t - t0)) / sum_g s_g(t0) exp(eta a_g (t - t0)),

a softmax over formats whose logits move linearly in t at rates eta a_f. Hence: the most accurate format
present wins whenever eta > 0, a format absent at t0 never returns, and equal accuracies mean no change.

Fit (`fit_replicator`), on the steps given (e.g. a run's first 10):
- a_f = (c_f + 1) / (j_f + 2), the format's pooled accuracy over those steps (c_f correct of j_f judged
  completions) with Laplace's rule of succession (a format seen twice is not taken as certainly right or
  wrong);
- the initial logits z_f = log s_f(t0) and eta by maximum likelihood of the per-step format counts,
  n(t) ~ Multinomial(N(t), s(t)); the log-likelihood is concave in (z, eta) (a multinomial logit whose
  logits z_f + eta a_f (t - t0) are linear in the parameters), so the optimum found is the optimum.

Forecast (`forecast_collapse`): integrate the fitted model forward to the horizon; the collapse step is
the first step whose largest forecast share is >= threshold; the winner is the format with the largest
share at the horizon. The interval is a percentile bootstrap over prompts: each replicate resamples, at
every step, that step's prompts with replacement (a prompt's samples stay together: they share a
question, so they are not independent) and refits. A replicate whose forecast does not cross within the
horizon counts as crossing after it, so an interval may be open at the top (high = None).

Assumption to keep in mind: accuracies stay as they were in the fitted steps. In RL they usually rise
for the format being reinforced, which makes the real collapse come earlier than forecast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize

BOOTSTRAP_RESAMPLES = 200
CONFIDENCE = 0.95
FORECAST_STEPS = 10  # `echolab analyze` forecasts from a run's first 10 steps and checks against the rest


@dataclass(frozen=True)
class ReplicatorFit:
    """Fitted replicator dynamics: s(t) = softmax(logits + eta * accuracy * (t - first_step)) over `formats`.
    Formats absent from every fitted step are left out (they keep share 0)."""

    formats: tuple[str, ...]
    accuracy: np.ndarray  # (formats,) a_f, Laplace-smoothed pooled accuracy
    logits: np.ndarray  # (formats,) z_f = log s_f(first_step) up to a constant
    eta: float
    first_step: int

    def shares(self, steps: np.ndarray) -> np.ndarray:
        """Model shares at `steps`: (steps, formats)."""
        offsets = np.asarray(steps, dtype=np.float64)[:, None] - self.first_step
        return _softmax(self.logits[None, :] + self.eta * self.accuracy[None, :] * offsets)


@dataclass(frozen=True)
class CollapseForecast:
    """What the fitted steps say about the rest of the run.

    winner: the format with the largest forecast share at the horizon; winner_probability: the share of
    bootstrap replicates that name the same winner. collapse_step: the first step whose largest forecast
    share is >= threshold (the observed step when the fitted steps already reached it), None when the
    forecast stays below the threshold up to the horizon. low / high: 95% percentile-bootstrap interval of
    the collapse step; high is None when more than 2.5% of the replicates do not cross within the horizon.
    """

    fit: ReplicatorFit
    fitted_steps: tuple[int, ...]
    threshold: float
    horizon: int
    winner: str
    winner_probability: float
    collapse_step: int | None
    low: int | None
    high: int | None

    def shares(self, steps: np.ndarray) -> pd.DataFrame:
        """The fitted model's shares at `steps` (rows) per fitted format (columns)."""
        return pd.DataFrame(self.fit.shares(np.asarray(steps)), index=pd.Index(steps, name="step"),
                            columns=list(self.fit.formats))

    def as_dict(self) -> dict:
        """JSON-ready summary (for summary files and logs)."""
        return {"fitted_steps": list(self.fitted_steps), "threshold": self.threshold, "horizon": self.horizon,
                "winner": self.winner, "winner_probability": self.winner_probability,
                "collapse_step": self.collapse_step, "low": self.low, "high": self.high, "eta": self.fit.eta,
                "accuracy": dict(zip(self.fit.formats, self.fit.accuracy.tolist()))}


def format_outcomes(table: pd.DataFrame) -> pd.DataFrame:
    """The forecast's input, from a labelled, judged rollout table (columns step, prompt_id, format, correct with
    NaN where unknown): per (step, prompt_id, format) the completions, the judged ones and the correct ones."""
    correct = table["correct"].astype(np.float64)
    frame = pd.DataFrame({"step": table["step"].to_numpy(), "prompt_id": table["prompt_id"].astype(str).to_numpy(),
                          "format": table["format"].to_numpy(dtype=object),
                          "judged": correct.notna().to_numpy(dtype=np.float64), "correct": correct.fillna(0.0).to_numpy()})
    grouped = frame.groupby(["step", "prompt_id", "format"], sort=True)
    return grouped.agg(completions=("judged", "size"), judged=("judged", "sum"), correct=("correct", "sum")).reset_index()


OUTCOMES = ("completions", "judged", "correct")


def outcome_arrays(outcomes: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`format_outcomes` as arrays: the sorted steps, each (step, prompt) row's position among them, and the
    counts (rows, OUTCOMES, formats in `names` order)."""
    codes = pd.Categorical(outcomes["format"], categories=names).codes
    if (codes < 0).any():
        raise ValueError(f"formats outside {names}: {sorted(set(outcomes['format'][codes < 0]))}")
    keys = outcomes[["step", "prompt_id"]]
    rows = keys.groupby(["step", "prompt_id"], sort=True).ngroup().to_numpy()
    row_steps = keys.drop_duplicates().sort_values(["step", "prompt_id"])["step"].to_numpy()
    arrays = np.zeros((len(row_steps), len(OUTCOMES), len(names)))
    for index, column in enumerate(OUTCOMES):
        np.add.at(arrays, (rows, index, codes), outcomes[column].to_numpy(dtype=np.float64))
    steps = np.unique(row_steps)
    return steps, np.searchsorted(steps, row_steps), arrays


def fit_replicator(steps: np.ndarray, counts: np.ndarray, names: list[str]) -> ReplicatorFit | None:
    """The maximum-likelihood replicator fit (module doc) to per-step counts (steps, OUTCOMES, formats in `names`
    order): completions, judged and correct ones. None when fewer than two steps have completions (eta is then
    not identifiable)."""
    steps, counts = np.asarray(steps), np.asarray(counts, dtype=np.float64)
    observed = counts[:, 0].sum(axis=1) > 0
    if observed.sum() < 2:
        return None
    present = counts[observed, 0].sum(axis=0) > 0
    logits, eta, accuracy = _fit_batch(steps[observed], counts[observed][None][..., present])
    return ReplicatorFit(tuple(np.asarray(names, dtype=object)[present].tolist()), accuracy[0], logits[0],
                         float(eta[0]), int(steps[observed][0]))


def forecast_collapse(outcomes: pd.DataFrame, names: list[str], threshold: float = 0.9, horizon: int | None = None,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> CollapseForecast | None:
    """Forecast from every step in `outcomes` (`format_outcomes` of a run's rows; pass its first K steps to
    forecast from them) up to step `horizon` (default: the last step plus four times the steps spanned). None
    when there are fewer than two steps or no judged completion. Seeded: the same input and seed give the same
    forecast."""
    if not len(outcomes) or outcomes["judged"].sum() == 0:
        return None
    steps, position, rows = outcome_arrays(outcomes, names)
    counts = _per_step(position, len(steps), rows)
    fit = fit_replicator(steps, counts, names)
    if fit is None:
        return None
    first, last = int(steps[0]), int(steps[-1])
    horizon = last + 4 * (last - first + 1) if horizon is None else int(horizon)
    if horizon <= last:
        raise ValueError(f"horizon {horizon} must come after the last fitted step {last}")
    fitted = tuple(int(step) for step in steps)
    observed_max = counts[:, 0].max(axis=1) / counts[:, 0].sum(axis=1)
    if (observed_max >= threshold).any():  # already collapsed: the step is known, not forecast
        at = int(np.argmax(observed_max >= threshold))
        return CollapseForecast(fit, fitted, threshold, horizon, names[int(counts[at, 0].argmax())], 1.0,
                                int(steps[at]), int(steps[at]), int(steps[at]))
    future = np.arange(last + 1, horizon + 1)
    winner, crossing = _outcomes(fit.logits[None], np.array([fit.eta]), fit.accuracy[None], future - first, threshold)
    present = np.isin(names, fit.formats)
    rng = np.random.default_rng(seed)
    resampled = np.zeros((resamples, len(steps), len(OUTCOMES), present.sum()))
    for index in range(len(steps)):  # prompts of each step drawn with replacement, their samples kept together
        members = np.flatnonzero(position == index)
        drawn = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        resampled[:, index] = rows[drawn][..., present].sum(axis=1)
    winners, crossings = _outcomes(*_fit_batch(steps, resampled), future - first, threshold)
    low, high = np.quantile(crossings, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2], method="inverted_cdf")
    return CollapseForecast(fit, fitted, threshold, horizon, fit.formats[winner[0]], float(np.mean(winners == winner[0])),
                            None if np.isinf(crossing[0]) else int(first + crossing[0]),
                            None if np.isinf(low) else int(low + first), None if np.isinf(high) else int(high + first))


def _per_step(position: np.ndarray, steps: int, rows: np.ndarray) -> np.ndarray:
    """(step, prompt) rows summed into per-step counts (steps, OUTCOMES, formats)."""
    counts = np.zeros((steps, *rows.shape[1:]))
    np.add.at(counts, position, rows)
    return counts


def _outcomes(logits: np.ndarray, eta: np.ndarray, accuracy: np.ndarray, offsets: np.ndarray,
              threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per fit (batch): the index of the format with the largest share at the last offset, and the first offset
    whose largest share is >= threshold (inf when none)."""
    shares = _softmax(logits[:, None, :] + eta[:, None, None] * accuracy[:, None, :] * offsets[None, :, None])
    crossed = shares.max(axis=2) >= threshold  # (fits, offsets)
    first = np.where(crossed.any(axis=1), offsets[np.argmax(crossed, axis=1)], np.inf)
    return shares[:, -1].argmax(axis=1), first


RIDGE = 1e-6  # on the logits: softmax ignores a common shift, the ridge picks the one with mean zero
NEWTON_ITERATIONS = 50
TOLERANCE = 1e-6  # on the parameters; Newton reaches it in a handful of steps, below it is rounding noise


def _fit_batch(steps: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum likelihood for a batch of independent data sets (bootstrap replicates) at once.

    counts: (batch, steps, OUTCOMES, formats). Returns logits (batch, formats; -inf for a format absent from
    that data set), eta (batch,) and the smoothed accuracies (batch, formats). Newton's method with step
    halving on the concave log-likelihood
        L(z, eta) = sum_t sum_f n_f(t) log softmax(z + eta a u_t)_f - RIDGE/2 |z|^2,   u_t = t - t0,
    gradient and Hessian of the multinomial logit (McCullagh & Nelder, Generalized Linear Models, 2nd ed., 6.4).
    """
    n, judged, c = counts[:, :, 0], counts[:, :, 1], counts[:, :, 2]  # (batch, steps, formats) each
    batch, _, formats = n.shape
    offsets = (np.asarray(steps) - steps[0]).astype(np.float64)
    present = n.sum(axis=1) > 0  # (batch, formats)
    accuracy = (c.sum(axis=1) + 1) / (judged.sum(axis=1) + 2)
    totals = n.sum(axis=2)  # (batch, steps)
    design = accuracy[:, None, :] * offsets[None, :, None]  # d logits / d eta: (batch, steps, formats)

    def objective(z, eta):
        x = np.where(present[:, None, :], z[:, None, :] + eta[:, None, None] * design, -np.inf)
        log_shares = x - np.logaddexp.reduce(x, axis=2, keepdims=True)
        log_likelihood = (n * np.where(present[:, None, :], log_shares, 0.0)).sum(axis=(1, 2))
        return log_likelihood - RIDGE / 2 * (np.where(present, z, 0.0) ** 2).sum(axis=1)

    z = np.where(present, np.log(n.sum(axis=1) + 0.5), 0.0)
    z = np.where(present, z - z.mean(axis=1, keepdims=True), 0.0)
    eta = np.zeros(batch)
    value = objective(z, eta)
    for _ in range(NEWTON_ITERATIONS):
        x = np.where(present[:, None, :], z[:, None, :] + eta[:, None, None] * design, -np.inf)
        shares = _softmax(x)  # (batch, steps, formats)
        residual = n - totals[..., None] * shares
        gradient = np.concatenate([residual.sum(axis=1) - RIDGE * z, (residual * design).sum(axis=(1, 2))[:, None]], axis=1)
        # Fisher information per step: N_t (diag(s_t) - s_t s_t^T) on the logits, chained through the design.
        weight = totals[..., None, None] * (np.einsum("bsf,fg->bsfg", shares, np.eye(formats))
                                            - shares[..., :, None] * shares[..., None, :])
        h_zz = weight.sum(axis=1) + RIDGE * np.eye(formats)
        h_ze = np.einsum("bsfg,bsg->bf", weight, design)
        h_ee = np.einsum("bsf,bsfg,bsg->b", design, weight, design)
        hessian = np.zeros((batch, formats + 1, formats + 1))
        hessian[:, :formats, :formats] = h_zz
        hessian[:, :formats, formats] = hessian[:, formats, :formats] = h_ze
        hessian[:, formats, formats] = h_ee
        frozen = np.concatenate([~present, np.zeros((batch, 1), dtype=bool)], axis=1)  # absent formats stay out
        hessian[frozen] = 0.0
        hessian.transpose(0, 2, 1)[frozen] = 0.0
        hessian[:, np.arange(formats + 1), np.arange(formats + 1)] += frozen
        gradient[frozen] = 0.0
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        scale = np.ones(batch)
        for _ in range(30):  # halve each data set's step until its objective does not fall
            trial = objective(z + scale[:, None] * step[:, :formats], eta + scale * step[:, formats])
            worse = trial < value - 1e-12
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
        z, eta = z + scale[:, None] * step[:, :formats], eta + scale * step[:, formats]
        value = objective(z, eta)
        if np.abs(scale[:, None] * step).max() < TOLERANCE:
            break
    return np.where(present, z, -np.inf), eta, accuracy


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)
