"""The tensor math of our RL algorithms and of the diversity mitigations.

Every function is pure (no module state, no global RNG) and states its equation and its source next
to the code, CleanRL style. Conventions shared by all functions:

- Sequences are completions of shape (batch, T). `logprobs[b, t]` is log pi(y_t | x, y_<t) of the
  token that was sampled; `mask[b, t]` (bool or 0/1 float) marks the completion tokens that count.
  Padding positions may hold any finite value: they are masked out.
- Policy-loss terms are returned per token, shape (batch, T), and reduced by `aggregate`: the GRPO
  variants differ only in that reduction, as in TRL's GRPOTrainer, and the mitigations act per
  token (a mask to multiply, a penalty to add). Losses are minimised.
- Advantages may be per token, shape (batch, T), or per sequence, shape (batch,) or (batch, 1).
- Group-based functions take a flat batch whose consecutive blocks of `group_size` entries are the
  completions of one prompt (TRL's `rewards.view(-1, num_generations)` layout).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

# TRL GRPOTrainer's epsilon in A = (r - mean) / (std + 1e-4).
GROUP_STD_EPSILON = 1e-4


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is set: sum(x * m) / max(sum(m), 1).

    dim=None averages over every masked element; an empty mask gives 0 rather than NaN.
    """
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    mask = mask.to(x.dtype)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1.0)
    return x.sum(dim) / mask.sum(dim).clamp(min=1.0)


def _masked_variance(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of the masked elements: mean((x - mean(x))^2)."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explained variance of the value head, as logged by OpenAI baselines and CleanRL.

        EV = 1 - Var[R - V] / Var[R]      (over masked tokens, population variances)

    1 is a perfect critic, 0 is no better than predicting the mean return, < 0 is worse.
    NaN when the returns have zero variance.
    """
    variance_of_returns = _masked_variance(returns, mask)
    if variance_of_returns == 0:
        return torch.tensor(float("nan"), dtype=returns.dtype, device=returns.device)
    return 1 - _masked_variance(returns - values, mask) / variance_of_returns


def _per_token(advantages: torch.Tensor) -> torch.Tensor:
    """Per-sequence advantages (batch,) become (batch, 1) so they broadcast over tokens."""
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


# ---------------------------------------------------------------------------------------------
# KL estimators. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html
# Tokens are sampled from p = pi_theta; q = pi_ref. With r = q(y) / p(y) = exp(log q - log p), each
# estimator's expectation under p approximates KL(p || q) = KL(pi_theta || pi_ref).
# ---------------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q = -log r. Unbiased for KL(p || q), high variance, can be negative."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r = exp(log q - log p) - (log q - log p) - 1.

    Unbiased for KL(p || q), low variance, always >= 0. This is the per-token KL of GRPO
    (Shao et al. 2024, arXiv:2402.03300, eq. 4) with p = pi_theta, q = pi_ref, and TRL's
    `exp(ref - logp) - (ref - logp) - 1`.
    """
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - log_r - 1


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: H = -sum_v p_v log p_v, logits (batch, T, V) -> (batch, T).

    Tokens with logit -inf have p_v = 0 and contribute 0 (0 log 0 := 0).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation, Schulman et al. 2016 (arXiv:1506.02438), over tokens.

        delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}        (A_t := 0 where m_t = 0)
        R_t     = A_t + V_t                                     (the value target)

    rewards, values, mask: (batch, T). `rewards` holds the per-token reward: the sequence reward
    on the last completion token plus any per-token KL penalty. The value after the last
    completion token is 0 (m_{t+1} = 0 there): the episode ends with the completion. Completion
    tokens must be contiguous within a row; padding rewards and values are ignored.
    Returns (advantages, returns), both (batch, T), 0 outside the mask and without gradient.
    """
    mask = mask.to(values.dtype)
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * next_mask
    deltas = (rewards + gamma * next_values - values) * mask

    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        next_advantage = (deltas[:, t] + gamma * lam * next_mask[:, t] * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask
    return advantages, returns


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", baseline: str = "mean") -> torch.Tensor:
    """Group-relative advantages of GRPO, Shao et al. 2024 (arXiv:2402.03300), as TRL computes them.

        A_i = (r_i - b_i) / (std + 1e-4)

    with the baseline b_i chosen by `baseline`:
    - "mean": the mean reward of i's group (GRPO; TRL's GRPOTrainer);
    - "leave_one_out": the mean of the *other* G - 1 rewards of the group, b_i = (sum_g r - r_i) / (G - 1),
      so r_i - b_i = G / (G - 1) (r_i - mean). RLOO, Kool et al. 2019 ("Buy 4 REINFORCE samples, get a
      baseline for free!") and Ahmadian et al. 2024 (arXiv:2402.14740); TRL's RLOOTrainer. The baseline
      does not depend on r_i, so the policy gradient stays unbiased.
    and `scale` choosing the divisor, exactly as TRL's `scale_rewards` (GRPOConfig):
    - "group": std of the prompt's group (GRPO);
    - "batch": std of all rewards in the batch, baseline still per group (TRL cites the "Lite PPO"
      paper, arXiv:2508.08221);
    - "none": no division, only the baseline subtracted (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783).
    std is the unbiased (Bessel-corrected) estimate, as TRL's `nanstd`; a single reward has std 0.
    A group whose rewards are all equal gets zero advantages under every scale and baseline.
    rewards: (batch,) with batch = num_prompts * group_size. Returns (batch,).
    """
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if baseline == "leave_one_out":
        if group_size < 2:
            raise ValueError("a leave-one-out baseline needs group_size >= 2")
        centred = centred * group_size / (group_size - 1)
    elif baseline != "mean":
        raise ValueError(f"baseline must be 'mean' or 'leave_one_out', not {baseline!r}")
    centred = centred.view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        std = std.expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', not {scale!r}")
    return centred / (std + GROUP_STD_EPSILON)


def zero_std_fraction(rewards: torch.Tensor) -> float:
    """Share of prompts whose samples all got the same reward, rewards (prompts, samples): those groups give
    GRPO no signal (TRL logs the same as `frac_reward_zero_std`)."""
    return (rewards.max(dim=1).values == rewards.min(dim=1).values).double().mean().item()


# ---------------------------------------------------------------------------------------------
# Policy and value losses
# ---------------------------------------------------------------------------------------------


def _ppo_clipped(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> torch.Tensor:
    """Tokens whose gradient the PPO clip removes.

    (ratio > 1 + eps_high and A > 0) or (ratio < 1 - eps_low and A < 0)
    """
    return ((ratio > 1 + epsilon_high) & (advantages > 0)) | ((ratio < 1 - epsilon_low) & (advantages < 0))


def importance_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """The importance ratio of the clipped surrogate, per token or per sequence.

    - "token":    rho_t = exp(log pi_theta(y_t) - log pi_old(y_t))              (PPO, GRPO), shape (batch, T);
    - "sequence": s_i   = exp((1/|y_i|) sum_t (log pi_theta(y_t) - log pi_old(y_t)))   GSPO, Zheng et al. 2025
      (arXiv:2507.18071, eq. 7): the length-normalised sequence likelihood ratio, one per sequence, shape
      (batch, 1), so every token of a sequence is clipped together. As TRL's `importance_sampling_level=
      "sequence"` (empty sequences count as length 1); the gradient flows through every token's log-prob.
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        mask = mask.to(log_ratio.dtype)
        return torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    raise ValueError(f"level must be 'token' or 'sequence', not {level!r}")


def clipped_policy_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, Schulman et al. 2017 (arXiv:1707.06347), with DAPO's clip-higher.

        loss_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)

    rho from `importance_ratio` (per token, or per sequence for GSPO: then (batch, 1) and broadcast over
    the tokens). Clip-higher (DAPO, Yu et al. 2025, arXiv:2503.14476) decouples the bounds: eps_low = 0.2,
    eps_high = 0.28 lets low-probability tokens with positive advantage grow further, which the
    paper uses against entropy collapse. eps_low = eps_high = 0.2 is the original PPO.

    Returns (per_token_loss (batch, T), clip_fraction): the share of masked tokens whose gradient the clip
    removes, i.e. ratio above 1 + eps_high with A > 0 or below 1 - eps_low with A < 0 (TRL's
    `clip_ratio/region_mean`; a sequence-level ratio counts for each of its tokens), detached.
    """
    advantages = _per_token(advantages)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    per_token_loss = -torch.min(unclipped, clipped)
    per_token_loss = per_token_loss.expand(mask.shape)

    with torch.no_grad():
        is_clipped = _ppo_clipped(ratio, advantages, epsilon_low, epsilon_high).expand(mask.shape)
        clip_fraction = masked_mean(is_clipped.to(per_token_loss.dtype), mask)
    return per_token_loss, clip_fraction


def bias_corrected_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The per-token k3 KL to the reference, weighted by the importance ratio: rho_t * k3_t.

    k3 (see `kl_k3`) estimates KL(pi_theta || pi_ref) for tokens drawn from pi_theta, but the tokens come
    from pi_old; multiplying by rho = pi_theta / pi_old makes its gradient the unbiased gradient of the
    reverse KL (DeepSeek-V3.2, arXiv:2512.02556, eq. 7). rho is differentiable, so this changes the
    gradient even where rho = 1 (the first pass over a batch). TRL 1.16's GRPOTrainer does this by
    default (`use_bias_correction_kl=True`); a sequence-level rho (GSPO) is broadcast over the tokens.
    """
    return kl_k3(logprobs, ref_logprobs) * ratio


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """PPO's clipped value loss (OpenAI baselines' PPO2; discussed in Engstrom et al. 2020, arXiv:2005.12729).

        V_clip = V_old + clip(V - V_old, -c, c)
        loss   = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)      (mean over masked tokens)

    The max keeps the value head from profiting from a move of more than c away from V_old.
    Returns a scalar (TRL's PPOTrainer and CleanRL reduce it the same way).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    per_token = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(per_token, mask)


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
    global_token_count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (batch, T) per-token loss to a scalar, as TRL 1.16's GRPOTrainer.compute_loss does.

    With m the mask, B the sequences of this batch and |o_i| = sum_t m_it:
    - "grpo":    (1/B) sum_i (1/|o_i|) sum_t l_it            GRPO, Shao et al. 2024 (arXiv:2402.03300):
                 mean over each sequence's tokens, then over sequences (long sequences weigh less per token).
    - "bnpo":    sum_it l_it / sum_it m_it                    mean over the tokens of this (local) batch.
    - "dr_grpo": sum_it l_it / (B * max_completion_length)    Dr. GRPO, Liu et al. 2025 (arXiv:2503.20783):
                 a constant normaliser, so no length bias. B = `num_sequences`, default the batch size.
    - "dapo":    sum_it l_it / N_global                      DAPO, Yu et al. 2025 (arXiv:2503.14476):
                 token-level mean over the whole global (generation) batch. N_global =
                 `global_token_count`, the completion tokens of that batch, default this batch's
                 (then "dapo" equals "bnpo"). Summing this loss over the micro-batches of the
                 generation batch gives TRL's value (TRL's num_items_in_batch normaliser).
    TRL additionally divides "grpo", "bnpo" and "dr_grpo" by the gradient-accumulation steps; that
    belongs to the training loop, not here. Empty sequences count as length 1 (TRL's clamp).
    """
    masked_loss = torch.where(mask.bool(), per_token_loss, torch.zeros_like(per_token_loss))
    mask = mask.to(per_token_loss.dtype)
    if loss_type == "grpo":
        return (masked_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked_loss.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        sequences = per_token_loss.size(0) if num_sequences is None else num_sequences
        return masked_loss.sum() / (sequences * max_completion_length)
    if loss_type == "dapo":
        tokens = mask.sum() if global_token_count is None else torch.as_tensor(global_token_count)
        return masked_loss.sum() / tokens.clamp(min=1.0)
    raise ValueError(f"loss_type must be 'grpo', 'bnpo', 'dr_grpo' or 'dapo', not {loss_type!r}")


# ---------------------------------------------------------------------------------------------
# Train/inference mismatch: the engine that sampled and the trainer compute different log-probabilities
# ---------------------------------------------------------------------------------------------


def truncated_importance_weights(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance sampling (TIS), Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training" (fengyao.notion.site/off-policy-rl); TRL's `vllm_importance_sampling_correction`
    with mode "token_truncate", verl's `rollout_is`.

        w_t = min(pi_old(y_t) / pi_sampler(y_t), C) = min(exp(log pi_old - log pi_sampler), C)

    The rollouts come from the inference engine's distribution pi_sampler (another kernel, dtype or
    top-p), not from the trainer's pi_old; multiplying each token's policy-gradient loss by w_t makes the
    update the one for samples of pi_old, and the cap C bounds its variance. Both log-probs are those of
    the sampling distribution (logits / temperature). Detached: a weight, not a term to differentiate.
    old_logprobs, sampler_logprobs: (batch, T). Returns (batch, T).
    """
    return torch.exp(old_logprobs.detach() - sampler_logprobs).clamp(max=cap)


@torch.no_grad()
def sampler_mismatch(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
    """How far the trainer's log-probs of the sampled tokens are from the sampler's: (kl, max_ratio).

        kl        = mean_t k3 = mean_t [(r_t - 1) - log r_t],  r_t = pi_old(y_t) / pi_sampler(y_t)
                    (Schulman's k3 for KL(pi_sampler || pi_old): the tokens were drawn from pi_sampler)
        max_ratio = max_t r_t                                 (the largest importance weight before any cap)

    over the masked tokens; (0, 1) when the two agree. Both are what verl's rollout_is and TRL's
    `sampling/importance_sampling_ratio/max` log to watch the mismatch.
    """
    kl = masked_mean(kl_k3(sampler_logprobs, old_logprobs), mask)
    ratio = torch.exp(old_logprobs - sampler_logprobs)
    masked = torch.where(mask.bool(), ratio, torch.zeros_like(ratio))
    return kl.item(), (masked.max().item() if mask.bool().any() else 1.0)


# ---------------------------------------------------------------------------------------------
# Diversity mitigations
# ---------------------------------------------------------------------------------------------


def _token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_t = (log pi(y_t) - mean log pi) * (A_t - mean A), means over masked tokens; detached."""
    logprobs = logprobs.detach()
    advantages = _per_token(advantages).detach().expand_as(logprobs)
    return (logprobs - masked_mean(logprobs, mask)) * (advantages - masked_mean(advantages, mask))


def clip_cov_mask(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float = 2e-4,
    cov_lower: float = 1.0,
    cov_upper: float = 5.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Clip-Cov, Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs" (arXiv:2505.22617).

    The paper shows entropy falls in proportion to the covariance between a token's log-probability
    and its advantage, so it stops the gradient of a few high-covariance tokens:

        Cov_t  = (log pi(y_t) - mean log pi) * (A_t - mean A)          (means over masked tokens)
        I_clip = floor(r * N) tokens drawn uniformly from {t : cov_lower < Cov_t < cov_upper}
        loss_t <- 0 * loss_t  for t in I_clip                            (gradient detached)

    N is the number of masked tokens and at least one token is drawn when any qualifies. As in the
    authors' code (PRIME-RL/Entropy-Mechanism-of-RL, merged into verl as `clip_cov`), tokens the
    PPO clip already silences (see `clipped_policy_loss`) are not candidates; defaults are theirs.
    Randomness comes only from `generator`.

    Returns a (batch, T) float mask, 0 for the detached tokens and 1 elsewhere; multiply the
    per-token policy loss by it. Detached tokens still count in the aggregation's denominator.
    """
    advantages = _per_token(advantages)
    covariance = _token_covariance(logprobs, advantages, mask)
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    candidates = (
        mask.bool()
        & (covariance > cov_lower)
        & (covariance < cov_upper)
        & ~_ppo_clipped(ratio, advantages, epsilon_low, epsilon_high)
    )
    candidate_index = candidates.flatten().nonzero().squeeze(-1)
    budget = max(int(clip_ratio * mask.bool().sum().item()), 1)
    order = torch.randperm(candidate_index.numel(), generator=generator, device=generator.device)
    chosen = candidate_index[order[:budget].to(candidate_index.device)]

    keep = torch.ones(logprobs.numel(), dtype=logprobs.dtype, device=logprobs.device)
    keep[chosen] = 0.0
    return keep.view_as(logprobs)


def kl_cov_penalty(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kl_ratio: float = 2e-4,
    kl_coef: float = 1.0,
) -> torch.Tensor:
    """KL-Cov, Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs" (arXiv:2505.22617).

    A KL penalty on the tokens with the largest log-probability/advantage covariance:

        Cov_t   = (log pi(y_t) - mean log pi) * (A_t - mean A)          (means over masked tokens)
        I_KL    = the max(1, floor(k * N)) masked tokens of largest Cov_t
        loss_t <- loss_t + beta * |log pi_theta(y_t) - log pi_old(y_t)|   for t in I_KL

    with beta = `kl_coef` and k = `kl_ratio`; the |log ratio| form and the defaults are the
    authors' code (verl's `kl_cov`), whose base loss is the *unclipped* surrogate -rho_t A_t: to
    reproduce it, add this penalty to `clipped_policy_loss(..., epsilon_low=inf, epsilon_high=inf)`.
    Ties in Cov are broken by position (row-major, earlier first).
    Returns the per-token penalty (batch, T), 0 off I_KL, differentiable through `logprobs`.
    """
    covariance = _token_covariance(logprobs, advantages, mask).flatten()
    valid_index = mask.bool().flatten().nonzero().squeeze(-1)
    budget = max(int(kl_ratio * valid_index.numel()), 1)
    by_covariance = torch.sort(covariance[valid_index], descending=True, stable=True).indices
    chosen = valid_index[by_covariance[:budget]]

    selected = torch.zeros(logprobs.numel(), dtype=logprobs.dtype, device=logprobs.device)
    selected[chosen] = 1.0
    return kl_coef * (logprobs - old_logprobs).abs() * selected.view_as(logprobs)


def unlikeliness_rewards(
    rewards: torch.Tensor,
    sequence_logprobs: torch.Tensor,
    correct: torch.Tensor,
    group_size: int,
    beta: float,
) -> torch.Tensor:
    """Unlikeliness reward, He, Fried & Welleck 2025, "Rewarding the Unlikely" (arXiv:2506.02355).

    GRPO reinforces the correct completions the policy already finds likely ("rank bias"); the
    unlikeliness reward lowers the reward of likely correct completions so rare correct ones win:

        r_i <- r_i * (1 - beta * (G - rank_i) / G)      for correct i, rank_i in {1..G}

    where rank_i orders the group's G completions from most likely (1) to least likely (G), so
    the most likely correct completion is scaled by 1 - beta (G-1)/G and the least likely by 1.
    This is what the authors' released code computes (`ray_lean_trainer._compute_advantages`:
    ascending rank among all G samples, `score * (1 - rank / G * rank_penalty)`); there the
    likelihood is the mean per-token log-prob under pi_old, which is what `sequence_logprobs`
    should hold to match them. All G completions are ranked, incorrect ones included; only the
    rewards of correct ones change. Ties: the earlier completion in the group counts as less likely.
    rewards, sequence_logprobs, correct: (batch,), batch = num_prompts * G. Returns (batch,).
    """
    grouped = sequence_logprobs.detach().view(-1, group_size)
    # 0 for the least likely of each group, G - 1 for the most likely (stable sort breaks ties by position).
    ascending_rank = torch.argsort(torch.argsort(grouped, dim=1, stable=True), dim=1).view(-1)
    factor = 1 - beta * ascending_rank.to(rewards.dtype) / group_size
    return torch.where(correct.bool(), rewards * factor, rewards)


def pass_at_k_advantages(correct: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Analytical Pass@k-training advantages, Chen et al. 2025, "Pass@k Training for Adaptively
    Balancing Exploration and Exploitation of Large Reasoning Models" (arXiv:2508.10751).

    The reward of a k-subset of the group is 1 if it holds a correct completion (pass@k). With
    N = group_size completions of which c are correct, averaging over all C(N, k) subsets gives

        R_mean = 1 - C(N - c, k) / C(N, k)                        (mean subset reward)
        sigma  = sqrt(R_mean (1 - R_mean))                         (its std)
        A_pos  = (1 - R_mean) / sigma                              (each correct completion)
        A_neg  = (1 - R_mean - C(N - c - 1, k - 1) / C(N - 1, k - 1)) / sigma   (each incorrect one)

    (their eqs. for A_pos / A_neg, and the authors' `calc_adv` in RUCAIBox/Passk_Training). k = 1
    recovers GRPO with the population std. When sigma = 0 (c = 0, or fewer than k incorrect
    completions) both numerators are 0 and we return 0; the authors' sigma + 1e-6 gives the same.
    correct: (batch,) bool, batch = num_prompts * N. Returns float (batch,).
    """
    if not 1 <= k <= group_size:
        raise ValueError(f"k must be in [1, group_size={group_size}], got {k}")
    n = group_size
    grouped = correct.bool().view(-1, n)
    advantages = torch.zeros(grouped.shape, dtype=torch.float32, device=correct.device)
    for g, group in enumerate(grouped):
        c = int(group.sum())
        mean_reward = 1 - math.comb(n - c, k) / math.comb(n, k)
        sigma = math.sqrt(mean_reward * (1 - mean_reward))
        if sigma == 0:
            continue
        positive = (1 - mean_reward) / sigma
        negative = (1 - mean_reward - math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1)) / sigma
        advantages[g] = torch.where(group, positive, negative)
    return advantages.view(-1)


def prefix_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first `tokens` (K) completion tokens of each row: prefix_t = m_t and (number of m_s = 1 for s <= t) <= K.

    Prefix KL, echolab's own mitigation (no paper): in the Echo Chamber study the format is settled in the first
    few completion tokens while a per-token KL (rl.beta) is averaged over all of them, so the penalty is weighted
    onto the deciding tokens instead. The loops add coef * k3_t * prefix_t (`kl_k3`; GRPO also weights it by
    the importance ratio, as its beta term, `bias_corrected_kl`) to the per-token loss and aggregate it as the
    policy loss: a prefix token weighs what it weighs in the policy loss, the other tokens nothing.
    Positions count completion tokens only (rows may hold padding anywhere). mask: (batch, T). Returns bool
    (batch, T).
    """
    mask = mask.bool()
    return mask & (mask.long().cumsum(-1) <= tokens)


def sequence_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sequence-level KL estimate of each completion: sum_t m_t (log pi(y_t) - log pi_ref(y_t)) = log pi(y) /
    pi_ref(y), whose expectation over y ~ pi is KL(pi || pi_ref) of whole sequences (the k1 estimator summed, see
    `kl_k1`). As a reward penalty, r <- r - coef * this, it is the KL-in-the-reward of Ziegler et al. 2019
    (arXiv:1909.08593) and Ouyang et al. 2022 (arXiv:2203.02155, eq. 2) at sequence level: one number per
    completion that weighs every token's log-ratio the same, whatever the length, so the few tokens where the
    format is decided are not diluted by a mean. Detached: a reward, not a loss term. Returns (batch,).
    """
    return torch.where(mask.bool(), logprobs.detach() - ref_logprobs, torch.zeros_like(ref_logprobs)).sum(-1)


def format_diversity_bonus(
    formats: Sequence[str], correct: torch.Tensor, group_size: int, coefficient: float
) -> torch.Tensor:
    """Format-diversity bonus: our own mitigation (echolab), not from a paper.

        bonus_i = coefficient * (1 - share of format_i among the G completions of i's group)   if i is correct
        bonus_i = 0                                                                          otherwise

    Shares count every completion of the group, correct or not (so "other" counts too). A correct
    completion in a format no one else in its group used earns coefficient * (G - 1) / G; if the
    whole group shares one format, nobody earns anything. Add the bonus to the reward before
    computing advantages. formats: G labels per prompt (e.g. from `specialists.formats.classify`),
    correct: (batch,) bool. Returns float (batch,).
    """
    if len(formats) != correct.numel() or len(formats) % group_size:
        raise ValueError(f"need one format per completion in whole groups of {group_size}; "
                         f"got {len(formats)} formats for {correct.numel()} completions")
    share = []
    for start in range(0, len(formats), group_size):
        group = formats[start : start + group_size]
        counts = Counter(group)
        share.extend(counts[label] / group_size for label in group)
    share = torch.tensor(share, dtype=torch.float32, device=correct.device)
    return torch.where(correct.bool(), coefficient * (1 - share), torch.zeros_like(share))


# Krichevsky-Trofimov (add-1/2) pseudo-count of format_kl_shares: finite log-ratios for formats one side never produced.
FORMAT_PSEUDO_COUNT = 0.5


def format_kl_shares(formats: Sequence[str], base_counts: dict[str, int]) -> tuple[torch.Tensor, float]:
    """The format-mix KL to the base as a per-completion reward penalty: our own mitigation (echolab, issue 14).

    p(f) is the share of format f among the batch's completions, q(f) the base model's share (counted once,
    on the step-0 batch); both are smoothed with the Krichevsky-Trofimov pseudo-count 1/2 over K, the formats
    either side produced, so the log-ratio stays finite when a format dies out or appears:

        p(f) = (n_f + 1/2) / (n + |K| / 2),    q(f) = (m_f + 1/2) / (m + |K| / 2)

    Returns (per completion i, log p(f_i) / q(f_i); KL(p || q) = sum_f p(f) log p(f) / q(f)). Why this
    penalty, r_i <- r_i - coef * log p(f_i) / q(f_i): with p_theta(f) = E_{y ~ pi_theta}[1{f(y) = f}], the
    gradient of the objective -coef * KL(p_theta || q) is

        -coef * sum_f grad p_theta(f) (log p_theta(f) / q(f) + 1)
            = E_y[ grad log pi_theta(y) * (-coef * (log p_theta(f(y)) / q(f(y)) + 1)) ]

    (score function, Williams 1992), and the +1 drops out because sum_f grad p_theta(f) = 0 (any baseline
    removes it). So this is the policy gradient of the format-level KL, with the batch's shares as the
    plug-in estimate of p_theta, as the sequence KL in the reward (`sequence_log_ratio`) is of the sequence
    level one: formats above their base share lose reward, formats below it gain. At step 0 the batch is the
    base sample, so the penalty is 0 there. formats: one label per completion; base_counts: format -> count.
    """
    counts = Counter(formats)
    vocabulary = counts.keys() | base_counts.keys()
    n, m, alpha = len(formats), sum(base_counts.values()), FORMAT_PSEUDO_COUNT
    p = {f: (counts[f] + alpha) / (n + alpha * len(vocabulary)) for f in vocabulary}
    q = {f: (base_counts.get(f, 0) + alpha) / (m + alpha * len(vocabulary)) for f in vocabulary}
    kl = sum(p[f] * math.log(p[f] / q[f]) for f in vocabulary)
    return torch.tensor([math.log(p[f] / q[f]) for f in formats], dtype=torch.float64), kl


def historical_exploration_bonus(answers: Sequence[str | None], prompt_ids: Sequence[str],
                                 seen: dict[str, dict[str, int]]) -> torch.Tensor:
    """Historical exploration (Song, Kempe & Munos 2025, "Outcome-based Exploration for LLM Reasoning",
    arXiv:2509.06941, sec. 4): a UCB-style bonus for final answers rarely seen on this prompt in training so far,

        b_i = min(1, 1 / sqrt(N(x_i, a_i))) = 1 / sqrt(max(N(x_i, a_i), 1))     (counts are whole: 1 when N = 0)

    with N(x, a) the times answer a was sampled for prompt x in earlier steps (`seen`: prompt id -> answer ->
    count; the caller adds the batch after). The bonus depends only on the outcome, never on the reasoning
    path: the outcome space of a problem is small enough to count. A completion without a final answer
    (None) gets 0: failing to answer is not an outcome to explore. Returns float64 (batch,).
    """
    return torch.tensor([0.0 if answer is None else 1 / math.sqrt(max(seen.get(prompt, {}).get(answer, 0), 1))
                         for answer, prompt in zip(answers, prompt_ids, strict=True)], dtype=torch.float64)


def batch_exploration_penalty(answers: Sequence[str | None], group_size: int) -> torch.Tensor:
    """Batch exploration (Song, Kempe & Munos 2025, arXiv:2509.06941, sec. 5): a penalty for final answers repeated
    among the G samples of the same prompt (its group),

        p_i = (1 / G) sum_{j != i, j in group(i)} 1{a_j = a_i}

    so a group that spreads over several answers keeps more reward than one that repeats a single answer, which
    favours diversity at test time (many samples of one problem). Completions without a final answer (None)
    neither pay nor count. Returns float64 (batch,).
    """
    if len(answers) % group_size:
        raise ValueError(f"need whole groups of {group_size} answers, got {len(answers)}")
    penalty = []
    for start in range(0, len(answers), group_size):
        counts = Counter(answer for answer in answers[start:start + group_size] if answer is not None)
        penalty.extend(0.0 if answer is None else (counts[answer] - 1) / group_size
                       for answer in answers[start:start + group_size])
    return torch.tensor(penalty, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Router load balancing across data-parallel ranks
# ---------------------------------------------------------------------------------------------


def load_balancing_share(router_logits: tuple[torch.Tensor, ...] | None, num_experts: int, top_k: int,
                         attention_mask: torch.Tensor | None, total) -> torch.Tensor:
    """One rank's share of the Switch Transformer load-balancing loss of a batch split across ranks (Fedus et al.
    2021, arXiv:2101.03961, eqs. 4-6; transformers' `load_balancing_loss_func`, which every MoE family uses):

        L = E * sum_e f_e P_e,   f_e = (top-k assignments to e) / N,   P_e = (sum of router probabilities of e) / N

    over the N real tokens of every layer of the whole batch. f carries no gradient (top-k counts), so with the
    counts summed over ranks first (`total`: a sum over ranks of a detached tensor),

        share_r = E * sum_e f_e^global * (sum of rank r's router probabilities of e) / N^global

    adds up over the ranks to L, and its gradient to L's. With `total` the identity this is L itself (one rank).
    `router_logits` None: the rank holds no tokens of the batch and contributes zeros (it still calls `total`).
    """
    counts = torch.zeros(num_experts, dtype=torch.float32)
    probability_sums = torch.zeros(num_experts, dtype=torch.float32)
    rows = torch.zeros((), dtype=torch.float32)
    for layer_logits in router_logits or ():
        mask = (torch.ones(layer_logits.shape[0]) if attention_mask is None
                else attention_mask.reshape(-1).float()).to(layer_logits.device)
        probabilities = torch.softmax(layer_logits, dim=-1)  # (N, E)
        _, selected = torch.topk(probabilities, top_k, dim=-1)  # (N, k)
        counts = counts.to(layer_logits.device).scatter_add(0, selected.reshape(-1), mask.repeat_interleave(top_k))
        probability_sums = probability_sums.to(layer_logits.device) + (probabilities.float() * mask[:, None]).sum(0)
        rows = rows.to(layer_logits.device) + mask.sum()
    global_counts = total(torch.cat([counts, rows[None]]).detach())
    tokens_per_expert, global_rows = global_counts[:-1] / global_counts[-1], global_counts[-1]
    return num_experts * torch.sum(tokens_per_expert * probability_sums / global_rows)
