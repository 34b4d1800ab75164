"""GRPO and its variants (Dr. GRPO, DAPO, BNPO, GSPO, the RLOO baseline) as our own loop, in one file (CleanRL style).

TRL's `GRPOTrainer` is the reference: on the same batch and weights `grpo_loss` gives its loss and gradient
for every `loss_type` and both importance-sampling levels (tests/test_grpo_parity.py), with its semantics
kept where they matter: `num_iterations` passes over one batch, each loss type's aggregation (dr_grpo's
max_completion_length normaliser, dapo's token count of the whole generation batch), the Bessel-corrected
std and its 1e-4, the KL weighted by the importance ratio, the entropy bonus and router loss of its config.
The maths is in rl.losses; this file is the loop around it. One step (rl.training.train runs steps 1 and 6):

 1. rollouts     prompts = prompt_set.batch(step), `samples_per_prompt` (G) completions each from the engine,
                 graded and rewarded (rl.rollouts.collect).
 2. pack         prompt + completion sequences packed into rows without padding between them, the LM head
                 run only where a completion token is predicted (rl.sequences.PackedBatch); per-token
                 tensors (B = prompts x G, C = longest completion), TRL's completion layout.
 3. advantages   r_i minus sequence_kl_coef * log pi_old(y_i) / pi_ref(y_i) when that is on (one extra forward),
                 plus the shaping terms of format_kl_coef and outcome_exploration_coef (rl.shaping.RewardShaping);
                 A_i = (r_i - b_i) / (std + 1e-4) within each prompt's group (GRPO, Shao et al. 2024,
                 arXiv:2402.03300), b_i the group mean or the leave-one-out mean (RLOO), std of the group or the
                 batch or none (Dr. GRPO); the unlikeliness reward first lowers the reward of likely correct
                 samples (He et al. 2025, arXiv:2506.02355); pass@k training replaces A by its closed form
                 (Chen et al. 2025, arXiv:2508.10751).
 4. reference    with a KL term (beta, prefix_kl_coef or sequence_kl_coef > 0): log pi_ref(y_t) under the frozen base model, no gradient.
 5. updates      `num_iterations` (mu) passes over the batch, one AdamW step each, minimising
                   L = agg_loss_type( w_t * l_t + (beta + prefix_kl_coef [t < K]) rho_t k3_t ) - entropy_coef * H
                       + aux_coef * L_aux + pretrain_replay_coef * NLL_pretrain
                   l_t   = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)   (x 0 on Clip-Cov's tokens,
                           + KL-Cov's penalty; Cui et al. 2025, arXiv:2505.22617)
                   rho   = pi_theta / pi_old per token, or GSPO's per-sequence ratio (Zheng et al. 2025,
                           arXiv:2507.18071)
                   w_t   = min(pi_old / pi_sampler, tis_cap): truncated importance sampling (Yao et al. 2025),
                           1 when rl.tis_cap is None
                   [t < K] = 1 on the first K = prefix_kl_tokens completion tokens: the prefix KL (rl.losses.prefix_mask)
                 pi_old is the first pass's own log-probs, detached: the first pass runs on the weights that
                 sampled, so no extra forward is needed (TRL computes the same with one). The first pass also
                 gives the routed-token counts, the rollouts' log-probs, the entropy and the KL of the sampling
                 model. Gradients are clipped to norm MAX_GRAD_NORM over every trained parameter. In a data-parallel
                 run (rl.distributed) each rank's loss is its share of the whole batch's, and the gradients are
                 summed across ranks before the clip.
 6. sync, record the engine gets the new weights; rollouts and one metrics line are written (rl.training).

Log-probs are those of the sampling distribution, logits / temperature, as TRL's. The learning rate is
constant (AdamW, betas 0.9 / 0.999, no weight decay, one optimiser for the whole run).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from rl.config import RLSettings
from rl.distributed import Shard, Weights
from rl.losses import (
    aggregate,
    bias_corrected_kl,
    clip_cov_mask,
    clipped_policy_loss,
    group_advantages,
    importance_ratio,
    kl_cov_penalty,
    kl_k3,
    masked_mean,
    pass_at_k_advantages,
    prefix_mask,
    sequence_log_ratio,
    truncated_importance_weights,
    unlikeliness_rewards,
)
from rl.recipe import (
    MAX_GRAD_NORM,
    PolicyOutput,
    Run,
    StepResult,
    aux_loss_coefficient,
    frozen,
    frozen_router,
    mean_metrics,
    measure_rollouts,
    policy_forward,
    pretrain_replay,
    require_finite,
)
from rl.rollouts import StepBatch, pack_batch, sampler_logprobs
from rl.routing import capture_routing
from rl.seeds import step_seed
from rl.sequences import PackedBatch
from rl.shaping import RewardShaping


@dataclass
class PolicyBatch:
    """One step's rollouts as the loss sees them: B completions of at most C tokens, flat completion order;
    per-token tensors in the completion layout (B, C)."""

    sequences: PackedBatch  # prompt + completion token ids, packed for the forward (rl.sequences)
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None = None  # (B, C) pi_old; None: the loss's own log-probs, detached
    ref_logprobs: torch.Tensor | None = None  # (B, C) pi_ref, with settings.needs_reference
    sampler_logprobs: torch.Tensor | None = None  # (B, C) the engine's, for truncated importance sampling


def grpo_loss(model, batch: PolicyBatch, settings: RLSettings, aux_coef: float,
              clip_cov_generator: torch.Generator | None = None, shard: Shard = Shard(),
              weights: Weights = Weights()) -> tuple[torch.Tensor, dict, PolicyOutput]:
    """One pass's loss on `batch` (step 5 without the replay term), its statistics and the forward it ran. In a
    data-parallel run (`shard`) the loss and the statistics are this rank's shares of the whole batch's (`weights`,
    rl.distributed): summed over the ranks they are the one-process values."""
    grpo, mitigations = settings.grpo, settings.mitigations
    forward = policy_forward(model, batch.sequences, settings.sampling.temperature, router_loss=aux_coef > 0,
                             shard=shard)
    logprobs, mask, advantages = forward.logprobs, batch.sequences.mask, batch.advantages
    old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs

    # KL-Cov's base loss is the unclipped surrogate (the authors' code, verl `kl_cov`; rl.losses.kl_cov_penalty).
    eps_low, eps_high = (math.inf, math.inf) if mitigations.kl_cov else (settings.epsilon, settings.clip_high)
    ratio = importance_ratio(logprobs, old, mask, grpo.importance_sampling_level)  # (B, C), or (B, 1) for GSPO
    per_token, clip_fraction = clipped_policy_loss(ratio, advantages, mask, eps_low, eps_high)  # (B, C)
    stats = {"clip_fraction": clip_fraction.item() * weights.tokens,
             "approx_kl": masked_mean(kl_k3(old, logprobs.detach()), mask).item() * weights.tokens}
    if mitigations.clip_cov:
        keep = clip_cov_mask(logprobs.detach(), old, advantages, mask, clip_ratio=mitigations.cov_ratio,
                             epsilon_low=settings.epsilon, epsilon_high=settings.clip_high, generator=clip_cov_generator)
        per_token = per_token * keep
        stats["clip_cov_fraction"] = masked_mean(1 - keep, mask).item()
    if mitigations.kl_cov:
        penalty = kl_cov_penalty(logprobs, old, advantages, mask, kl_ratio=mitigations.cov_ratio,
                                 kl_coef=mitigations.kl_cov_coef)
        per_token = per_token + penalty
        stats["kl_cov_penalty"] = _aggregate(penalty.detach(), mask, settings, weights).item()
    if batch.sampler_logprobs is not None and settings.tis_cap is not None:
        tis = truncated_importance_weights(old, batch.sampler_logprobs, settings.tis_cap)
        per_token = per_token * tis
        stats["tis_capped_fraction"] = masked_mean((tis >= settings.tis_cap).float(), mask).item() * weights.tokens
    stats["policy_loss"] = _aggregate(per_token.detach(), mask, settings, weights).item()
    if settings.beta > 0:
        per_token = per_token + settings.beta * bias_corrected_kl(logprobs, batch.ref_logprobs, ratio)
    if mitigations.prefix_kl_coef > 0:
        prefix_kl = bias_corrected_kl(logprobs, batch.ref_logprobs, ratio) * prefix_mask(mask, mitigations.prefix_kl_tokens)
        per_token = per_token + mitigations.prefix_kl_coef * prefix_kl
        stats["prefix_kl"] = _aggregate(prefix_kl.detach(), mask, settings, weights).item()

    loss = _aggregate(per_token, mask, settings, weights)
    if mitigations.entropy_coef:
        loss = loss - mitigations.entropy_coef * masked_mean(forward.entropy, mask) * weights.tokens
    if forward.aux_loss is not None:
        loss = loss + aux_coef * forward.aux_loss
        stats["aux_loss"] = forward.aux_loss.item()
    return loss, stats, forward


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, settings: RLSettings, weights: Weights) -> torch.Tensor:
    # The whole generation batch is one optimiser step's batch, so dapo's global token count is this batch's. Across
    # ranks, each rank's value is weighted by its share of what the loss type averages over: sequences for "grpo"
    # (a mean of sequence means) and "dr_grpo" (B x max length), tokens for "bnpo" and "dapo".
    loss_type = settings.grpo.loss_type
    weight = weights.sequences if loss_type in ("grpo", "dr_grpo") else weights.tokens
    return aggregate(per_token, mask, loss_type, max_completion_length=settings.sampling.max_new_tokens,
                     global_token_count=mask.sum()) * weight


def advantages_of(batch: StepBatch, settings: RLSettings, sequence_kl: torch.Tensor | None = None,
                  shaping: torch.Tensor | None = None) -> torch.Tensor:
    """Step 3: one advantage per completion (flat order). `sequence_kl` (completions,): log pi_old(y) / pi_ref(y),
    with mitigations.sequence_kl_coef > 0; `shaping` (completions,): rl.shaping.RewardShaping's terms, added to
    the rewards (format_kl_coef, outcome_exploration_coef)."""
    mitigations, grpo, group = settings.mitigations, settings.grpo, settings.sampling.samples_per_prompt
    rewards = batch.rewards.flatten()
    if shaping is not None:
        rewards = rewards + shaping.to(rewards.dtype)
    if mitigations.sequence_kl_coef > 0:
        rewards = rewards - mitigations.sequence_kl_coef * sequence_kl.cpu()
    correct = torch.tensor([grade.correct for grade in batch.flat_grades])
    if mitigations.pass_at_k:
        return pass_at_k_advantages(correct, group, mitigations.pass_at_k)
    if mitigations.unlikeliness_beta > 0:
        # likelihood = mean token log-prob under the sampling policy, as the authors rank (rl.losses.unlikeliness_rewards)
        likelihood = torch.tensor([sum(c.token_logprobs) / max(len(c.token_logprobs), 1)
                                   for c in batch.flat_completions])
        rewards = unlikeliness_rewards(rewards, likelihood, correct, group, mitigations.unlikeliness_beta)
    return group_advantages(rewards, group, grpo.scale_rewards, grpo.baseline)


class GRPO:
    """The GRPO recipe (rl.recipe.Recipe)."""

    def __init__(self, run: Run):
        self.run = run

    def setup(self, state: dict | None) -> None:
        run, settings = self.run, self.run.settings
        self._exit = ExitStack()
        self._exit.enter_context(frozen_router(run.model, settings.mitigations.freeze_router))
        self.parameters = [p for p in run.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.reference = frozen(run.base_model()) if settings.needs_reference else None
        self.replay = pretrain_replay(run)
        self.aux_coef = aux_loss_coefficient(run.model, settings)
        self.shaping = RewardShaping(settings.mitigations, state)

    def step(self, step: int, batch: StepBatch) -> StepResult:
        run, settings, shard = self.run, self.run.settings, self.run.shard
        model, temperature = run.model, settings.sampling.temperature
        device = next(model.parameters()).device
        model.train()

        # 2. Pack.
        sequences = pack_batch(batch, run.tokenizer).to(device)
        mask = sequences.mask  # (B, C) completion tokens
        sampler = sampler_logprobs(batch, mask)
        weights = shard.weights(mask)  # this rank's share of the step's tokens and sequences (1.0 in one process)

        # 3-4. Advantages; the reference's log-probs.
        ref_logprobs = sequence_kl = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logprobs = policy_forward(self.reference, sequences, temperature).logprobs
        if settings.mitigations.sequence_kl_coef > 0:
            # the reward needs pi_old before the first pass: one extra forward without gradient (PPO has it anyway)
            with torch.no_grad():
                sequence_kl = sequence_log_ratio(policy_forward(model, sequences, temperature).logprobs, ref_logprobs, mask)
        shaping, shaping_metrics = self.shaping(batch)
        policy = PolicyBatch(sequences, advantages_of(batch, settings, sequence_kl, shaping).to(device),
                             ref_logprobs=ref_logprobs, sampler_logprobs=sampler)

        # 5. mu passes, one optimiser step each.
        clip_cov_generator = torch.Generator(device=device).manual_seed(step_seed(run.seed, step, "clip_cov"))
        updates = []
        for update in range(settings.grpo.num_iterations):
            routing_capture = capture_routing(model, sequences.owner, mask.shape[0]) if update == 0 else nullcontext([])
            with routing_capture as routing:
                loss, stats, forward = grpo_loss(model, policy, settings, self.aux_coef, clip_cov_generator, shard, weights)
            if update == 0:  # the weights that sampled: pi_old, and what the step records about the sampling model
                first, expert_load = forward, (routing[0] if routing else None)
                policy.old_logprobs = forward.logprobs.detach()
            if self.replay is not None:
                replay_loss = self.replay.loss(model, step, update)
                loss = loss + settings.mitigations.pretrain_replay_coef * replay_loss
                stats["replay_loss"] = replay_loss.item()
            stats = shard.sum_values({**stats, "loss": loss.item()})  # the shares of every rank: the whole batch's
            require_finite("loss", torch.tensor(stats["loss"]), step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            shard.sum_gradients(self.parameters)  # the whole batch's gradient on every rank
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, MAX_GRAD_NORM)
            require_finite("gradient norm", grad_norm, step)
            self.optimizer.step()
            updates.append({**stats, "grad_norm": grad_norm.item()})

        metrics = mean_metrics(updates) | shaping_metrics
        metrics["updates"] = len(updates)
        metrics["entropy"] = shard.masked_mean(first.entropy.detach(), mask).item()
        if ref_logprobs is not None:
            metrics["kl_to_reference"] = shard.masked_mean(kl_k3(policy.old_logprobs, ref_logprobs), mask).item()
        if sequence_kl is not None:
            metrics["sequence_kl"] = shard.mean(sequence_kl).item()
        metrics["sampler_kl"], metrics["sampler_ratio_max"] = shard.sampler_mismatch(policy.old_logprobs, sampler, mask)
        return StepResult((first.raw_logprobs * mask).sum(-1), expert_load, metrics)

    def measure(self, step: int, batch: StepBatch) -> StepResult:
        return measure_rollouts(self.run.model, self.run.tokenizer, batch, self.run.settings.sampling.temperature,
                                self.reference, self.run.shard)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), **self.shaping.state_dict()}

    def close(self) -> None:
        self._exit.close()
