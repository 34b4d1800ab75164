"""Sampling-quality metrics per RL step over a judged rollout table.

Columns used: `step`, `prompt_id`, `completion`, `final_answer` (the answer's canonical text, `answer_key`
in specialists.grading: numbers rounded to 6 decimals; None when none), `correct`
(1.0 / 0.0, NaN when unknown), `sample_index` when present (else the samples of a prompt are in table
order). Metrics that need correctness use judged rows only, and a prompt enters a
metric at budget k only when it has at least k judged samples (pass@k is not estimable from n < k
samples); a step with no such prompt gives NaN.
"""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

PROMPT_KEYS = ["step", "prompt_id"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k), for n >= k
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374, eq. 1);
    NaN when n < k."""
    if n < k:
        return np.nan
    return 1.0 - comb(n - c, k) / comb(n, k)


def sample_budgets(samples_per_prompt: int) -> list[int]:
    """The budgets k reported: powers of two below the samples per prompt, and the samples per prompt itself."""
    budgets = [2**i for i in range(max(samples_per_prompt, 1).bit_length()) if 2**i < samples_per_prompt]
    return budgets + [samples_per_prompt] if samples_per_prompt >= 1 else []


def samples_per_prompt(table: pd.DataFrame) -> int:
    """The largest number of completions any prompt has at any step (0 for an empty table)."""
    return int(table.groupby(PROMPT_KEYS).size().max()) if len(table) else 0


def prompt_outcomes(table: pd.DataFrame) -> pd.DataFrame:
    """Per (step, prompt_id): n judged samples and c correct ones."""
    judged = table[table["correct"].notna()]
    grouped = judged.groupby(PROMPT_KEYS)["correct"]
    return pd.DataFrame({"n": grouped.size(), "c": grouped.sum().round().astype(np.int64)})


def _by_step(values: pd.Series, steps: pd.Index) -> pd.Series:
    """Mean over prompts per step, on all of the table's steps (NaN where no prompt qualified)."""
    return values.groupby(level="step").mean().reindex(steps)


def pass_at_k_by_step(table: pd.DataFrame, budgets: list[int]) -> pd.DataFrame:
    """pass@k(t) = mean over step t's prompts with n >= k of the unbiased estimator `pass_at_k(n, c, k)`."""
    outcomes, steps = prompt_outcomes(table), pd.Index(sorted(table["step"].unique()), name="step")
    columns = {}
    for k in budgets:
        estimates = {(n, c): pass_at_k(n, c, k) for n, c in set(zip(outcomes["n"], outcomes["c"]))}
        per_prompt = pd.Series([estimates[(n, c)] for n, c in zip(outcomes["n"], outcomes["c"])], index=outcomes.index)
        columns[k] = _by_step(per_prompt.dropna(), steps)
    return pd.DataFrame(columns, index=steps).rename_axis(columns="k")


def maj_at_k_by_step(table: pd.DataFrame, budgets: list[int]) -> pd.DataFrame:
    """maj@k(t): over step t's prompts with >= k judged samples, the correctness of the plurality final answer
    among the prompt's first k judged samples (Wang et al. 2023, "Self-Consistency Improves Chain of Thought
    Reasoning", arXiv:2203.11171). Samples without a final answer abstain; a tie goes to the answer seen
    first; a prompt whose k samples give no answer scores 0."""
    known = table["correct"].notna().to_numpy()
    judged = table.loc[known, [*PROMPT_KEYS, "final_answer", "correct"]]
    if "sample_index" in table.columns:  # (assigned as an array: a Series would re-index an empty frame)
        judged = judged.assign(order=table["sample_index"].to_numpy()[known]).sort_values("order", kind="stable")
    prompt = judged.groupby(PROMPT_KEYS, sort=False).ngroup().to_numpy(dtype=np.int64)
    rank = pd.Series(prompt).groupby(prompt).cumcount().to_numpy()  # position among the prompt's judged samples
    n = np.bincount(prompt)
    prompt_step = np.zeros(len(n), dtype=np.int64)
    prompt_step[prompt] = judged["step"].to_numpy()
    # one code per (prompt, answer) pair; samples without an answer abstain
    has_vote = judged["final_answer"].notna().to_numpy()
    answer, answers = pd.factorize(judged["final_answer"].to_numpy(dtype=object)[has_vote])
    # a pair as one integer, prompt * answers + answer: np.unique sorts them as (prompt, answer) pairs
    pairs, pair_index = np.unique(prompt[has_vote] * max(len(answers), 1) + answer, return_inverse=True)
    pair_prompt = pairs // max(len(answers), 1)
    pair_index = pair_index.ravel()
    voter_rank, voter_correct = rank[has_vote], judged["correct"].to_numpy()[has_vote]
    first_giver = np.unique(pair_index, return_index=True)[1]  # samples are in rank order within each prompt
    first, pair_correct = voter_rank[first_giver], voter_correct[first_giver]
    steps = pd.Index(sorted(table["step"].unique()), name="step")
    columns = {}
    for k in budgets:
        votes = np.bincount(pair_index[voter_rank < k], minlength=len(pairs))
        counted = votes > 0
        # per prompt the most voted answer, ties to the one given first
        order = np.lexsort((first[counted], -votes[counted], pair_prompt[counted]))
        owners = pair_prompt[counted][order]
        winners = np.zeros(len(n))
        leading = np.concatenate([[True], owners[1:] != owners[:-1]]) if len(owners) else np.array([], dtype=bool)
        winners[owners[leading]] = pair_correct[counted][order][leading]
        eligible = n >= k
        per_step = pd.Series(winners[eligible]).groupby(prompt_step[eligible]).mean()
        columns[k] = per_step.reindex(steps)
    return pd.DataFrame(columns, index=steps).rename_axis(columns="k")


def coverage(table: pd.DataFrame) -> pd.Series:
    """coverage(t) = share of step t's prompts (with a judged sample) that at least one sample solves
    (the empirical pass@n of Brown et al. 2024, "Large Language Monkeys", arXiv:2407.21787)."""
    outcomes = prompt_outcomes(table)
    return _by_step(outcomes["c"] > 0, pd.Index(sorted(table["step"].unique()), name="step")).rename("coverage")


def distinct_answers_per_prompt(table: pd.DataFrame) -> pd.Series:
    """Mean over step t's prompts of the number of distinct final answers (by their canonical text; samples
    without an answer do not count)."""
    per_prompt = table["final_answer"].groupby([table["step"], table["prompt_id"]]).nunique()
    return per_prompt.groupby(level="step").mean().rename("distinct_answers")


def distinct_n(table: pd.DataFrame, orders: tuple[int, ...] = (1, 2)) -> pd.DataFrame:
    """distinct-n(t) = |distinct n-grams| / |n-grams| over all of step t's completions (Li et al. 2016,
    "A Diversity-Promoting Objective Function for Neural Conversation Models", arXiv:1510.03055); tokens are
    maximal runs of non-whitespace characters (as `str.split()`). Rows steps, one column `distinct_<n>` per
    order n; NaN for a step without an n-gram.

    Vectorised: each distinct completion is tokenised once (Arrow), tokens and then n-grams are encoded as
    integers, and a step counts the distinct codes over its distinct completions, weighting totals by count.
    """
    codes, texts = pd.factorize(table["completion"].to_numpy(dtype=object))
    split = pc.utf8_split_whitespace(pa.array(texts, pa.string()))
    pieces = split.flatten()
    # Arrow keeps empty pieces at the ends; str.split() does not
    kept = pc.not_equal(pieces, "").to_numpy(zero_copy_only=False)
    empty_owners = np.searchsorted(split.offsets.to_numpy(), np.flatnonzero(~kept), side="right") - 1
    lengths = (pc.list_value_length(split).to_numpy(zero_copy_only=False).astype(np.int64)
               - np.bincount(empty_owners, minlength=len(texts)))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    token_codes = pc.dictionary_encode(pieces.filter(kept)).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    vocabulary = int(token_codes.max()) + 1 if token_codes.size else 1
    uses = pd.DataFrame({"step": table["step"].to_numpy(), "text": codes}).value_counts(sort=False).sort_index()
    use_steps = uses.index.get_level_values("step").to_numpy()
    use_texts = uses.index.get_level_values("text").to_numpy()
    steps = np.unique(use_steps)
    bounds = np.searchsorted(use_steps, np.append(steps, steps[-1] + 1) if len(steps) else steps)
    values = np.full((len(steps), len(orders)), np.nan)
    gram, grams = token_codes, vocabulary  # gram[p]: code (< grams) of the n-gram starting at token p
    for order in range(1, max(orders) + 1):
        if order > 1:  # the n-gram at p is the (n-1)-gram at p followed by the token at p + n - 1
            gram = gram[:-1] * vocabulary + token_codes[order - 1:]
            if order < max(orders):  # dense codes again for the next order; the last order is only counted
                gram, uniques = pd.factorize(gram)
                gram, grams = gram.astype(np.int64), len(uniques)
        if order not in orders:
            continue
        grams_per_text = np.maximum(lengths - order + 1, 0)
        totals = np.bincount(np.searchsorted(steps, use_steps), weights=uses.to_numpy() * grams_per_text[use_texts],
                             minlength=len(steps))
        dense = order == 1 or order < max(orders)
        seen = np.zeros(grams if dense else 0, dtype=bool)
        for position, (first, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            texts_of_step = use_texts[first:stop]
            found = gram[_ragged_positions(starts[texts_of_step], grams_per_text[texts_of_step])]
            if dense:  # mark the codes seen: no hashing
                seen[found] = True
                distinct = int(np.count_nonzero(seen))
                seen[found] = False
            else:
                distinct = len(pd.unique(found))
            if totals[position]:
                values[position, orders.index(order)] = distinct / totals[position]
    return pd.DataFrame(values, index=pd.Index(steps, name="step"), columns=[f"distinct_{n}" for n in orders])


def _ragged_positions(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of range(start, start + count) for each pair."""
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(ends[-1] if len(ends) else 0)


def token_entropy(table: pd.DataFrame) -> pd.Series:
    """H_tok(t) = -sum logprob / sum num_tokens over step t's completions (nats per token): the mean surprisal
    of the sampled tokens, an unbiased estimate of the policy's per-token entropy when the completions were
    sampled from the policy at temperature 1 (the entropy of Cui et al. 2025, arXiv:2505.22617). Needs the
    `logprob` and `num_tokens` columns; NaN for a step where they are missing."""
    known = table[table["logprob"].notna() & (table["num_tokens"] > 0)]
    sums = known.groupby("step")[["logprob", "num_tokens"]].sum()
    steps = pd.Index(sorted(table["step"].unique()), name="step")
    return (-sums["logprob"] / sums["num_tokens"]).reindex(steps).rename("token_entropy")
