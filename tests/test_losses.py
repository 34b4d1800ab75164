"""Hand-computed checks of rl/losses.py: every expected number is worked out in the test itself."""

import math

import pytest
import torch

from rl.losses import (
    aggregate,
    bias_corrected_kl,
    clip_cov_mask,
    clipped_policy_loss,
    clipped_value_loss,
    batch_exploration_penalty,
    explained_variance,
    format_diversity_bonus,
    format_kl_shares,
    gae,
    group_advantages,
    historical_exploration_bonus,
    importance_ratio,
    kl_cov_penalty,
    kl_k1,
    kl_k3,
    masked_mean,
    pass_at_k_advantages,
    prefix_mask,
    sampler_mismatch,
    sequence_log_ratio,
    token_entropy,
    truncated_importance_weights,
    unlikeliness_rewards,
    zero_std_fraction,
)

LN2 = math.log(2)


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-9):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=tol, rtol=0)


# ----- helpers ---------------------------------------------------------------------------------


def test_masked_mean_ignores_padding_and_handles_empty_rows():
    x = t([[1.0, 2.0, 3.0], [4.0, float("nan"), 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert close(masked_mean(x, mask), 10 / 4)  # (1 + 2 + 3 + 4) / 4
    assert close(masked_mean(x, mask, dim=1), [2.0, 4.0])
    assert close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_explained_variance():
    # R - V = [0, 0, 1]: mean 1/3, Var = (1/9 + 1/9 + 4/9) / 3 = 2/9.
    # R = [1, 2, 4]: mean 7/3, Var = (16/9 + 1/9 + 25/9) / 3 = 14/9.  EV = 1 - (2/9)/(14/9) = 6/7.
    values = t([[1.0, 2.0, 3.0, 50.0]])
    returns = t([[1.0, 2.0, 4.0, -50.0]])
    mask = t([[1, 1, 1, 0]])
    assert close(explained_variance(values, returns, mask), 6 / 7)
    assert torch.isnan(explained_variance(values, t([[3.0, 3.0, 3.0, 0.0]]), mask))


# ----- KL estimators and entropy ---------------------------------------------------------------


def test_kl_estimators_on_one_token():
    # p = 0.5, q = 0.25: log p - log q = ln 2; r = q/p = 1/2.
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert close(kl_k1(logp, ref), [LN2])
    assert close(kl_k3(logp, ref), [0.5 - 1 - math.log(0.5)])  # (r - 1) - log r = ln 2 - 1/2


def test_k1_and_k3_are_unbiased_for_kl_policy_to_reference():
    # Exact expectation over p = [0.5, 0.5] of the estimators, against KL(p || q) with q = [0.25, 0.75]:
    # KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3).
    p, q = t([0.5, 0.5]), t([0.25, 0.75])
    kl = 0.5 * LN2 + 0.5 * math.log(2 / 3)
    assert close((p * kl_k1(p.log(), q.log())).sum(), kl)
    assert close((p * kl_k3(p.log(), q.log())).sum(), kl)
    assert (kl_k3(p.log(), q.log()) >= 0).all()


def test_token_entropy():
    inf = float("inf")
    logits = t([[[0.0, 0.0, -1e9], [0.0, -inf, -inf], [math.log(0.5), math.log(0.25), math.log(0.25)]]])
    # uniform over 2 -> ln 2; one-hot -> 0; [1/2, 1/4, 1/4] -> 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2.
    assert close(token_entropy(logits), [[LN2, 0.0, 1.5 * LN2]])


# ----- GAE -------------------------------------------------------------------------------------


def test_gae_hand_computed_with_padding():
    gamma, lam = 0.9, 0.5
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 1.5, 77.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # Row 0: d2 = 1 - 0.7 = 0.3 (terminal value 0), A2 = 0.3
    #        d1 = 0.9*0.7 - 0.6 = 0.03, A1 = 0.03 + 0.45*0.3 = 0.165
    #        d0 = 0.9*0.6 - 0.5 = 0.04, A0 = 0.04 + 0.45*0.165 = 0.11425
    # Row 1: padding (reward 99, value 77) must not leak: d1 = 2 - 1.5 = 0.5, A1 = 0.5
    #        d0 = 0.9*1.5 - 1.0 = 0.35, A0 = 0.35 + 0.45*0.5 = 0.575
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert close(advantages, [[0.11425, 0.165, 0.3], [0.575, 0.5, 0.0]])
    assert close(returns, [[0.61425, 0.765, 1.0], [1.575, 2.0, 0.0]])


def test_gae_with_gamma_lambda_one_gives_monte_carlo_returns():
    rewards = t([[0.1, 0.0, 1.0]])
    values = t([[0.3, 0.2, 0.9]])
    advantages, returns = gae(rewards, values, t([[1, 1, 1]]), 1.0, 1.0)
    assert close(returns, [[1.1, 1.0, 1.0]])  # sum of the rewards from t on
    assert close(advantages, [[0.8, 0.8, 0.1]])


# ----- group advantages ------------------------------------------------------------------------


def test_group_advantages_scales():
    rewards = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3). Group 2: all equal -> 0.
    std1 = math.sqrt(1 / 3)
    a = 0.5 / (std1 + 1e-4)
    assert close(group_advantages(rewards, 4, "group"), [a, -a, -a, a, 0, 0, 0, 0])
    # Batch std: mean 1.25, squared deviations 0.0625 + 1.5625 + 1.5625 + 0.0625 + 4 * 0.5625 = 5.5, / 7.
    b = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    assert close(group_advantages(rewards, 4, "batch"), [b, -b, -b, b, 0, 0, 0, 0])
    assert close(group_advantages(rewards, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_group_advantages_edge_cases():
    assert close(group_advantages(t([3.0, 3.0, 3.0]), 3, "group"), [0.0, 0.0, 0.0])
    assert close(group_advantages(t([1.0, 5.0]), 1, "group"), [0.0, 0.0])  # one sample per group
    with pytest.raises(ValueError):
        group_advantages(t([1.0, 0.0]), 2, "std")
    with pytest.raises(ValueError):
        group_advantages(t([1.0, 0.0]), 2, baseline="median")


def test_leave_one_out_baseline_hand_computed():
    rewards = t([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0, 1.0])
    # Group 1: b_0 = (0 + 0 + 1) / 3 = 1/3, so A_0 = 1 - 1/3 = 2/3; b_1 = (1 + 0 + 1) / 3 = 2/3, A_1 = -2/3.
    # Group 2: b_4 = (0 + 3 + 1) / 3 = 4/3 -> -4/3; b_6 = (0 + 0 + 1) / 3 -> 3 - 1/3 = 8/3; b_7 = 1 - 1 = 0.
    loo = [2 / 3, -2 / 3, -2 / 3, 2 / 3, -4 / 3, -4 / 3, 8 / 3, 0.0]
    assert close(group_advantages(rewards, 4, "none", "leave_one_out"), loo)
    # Scaled by the group's unbiased std: group 1 sqrt(1/3) as above; group 2 rewards 0, 0, 3, 1 (mean 1,
    # squared deviations 1 + 1 + 4 + 0 = 6, / 3 = 2).
    std = [math.sqrt(1 / 3)] * 4 + [math.sqrt(2)] * 4
    assert close(group_advantages(rewards, 4, "group", "leave_one_out"), [a / (s + 1e-4) for a, s in zip(loo, std, strict=True)])
    # RLOO's advantage is G / (G - 1) times GRPO's mean-centred one
    assert close(group_advantages(rewards, 4, "batch", "leave_one_out"), group_advantages(rewards, 4, "batch") * 4 / 3)
    with pytest.raises(ValueError):
        group_advantages(rewards, 1, baseline="leave_one_out")


def test_zero_std_fraction():
    # prompt 1 all equal, prompt 2 mixed, prompt 3 all equal (at another value): 2 of 3
    assert zero_std_fraction(t([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])) == pytest.approx(2 / 3)


# ----- policy and value losses -----------------------------------------------------------------


def test_clipped_policy_loss_clips_exactly_one_token():
    # ratios 1.5 / 1.25 / 1.5 / 0.9 and one padded token with a huge ratio.
    old = t([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    ratios = [1.5, 1.25, 1.5, 0.9, 50.0]
    logprobs = (old + t([[math.log(r) for r in ratios]])).requires_grad_()
    advantages = t([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = t([[1, 1, 1, 1, 0]])
    ratio = importance_ratio(logprobs, old, mask)
    assert close(ratio.detach(), [ratios])
    loss, clip_fraction = clipped_policy_loss(ratio, advantages, mask, 0.2, 0.28)
    # token 0: A > 0, ratio 1.5 > 1.28 -> clipped: -min(1.5, 1.28) = -1.28
    # token 1: A > 0, ratio 1.25 < 1.28 -> kept by clip-higher (PPO's 1.2 would clip it): -1.25
    # token 2: A < 0, ratio 1.5: -min(-1.5, -1.28) = 1.5 (the pessimistic bound, not clipped)
    # token 3: A < 0, ratio 0.9 > 0.8: -min(-0.9, -0.8) = 0.9
    assert close(loss[0, :4].detach(), [-1.28, -1.25, 1.5, 0.9])
    assert close(clip_fraction, 1 / 4)
    # The clipped token has no gradient; the others have d/dlogp (-ratio * A) = -ratio * A.
    (loss * mask).sum().backward()
    assert close(logprobs.grad[0, :4], [0.0, -1.25, 1.5, 0.9])


def test_clipped_policy_loss_low_side_and_sequence_advantages():
    old, mask = t([[0.0, 0.0]]), t([[1, 1]])
    logprobs = t([[math.log(0.75), math.log(1.1)]])
    # Per-sequence advantage -2 broadcast over tokens. Token 0: ratio 0.75 < 0.8 with A < 0 -> clipped,
    # -min(-1.5, -1.6) = 1.6. Token 1: ratio 1.1: -min(-2.2, -2.2) = 2.2.
    loss, clip_fraction = clipped_policy_loss(importance_ratio(logprobs, old, mask), t([-2.0]), mask)
    assert close(loss, [[1.6, 2.2]])
    assert close(clip_fraction, 0.5)


def test_sequence_level_ratio_is_gspo():
    # GSPO: s = exp(mean of the log ratios over the sequence's tokens). Row 0: log ratios ln 2 and 0 -> s = sqrt 2;
    # row 1: one token with log ratio ln 0.5, a padded one (ignored) -> s = 0.5.
    old = t([[0.0, 0.0], [0.0, 0.0]])
    logprobs = t([[LN2, 0.0], [-LN2, 7.0]]).requires_grad_()
    mask = t([[1, 1], [1, 0]])
    ratio = importance_ratio(logprobs, old, mask, "sequence")
    assert close(ratio.detach(), [[math.sqrt(2)], [0.5]])
    # A = +1 and -1: row 0 clipped above at 1.28 (-1.28 per token, no gradient); row 1 below 0.8 with A < 0,
    # clipped: -min(-0.5, -0.8) = 0.8 per token. Every token of a sequence shares its ratio and its clip.
    loss, clip_fraction = clipped_policy_loss(ratio, t([1.0, -1.0]), mask, 0.2, 0.28)
    assert close(loss.detach(), [[-1.28, -1.28], [0.8, 0.8]])
    assert close(clip_fraction, 1.0)
    # Unclipped, the gradient of -s A flows to every token: d(-s)/dlogp_t = -s / |y|.
    loss, _ = clipped_policy_loss(ratio, t([1.0, -1.0]), mask, math.inf, math.inf)
    (loss * mask).sum().backward()  # row 0 counts twice (two tokens), row 1 once
    assert close(logprobs.grad, [[-2 * math.sqrt(2) / 2] * 2, [0.5, 0.0]])
    with pytest.raises(ValueError):
        importance_ratio(logprobs, old, mask, "word")


def test_bias_corrected_kl_value_and_gradient():
    # k3 = (r - 1) - log r with r = q / p; weighted by rho = p / p_old. One token: log p = log p_old = 0 (rho = 1),
    # log q = -ln 2 (r = 1/2): value k3 = ln 2 - 1/2. Gradient in log p: d/dlogp [rho k3] = rho k3 + rho dk3/dlogp,
    # dk3/dlogp = -r + 1 = 1/2, so ln 2 - 1/2 + 1/2 = ln 2 (plain k3 would give 1/2).
    logprobs = t([[0.0]]).requires_grad_()
    ratio = torch.exp(logprobs - t([[0.0]]))
    term = bias_corrected_kl(logprobs, t([[-LN2]]), ratio)
    assert close(term.detach(), [[LN2 - 0.5]])
    term.sum().backward()
    assert close(logprobs.grad, [[LN2]])


def test_prefix_mask_counts_completion_tokens_only():
    # K = 2. Row 0: four completion tokens -> the first two. Row 1: one token -> only it. Row 2: padding first
    # (positions 0, 2 off the mask) -> completion tokens at positions 1 and 3 are the first two. Row 3: empty.
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    assert prefix_mask(mask, 2).tolist() == [[True, True, False, False], [True, False, False, False],
                                             [False, True, False, True], [False] * 4]
    assert prefix_mask(mask.bool(), 10).tolist() == mask.bool().tolist()  # K beyond the row: every token


def test_prefix_kl_aggregated_as_the_policy_loss():
    # The loops' prefix-KL term, K = 1, on two rows of 3 and 1 completion tokens: k3 per token with
    # r = q / p: ln 2 - 1/2 at (0, 0) (r = 1/2), 0 at (0, 1) (p = q), and (1, 0) with r = 2: 2 - 1 - ln 2 = 1 - ln 2.
    # Only (0, 0) and (1, 0) are in the prefix, (0, 2)'s k3 = ln 2 - 1/2 too but it is token 3.
    logprobs = t([[0.0, -1.0, 0.0], [-LN2, 0.0, 0.0]])
    ref = t([[-LN2, -1.0, -LN2], [0.0, 5.0, 5.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    term = kl_k3(logprobs, ref) * prefix_mask(mask, 1)
    assert close(term, [[LN2 - 0.5, 0.0, 0.0], [1 - LN2, 0.0, 0.0]])
    # grpo: mean over rows of (row sum / row length) = ((ln 2 - 1/2) / 3 + (1 - ln 2) / 1) / 2;
    # bnpo (PPO): sum / 4 tokens = (ln 2 - 1/2 + 1 - ln 2) / 4 = 1/8.
    assert close(aggregate(term, mask, "grpo"), ((LN2 - 0.5) / 3 + (1 - LN2)) / 2)
    assert close(aggregate(term, mask, "bnpo"), 0.125)


def test_sequence_log_ratio_sums_the_completion_and_is_detached():
    # row 0: (0 - (-ln 2)) + (-1 - (-1)) + (0 - 0.5) = ln 2 - 0.5; row 1: one token, -ln 2 - 0; padding ignored
    logprobs = t([[0.0, -1.0, 0.0], [-LN2, 7.0, 7.0]]).requires_grad_()
    ref = t([[-LN2, -1.0, 0.5], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    ratio = sequence_log_ratio(logprobs, ref, mask)
    assert close(ratio, [LN2 - 0.5, -LN2]) and not ratio.requires_grad


# ----- train / inference mismatch --------------------------------------------------------------


def test_truncated_importance_weights_hand_computed():
    # trainer / sampler probability ratios 2, 1, 0.25 and 5 (capped at 3); a padded position is whatever it is.
    sampler = t([[math.log(0.2), math.log(0.5), math.log(0.8), math.log(0.1)]])
    old = t([[math.log(0.4), math.log(0.5), math.log(0.2), math.log(0.5)]])
    assert close(truncated_importance_weights(old, sampler, cap=3.0), [[2.0, 1.0, 0.25, 3.0]])
    assert not truncated_importance_weights(old.requires_grad_(), sampler, 3.0).requires_grad


def test_sampler_mismatch_kl_and_max_ratio():
    sampler = t([[math.log(0.2), math.log(0.5), math.log(0.9)]])
    old = t([[math.log(0.4), math.log(0.5), math.log(0.01)]])
    mask = t([[1, 1, 0]])  # the last token (ratio 1/90) is padding
    # k3 with r = old / sampler: token 0 r = 2 -> 1 - ln 2; token 1 r = 1 -> 0. Mean (1 - ln 2) / 2; max ratio 2.
    kl, max_ratio = sampler_mismatch(old, sampler, mask)
    assert kl == pytest.approx((1 - LN2) / 2) and max_ratio == pytest.approx(2.0)
    assert sampler_mismatch(old, old, mask) == (0.0, 1.0)  # float32 rollouts: no mismatch


def test_clipped_value_loss():
    values = t([[1.0, 2.0, 0.0, 9.0]])
    old_values = t([[0.5, 2.0, 1.0, 0.0]])
    returns = t([[2.0, 0.0, 1.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    # token 0: (1-2)^2 = 1; clipped V = 0.5 + 0.2 = 0.7, (0.7-2)^2 = 1.69 -> 1.69
    # token 1: unclipped = clipped = (2-0)^2 = 4
    # token 2: (0-1)^2 = 1; clipped V = 1 - 0.2 = 0.8, (0.8-1)^2 = 0.04 -> 1
    assert close(clipped_value_loss(values, old_values, returns, mask, 0.2), 0.5 * (1.69 + 4 + 1) / 3)


# ----- aggregation -----------------------------------------------------------------------------


def test_aggregate_loss_types_on_sequences_of_different_lengths():
    per_token_loss = t([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # grpo: (mean(1,2,3) + mean(4)) / 2 = (2 + 4) / 2 = 3
    assert close(aggregate(per_token_loss, mask, "grpo"), 3.0)
    # bnpo: (1 + 2 + 3 + 4) / 4 tokens
    assert close(aggregate(per_token_loss, mask, "bnpo"), 2.5)
    # dr_grpo: 10 / (2 sequences * 4 max tokens); differs from grpo because lengths differ
    assert close(aggregate(per_token_loss, mask, "dr_grpo", max_completion_length=4), 1.25)
    assert close(aggregate(per_token_loss, mask, "dr_grpo", max_completion_length=4, num_sequences=5), 0.5)
    # dapo: 10 / tokens in the global batch (8 here); defaults to this batch's 4 tokens
    assert close(aggregate(per_token_loss, mask, "dapo", global_token_count=8), 1.25)
    assert close(aggregate(per_token_loss, mask, "dapo"), 2.5)


def test_aggregate_rejects_bad_arguments():
    x, mask = t([[1.0]]), t([[1]])
    with pytest.raises(ValueError):
        aggregate(x, mask, "dr_grpo")
    with pytest.raises(ValueError):
        aggregate(x, mask, "token_mean")


# ----- Clip-Cov and KL-Cov ---------------------------------------------------------------------

# Three valid tokens and one padded one. log p = [-1, -3 | -2, pad], A = [2, -2 | 0, pad]:
# mean log p = -2, mean A = 0, so Cov = [(1)(2), (-1)(-2) | (0)(0)] = [2, 2 | 0].
COV_LOGPROBS = t([[-1.0, -3.0], [-2.0, 5.0]])
COV_ADVANTAGES = t([[2.0, -2.0], [0.0, 9.0]])
COV_MASK = t([[1, 1], [1, 0]])


def test_clip_cov_detaches_every_candidate_when_budget_allows():
    generator = torch.Generator().manual_seed(0)
    keep = clip_cov_mask(COV_LOGPROBS, COV_LOGPROBS, COV_ADVANTAGES, COV_MASK, 1.0, 1.0, 5.0, generator=generator)
    # budget int(1.0 * 3) = 3 >= 2 candidates (Cov 2 in (1, 5)); token with Cov 0 is kept.
    assert close(keep, [[0.0, 0.0], [1.0, 1.0]])


def test_clip_cov_draws_budget_tokens_reproducibly():
    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return clip_cov_mask(COV_LOGPROBS, COV_LOGPROBS, COV_ADVANTAGES, COV_MASK, 0.5, 1.0, 5.0, generator=generator)

    keep = draw(3)
    # budget int(0.5 * 3) = 1 of the two candidates; never the Cov-0 token.
    assert keep.sum() == 3 and keep[0].sum() == 1 and keep[1].tolist() == [1.0, 1.0]
    assert torch.equal(keep, draw(3))
    assert {tuple(draw(seed)[0].tolist()) for seed in range(20)} == {(0.0, 1.0), (1.0, 0.0)}


def test_clip_cov_skips_tokens_ppo_already_clipped_and_bound_is_strict():
    old = COV_LOGPROBS.clone()
    old[0, 0] -= math.log(2.0)  # ratio 2 with A = 2 > 0: the PPO clip already zeroes this gradient
    generator = torch.Generator().manual_seed(0)
    keep = clip_cov_mask(COV_LOGPROBS, old, COV_ADVANTAGES, COV_MASK, 1.0, 1.0, 5.0, generator=generator)
    assert close(keep, [[1.0, 0.0], [1.0, 1.0]])
    # Cov = 2 is not strictly above a lower bound of 2: nothing qualifies.
    keep = clip_cov_mask(COV_LOGPROBS, COV_LOGPROBS, COV_ADVANTAGES, COV_MASK, 1.0, 2.0, 5.0, generator=generator)
    assert close(keep, [[1.0, 1.0], [1.0, 1.0]])


def test_kl_cov_penalises_the_top_covariance_token():
    # log p = [-1, -4, -1], A = [3, -3, 0]: means -2 and 0, Cov = [(1)(3), (-2)(-3), (1)(0)] = [3, 6, 0].
    logprobs = t([[-1.0, -4.0, -1.0, 0.0]]).requires_grad_()
    old = t([[-1.5, -3.5, -0.5, 0.0]])
    advantages = t([[3.0, -3.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    # budget max(1, int(0.1 * 3)) = 1 -> token 1; penalty 2 * |-4 - (-3.5)| = 1.
    penalty = kl_cov_penalty(logprobs, old, advantages, mask, kl_ratio=0.1, kl_coef=2.0)
    assert close(penalty.detach(), [[0.0, 1.0, 0.0, 0.0]])
    penalty.sum().backward()
    assert close(logprobs.grad, [[0.0, -2.0, 0.0, 0.0]])  # d/dlogp 2|logp - old| with logp < old
    # budget int(0.7 * 3) = 2 -> tokens 1 and 0: 2 * 0.5 each.
    penalty = kl_cov_penalty(logprobs, old, advantages, mask, kl_ratio=0.7, kl_coef=2.0)
    assert close(penalty.detach(), [[1.0, 1.0, 0.0, 0.0]])


def test_kl_cov_breaks_ties_by_position():
    # Cov = [2, 2 | 0]: with a budget of one token the earlier of the tied pair is chosen.
    old = COV_LOGPROBS - 1.0
    penalty = kl_cov_penalty(COV_LOGPROBS, old, COV_ADVANTAGES, COV_MASK, kl_ratio=0.1)
    assert close(penalty, [[1.0, 0.0], [0.0, 0.0]])


# ----- unlikeliness reward ---------------------------------------------------------------------


def test_unlikeliness_rewards_penalise_likely_correct_completions():
    rewards = t([1.0, 1.0, 0.2, 1.0])
    logprobs = t([-1.0, -3.0, -0.5, -2.0])
    correct = torch.tensor([True, True, False, True])
    # Ascending likelihood: -3.0 (idx 1) rank 0, -2.0 (idx 3) rank 1, -1.0 (idx 0) rank 2, -0.5 (idx 2) rank 3.
    # factor 1 - 0.5 * rank / 4: idx 0 -> 0.75, idx 1 -> 1, idx 3 -> 0.875; idx 2 is incorrect: unchanged.
    assert close(unlikeliness_rewards(rewards, logprobs, correct, 4, 0.5), [0.75, 1.0, 0.2, 0.875])


def test_unlikeliness_rewards_ties_and_groups():
    # Group 1: all tied -> the earlier completion counts as less likely: ranks 0, 1, 2, 3.
    # Group 2: ranks by likelihood 3, 0, 2, 1.
    rewards = torch.ones(8, dtype=torch.float64)
    logprobs = t([-1.0, -1.0, -1.0, -1.0, 0.0, -9.0, -1.0, -2.0])
    correct = torch.ones(8, dtype=torch.bool)
    expected = [1.0, 0.9, 0.8, 0.7, 0.7, 1.0, 0.8, 0.9]  # 1 - 0.4 * rank / 4
    assert close(unlikeliness_rewards(rewards, logprobs, correct, 4, 0.4), expected)


# ----- pass@k advantages -----------------------------------------------------------------------


def test_pass_at_k_advantages_hand_computed():
    # N = 4, c = 1, k = 2: R = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5, sigma = 0.5.
    # A_pos = 0.5 / 0.5 = 1; A_neg = (0.5 - C(2,1)/C(3,1)) / 0.5 = (0.5 - 2/3) / 0.5 = -1/3.
    correct = torch.tensor([False, True, False, False])
    assert close(pass_at_k_advantages(correct, 4, 2), [-1 / 3, 1.0, -1 / 3, -1 / 3], tol=1e-6)


def test_pass_at_k_with_k_one_is_grpo_with_population_std():
    # c = 1 of 4: p = 1/4, sigma = sqrt(3/16); A_pos = (3/4)/sigma = sqrt(3), A_neg = -(1/4)/sigma = -1/sqrt(3).
    correct = torch.tensor([True, False, False, False])
    s = math.sqrt(3)
    assert close(pass_at_k_advantages(correct, 4, 1), [s, -1 / s, -1 / s, -1 / s], tol=1e-6)


def test_pass_at_k_degenerate_groups_get_zero():
    none_correct = torch.zeros(4, dtype=torch.bool)
    all_correct = torch.ones(4, dtype=torch.bool)
    # c = 3 of 4 with k = 2: every pair holds a correct one, R = 1, sigma = 0.
    one_incorrect = torch.tensor([True, True, False, True])
    for correct in (none_correct, all_correct, one_incorrect):
        assert close(pass_at_k_advantages(correct, 4, 2), [0.0] * 4)
    with pytest.raises(ValueError):
        pass_at_k_advantages(all_correct, 4, 5)


# ----- format-diversity bonus ------------------------------------------------------------------


def test_format_diversity_bonus():
    formats = ["json", "json", "json", "yaml", "code", "code", "code", "code"]
    correct = torch.tensor([True, True, False, True, True, True, True, False])
    # Group 1: json share 3/4, yaml 1/4 -> 0.5 * 1/4, 0.5 * 1/4, 0 (incorrect), 0.5 * 3/4.
    # Group 2: one format for everyone -> no bonus.
    bonus = format_diversity_bonus(formats, correct, 4, 0.5)
    assert close(bonus, [0.125, 0.125, 0.0, 0.375, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        format_diversity_bonus(formats[:3], correct[:3], 4, 0.5)


# ----- format-mix KL to the base, outcome-based exploration -----------------------------------


def test_format_kl_shares_hand_computed():
    # batch a, a, b, c; base (step 0) a x1, b x3. K = {a, b, c}: both denominators 4 + 3/2 = 5.5.
    # p = 2.5, 1.5, 1.5 (/5.5); q = 1.5, 3.5, 0.5 (/5.5): log-ratios ln 5/3, ln 3/7, ln 3.
    log_ratio, kl = format_kl_shares(["a", "a", "b", "c"], {"a": 1, "b": 3})
    assert log_ratio.tolist() == pytest.approx([math.log(5 / 3), math.log(5 / 3), math.log(3 / 7), math.log(3)])
    assert kl == pytest.approx((2.5 * math.log(5 / 3) + 1.5 * math.log(3 / 7) + 1.5 * math.log(3)) / 5.5)
    # a format the batch lost (base only) still counts in K: batch a, a; base a, b -> p = 2.5/3, 0.5/3;
    # q = 1.5/3, 1.5/3: the surviving a is penalised by ln 5/3, KL = (2.5 ln 5/3 + 0.5 ln 1/3) / 3.
    log_ratio, kl = format_kl_shares(["a", "a"], {"a": 1, "b": 1})
    assert log_ratio.tolist() == pytest.approx([math.log(5 / 3)] * 2)
    assert kl == pytest.approx((2.5 * math.log(5 / 3) + 0.5 * math.log(1 / 3)) / 3)


def test_format_kl_shares_is_zero_on_the_base_batch_and_follows_the_kl_gradient():
    formats = ["a", "b", "b", "c", "c", "c"]
    log_ratio, kl = format_kl_shares(formats, {"a": 1, "b": 2, "c": 3})
    assert log_ratio.tolist() == [0.0] * 6 and kl == 0.0
    # the penalty is d KL(p || q) / d p(f) - 1 = log p(f) / q(f): check against autograd on the smoothed p
    base = {"a": 4, "b": 1, "c": 1}
    log_ratio, _ = format_kl_shares(formats, base)
    p = (torch.tensor([1.5, 2.5, 3.5], dtype=torch.float64) / 7.5).requires_grad_()
    q = torch.tensor([4.5, 1.5, 1.5], dtype=torch.float64) / 7.5
    (p * (p / q).log()).sum().backward()
    a, b, c = (p.grad - 1).tolist()
    assert log_ratio.tolist() == pytest.approx([a, b, b, c, c, c])


def test_historical_exploration_bonus_hand_computed():
    # prompt p saw answer "1" four times and "2" once; q saw nothing. min(1, 1/sqrt(N)): 1/2, 1, 1 (N = 0), 0 (no
    # answer), 1 (answer 1 is new on q: counts are per prompt).
    seen = {"p": {"1": 4, "2": 1}}
    bonus = historical_exploration_bonus(["1", "2", "3", None, "1"], ["p", "p", "p", "p", "q"], seen)
    assert bonus.tolist() == [0.5, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        historical_exploration_bonus(["1"], ["p", "q"], seen)


def test_batch_exploration_penalty_hand_computed():
    # group 1 (G = 4): "1" twice -> 1/4 each; "2" alone -> 0; no answer -> 0.
    # group 2: one answer four times -> 3/4 each.
    penalty = batch_exploration_penalty(["1", "1", "2", None, "3", "3", "3", "3"], 4)
    assert penalty.tolist() == [0.25, 0.25, 0.0, 0.0, 0.75, 0.75, 0.75, 0.75]
    with pytest.raises(ValueError):
        batch_exploration_penalty(["1", "2", "3"], 2)
