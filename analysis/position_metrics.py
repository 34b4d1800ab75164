"""Where in a completion the policy leaves its base: pure functions over the per-token divergence table.

The table (`analysis.base_divergence.divergence_tokens` computes it, one row per completion token) has the columns
`step`, `prompt_id`, `sample_index`, `format`, `position` (0-based index of the token in its completion), `kl` and
`entropy`, where for a completion y of prompt x sampled at RL step s, pi the model of step s and pi_ref the base:

    kl_t      = KL(pi || pi_ref)(. | x, y_<t) = sum_v pi(v | x, y_<t) (log pi(v | x, y_<t) - log pi_ref(v | x, y_<t))
    entropy_t = H(pi)(. | x, y_<t)            = - sum_v pi(v | x, y_<t) log pi(v | x, y_<t)

exact over the vocabulary (raw distributions, no temperature), in nats. kl_t is what the k3 estimator of the
per-token KL penalty (GRPO's, Shao et al. 2024, arXiv:2402.03300; Schulman 2020, "Approximating KL divergence",
http://joschu.net/blog/kl-approx.html) estimates from the sampled token alone. Its sum over t is the sequence KL,
KL(pi || pi_ref)(y | x) over whole completions; a per-token penalty divides it by the completion's length, so a
divergence concentrated in the few tokens where a completion commits to its format (Zhao et al. 2025,
arXiv:2504.07912: the format is settled early) is penalised weakly. These functions say where it sits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

TOKEN_COLUMNS = ["step", "prompt_id", "sample_index", "format", "position", "kl", "entropy"]
COMPLETION = ["step", "prompt_id", "sample_index"]


def position_profile(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per (step, format, position t): the mean over completions of kl_t and of entropy_t, and `completions`, how
    many completions reach position t (later positions average fewer, longer, completions). Long format: columns
    step, format, position, completions, kl, entropy; sorted by them."""
    grouped = tokens.groupby(["step", "format", "position"], sort=True)
    profile = grouped.agg(completions=("kl", "size"), kl=("kl", "mean"), entropy=("entropy", "mean")).reset_index()
    return profile[["step", "format", "position", "completions", "kl", "entropy"]]


def kl_concentration(tokens: pd.DataFrame, first: int, by: Sequence[str] = ("step", "format")) -> pd.DataFrame:
    """How the sequence KL is spread over a completion, per group of `by` (e.g. ("step",) pools the formats):

        kl_per_token    = mean over the group's tokens of kl_t             (what a per-token penalty sees)
        kl_per_sequence = mean over its completions c of sum_t kl_t(c)     (the sequence KL)
        share_first     = sum_c sum_{t < first} kl_t(c) / sum_c sum_t kl_t(c)   (NaN when the KL is 0)
        mean_tokens     = mean completion length in tokens

    with `completions`, the number of completions. Columns: `by`, completions, kl_per_token, kl_per_sequence,
    share_first, mean_tokens."""
    by = list(by)
    per_completion = tokens.assign(kl_first=tokens["kl"].where(tokens["position"] < first, 0.0)).groupby(
        COMPLETION + [column for column in by if column not in COMPLETION], sort=True).agg(
        kl=("kl", "sum"), kl_first=("kl_first", "sum"), tokens=("kl", "size")).reset_index()
    grouped = per_completion.groupby(by, sort=True)
    result = grouped.agg(completions=("kl", "size"), kl_sum=("kl", "sum"), kl_first=("kl_first", "sum"),
                         token_count=("tokens", "sum"), kl_per_sequence=("kl", "mean"),
                         mean_tokens=("tokens", "mean")).reset_index()
    result["kl_per_token"] = result["kl_sum"] / result["token_count"]
    result["share_first"] = (result["kl_first"] / result["kl_sum"]).where(result["kl_sum"] > 0, np.nan)
    return result[by + ["completions", "kl_per_token", "kl_per_sequence", "share_first", "mean_tokens"]]
