"""Specialist (expert) dominance metrics per layer and RL step, from the rollouts' `expert_load`.

`expert_load` holds, per completion, a list over layers of lists over experts of routed-token counts.
`expert_token_counts` sums them into a long table (step, format, layer, expert, tokens); every other
function here is a pure function of that table or of the share table derived from it. Shares are
token-weighted: share_e(t) = tokens routed to expert e at step t / all tokens routed at step t (per layer).

Where experts are specialists trained apart (a Branch-Train-MiX base, Sukhbaatar et al. 2024, arXiv:2403.07816:
expert e came from the dense specialist of format s(e)), the last three functions measure specialist dominance:
each specialist's share of the routing, how much of each format goes to its own specialist, and whether the
dominant expert belongs to the winning format. `expert_specialists` (the map e -> s(e)) comes from the run's
config (`analysis.load.read_expert_specialists`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from analysis.information import mutual_information_bits, normalised_entropy, total_variation
from analysis.load import expert_loads
from specialists.errors import UserError

LAYER_STEP = ["layer", "step"]


def expert_load_array(loads: pd.Series) -> np.ndarray:
    """The `expert_load` values (none missing) as one float array of shape (rows, layers, experts); UserError when a
    row is not a list of lists of token counts of the same shape as the others (see `analysis.load.expert_loads`)."""
    nested = expert_loads(loads)
    per_layer = pc.list_flatten(nested)
    layers, experts = (len(nested[0]), len(per_layer[0])) if len(loads) else (0, 0)
    return pc.list_flatten(per_layer).to_numpy(zero_copy_only=False).reshape(len(loads), layers, experts)


def expert_token_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Tokens routed per (step, format, layer, expert), summed over the completions that carry `expert_load`."""
    columns = ["step", "format", "layer", "expert", "tokens"]
    if "expert_load" not in table.columns:
        return pd.DataFrame(columns=columns)
    rows = table[table["expert_load"].notna()]
    loads = expert_load_array(rows["expert_load"]) if len(rows) else np.empty((0, 0, 0))
    if not loads.size:
        return pd.DataFrame(columns=columns)
    _, layers, experts = loads.shape
    groups = rows.groupby(["step", "format"], sort=True).ngroup().to_numpy()
    keys = rows[["step", "format"]].drop_duplicates().sort_values(["step", "format"]).to_numpy()
    sums = np.zeros((len(keys), layers * experts))
    np.add.at(sums, groups, loads.reshape(len(rows), layers * experts))
    return pd.DataFrame({
        "step": np.repeat(keys[:, 0], layers * experts).astype(np.int64),
        "format": np.repeat(keys[:, 1], layers * experts),
        "layer": np.tile(np.repeat(np.arange(layers), experts), len(keys)),
        "expert": np.tile(np.arange(experts), layers * len(keys)),
        "tokens": sums.ravel(),
    })[columns]


def expert_share(tokens: pd.DataFrame) -> pd.DataFrame:
    """share_e(l, t) = tokens(l, t, e) / sum_e' tokens(l, t, e'); rows (layer, step), columns expert."""
    loads = tokens.groupby(LAYER_STEP + ["expert"])["tokens"].sum().unstack("expert", fill_value=0.0)
    return loads.div(loads.sum(axis=1), axis=0)


def expert_entropy(shares: pd.DataFrame) -> pd.Series:
    """H(share(l, t)) / ln E, E the number of experts: 1 = perfectly balanced, 0 = one expert carries all."""
    return pd.Series(normalised_entropy(shares.to_numpy()), index=shares.index, name="expert_entropy")


def expert_coefficient_of_variation(shares: pd.DataFrame) -> pd.Series:
    """CV = std_e(load) / mean_e(load) (population std), the balance measure of Shazeer et al. 2017,
    "Outrageously Large Neural Networks" (arXiv:1701.06538), whose importance loss is CV^2."""
    return (shares.std(axis=1, ddof=0) / shares.mean(axis=1)).rename("expert_cv")


def expert_max_violation(shares: pd.DataFrame) -> pd.Series:
    """MaxVio = max_e load_e / mean_e load_e - 1 (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
    Strategy for Mixture-of-Experts", arXiv:2408.15664); 0 when balanced, E - 1 when one expert takes all."""
    return (shares.max(axis=1) / shares.mean(axis=1) - 1).rename("expert_max_violation")


def expert_gini(shares: pd.DataFrame) -> pd.Series:
    """Gini = sum_i sum_j |x_i - x_j| / (2 E sum_i x_i) over the E experts' loads x (Gini mean difference
    form); 0 when balanced, 1 - 1/E when one expert takes all."""
    x = shares.to_numpy()
    pairwise = np.abs(x[:, :, None] - x[:, None, :]).sum(axis=(1, 2))
    return pd.Series(pairwise / (2 * x.shape[1] * x.sum(axis=1)), index=shares.index, name="expert_gini")


def dominant_expert(shares: pd.DataFrame) -> pd.Series:
    """argmax_e share_e(l, t); ties go to the lower index."""
    return pd.Series(shares.to_numpy().argmax(axis=1), index=shares.index, name="dominant_expert")


def routing_drift(shares: pd.DataFrame) -> pd.Series:
    """TV(share(l, t), share(l, t_prev)) = 1/2 sum_e |share_e(l, t) - share_e(l, t_prev)| between each step
    and the layer's previous recorded step; rows (layer, step) from each layer's second step on."""
    parts = []
    for _, block in shares.groupby(level="layer"):
        values = block.to_numpy()
        parts.append(pd.Series(total_variation(values[1:], values[:-1]), index=block.index[1:]))
    return (pd.concat(parts) if parts else pd.Series(dtype=np.float64)).rename("routing_drift")


def format_routing(tokens: pd.DataFrame) -> pd.DataFrame:
    """Within-format routing r_f,e(l, t) = tokens(l, t, f, e) / tokens(l, t, f), i.e. P(expert | format):
    the format x expert affinity matrix; rows (layer, step, format), columns expert."""
    loads = tokens.groupby(LAYER_STEP + ["format", "expert"])["tokens"].sum().unstack("expert", fill_value=0.0)
    loads = loads[loads.sum(axis=1) > 0]
    return loads.div(loads.sum(axis=1), axis=0)


def format_expert_mutual_information(tokens: pd.DataFrame) -> pd.Series:
    """I(format; expert) in bits per (layer, step) from the joint token counts n(f, e) (a routed token is one
    draw of the pair): 0 when routing ignores the format, at most min(log2 F, log2 E)."""
    joint = tokens.groupby(LAYER_STEP + ["format", "expert"])["tokens"].sum().unstack("expert", fill_value=0.0)
    values = {key: mutual_information_bits(block.to_numpy()) for key, block in joint.groupby(level=LAYER_STEP)}
    index = pd.MultiIndex.from_tuples(list(values), names=LAYER_STEP)
    return pd.Series(list(values.values()), index=index, name="format_expert_mi", dtype=np.float64)


def routing_shift_decomposition(tokens: pd.DataFrame, from_step: int, to_step: int) -> pd.DataFrame:
    """Split each layer's change in expert share between two steps into format mix and within-format routing.

    share(t) = sum_f w_f(t) r_f(t), with w_f(t) the format's share of the layer's routed tokens and r_f(t) its
    routing (`format_routing`). The symmetric (Shapley, midpoint) split is exact:
        total       = share(t1) - share(t0)
        format_mix  = sum_f (w_f(t1) - w_f(t0)) (r_f(t0) + r_f(t1)) / 2
        routing     = sum_f (w_f(t0) + w_f(t1)) / 2 (r_f(t1) - r_f(t0))
        total = format_mix + routing.
    A format absent at one step has w_f = 0 there; its unobserved routing is taken equal to the other step's,
    which leaves the identity exact and charges the format's arrival or departure to the mix.
    Rows (layer, part) with part in (total, format_mix, routing); columns expert. Sizes: `total_variation`.
    """
    parts = []
    for layer, block in tokens[tokens["step"].isin([from_step, to_step])].groupby("layer"):
        loads = block.groupby(["step", "format", "expert"])["tokens"].sum().unstack("expert", fill_value=0.0)
        formats = loads.index.get_level_values("format").unique()
        full = pd.MultiIndex.from_product([[from_step, to_step], formats], names=["step", "format"])
        loads = loads.reindex(full, fill_value=0.0)
        before, after = loads.loc[from_step].to_numpy(), loads.loc[to_step].to_numpy()
        w0, w1 = before.sum(axis=1) / before.sum(), after.sum(axis=1) / after.sum()
        r0, r1 = _rows_normalised(before), _rows_normalised(after)
        r0, r1 = np.where(w0[:, None] > 0, r0, r1), np.where(w1[:, None] > 0, r1, r0)
        mix = ((w1 - w0)[:, None] * (r0 + r1) / 2).sum(axis=0)
        routing = ((w0 + w1)[:, None] / 2 * (r1 - r0)).sum(axis=0)
        total = after.sum(axis=0) / after.sum() - before.sum(axis=0) / before.sum()
        parts.append(pd.DataFrame([total, mix, routing], columns=loads.columns,
                                  index=pd.MultiIndex.from_product([[layer], ["total", "format_mix", "routing"]],
                                                                   names=["layer", "part"])))
    return pd.concat(parts) if parts else pd.DataFrame()


def within_format_routing_drift(tokens: pd.DataFrame, from_step: int, to_step: int) -> pd.DataFrame:
    """TV(r_f(l, t0), r_f(l, t1)) per layer (rows) and format (columns): how far each format's own routing
    moved; NaN for a format absent at either step."""
    routing = format_routing(tokens)
    before = routing.xs(from_step, level="step")
    after = routing.xs(to_step, level="step")
    common = before.index.intersection(after.index)
    drift = pd.Series(total_variation(before.loc[common].to_numpy(), after.loc[common].to_numpy()), index=common)
    return drift.unstack("format")


def specialist_share(shares: pd.DataFrame, expert_specialists: Sequence[str]) -> pd.DataFrame:
    """share_s(l, t) = sum over the experts e with s(e) = s of share_e(l, t) (`expert_share`): specialist s's share
    of the layer's routed tokens; rows (layer, step), columns specialists named by their format (first-expert
    order). A specialist with m of E experts has m / E under balanced routing."""
    owners = _owners(shares.columns, expert_specialists)
    grouped = shares.T.groupby(owners, sort=False).sum().T
    return grouped.rename_axis(columns="format")


def specialist_alignment(tokens: pd.DataFrame, expert_specialists: Sequence[str]) -> pd.DataFrame:
    """a_f(l, t) = sum over the experts e with s(e) = f of r_f,e(l, t), r the within-format routing P(expert | format)
    (`format_routing`): how much of format f's routing goes to its own specialist's experts; 1 when all of it,
    m / E (the specialist's share of experts) when routing ignores the format. Rows (layer, step), columns the
    formats that have a specialist, NaN at steps where the format was not sampled."""
    routing = format_routing(tokens)
    owners = _owners(routing.columns, expert_specialists)
    formats = list(dict.fromkeys(expert_specialists))
    row_formats = routing.index.get_level_values("format")
    own = pd.Series([row[owners == fmt].sum() for row, fmt in zip(routing.to_numpy(), row_formats)],
                    index=routing.index, dtype=np.float64)[row_formats.isin(formats)]
    every = pd.MultiIndex.from_frame(tokens[LAYER_STEP].drop_duplicates().sort_values(LAYER_STEP))
    table = own.unstack("format") if len(own) else pd.DataFrame(index=every)
    return table.reindex(index=every, columns=formats).rename_axis(columns="format")


def dominant_expert_is_winner_specialist(shares: pd.DataFrame, dominant_format: pd.Series,
                                         expert_specialists: Sequence[str]) -> pd.Series:
    """1.0 where s(argmax_e share_e(l, t)), the specialist of the dominant expert (`dominant_expert`), is the
    dominant format of step t (`formats_metrics.dominant_format`: the format with the largest share of the step's
    completions), else 0.0; rows (layer, step). Does the winning format's specialist carry the routing?"""
    owners = _owners(shares.columns, expert_specialists)
    dominant = owners[dominant_expert(shares).to_numpy()]
    winners = dominant_format.reindex(shares.index.get_level_values("step")).to_numpy()
    return pd.Series((dominant == winners).astype(np.float64), index=shares.index,
                     name="dominant_expert_is_winner_specialist")


def _owners(experts: pd.Index, expert_specialists: Sequence[str]) -> np.ndarray:
    """The specialist's format of each expert column; UserError when the map and the expert_load disagree."""
    if len(experts) != len(expert_specialists) or list(experts) != list(range(len(experts))):
        raise UserError(f"the expert_load has {len(experts)} experts per layer but the run's config names "
                        f"specialists for {len(expert_specialists)} (expert_specialists: {list(expert_specialists)})")
    return np.asarray(expert_specialists, dtype=object)


def _rows_normalised(counts: np.ndarray) -> np.ndarray:
    sums = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)
