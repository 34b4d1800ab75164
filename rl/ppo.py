"""Proximal Policy Optimization on completions with a value head and GAE, in one file (CleanRL style).

Our own implementation: TRL removed its PPOTrainer in 1.13. The math lives in `rl.losses`; this file
is the loop around it (rl.training.train runs steps 1, 7 and 8). One step (= one batch of rollouts, then
`ppo.epochs` x `ppo.minibatches` optimiser updates):

 1. rollouts     prompts = prompt_set.batch(step); sample `samples_per_prompt` completions each from
                 the engine, grade them, reward them (rl.rollouts.collect).
 2. pi_old       one teacher-forced forward of the policy without gradient, the sequences packed into rows
                 (rl.sequences.PackedBatch): per-token log-probs log pi_old(y_t), values V_old(s_t), and the
                 routed-token counts of each completion (rl.routing.capture_routing; the recorder's expert_load).
 3. reference    with a KL term (beta, prefix_kl_coef or sequence_kl_coef > 0), the same forward of the frozen base model (Run.reference): log pi_ref(y_t).
 4. rewards      r_t = R(x, y) on the last completion token, 0 elsewhere, minus sequence_kl_coef *
                 sum_t (log pi_old - log pi_ref) there when that is on (rl.losses.sequence_log_ratio), plus the
                 shaping terms of format_kl_coef and outcome_exploration_coef (rl.shaping.RewardShaping); with kl_estimator "k1"
                 minus beta * k1_t on every token ("KL in the reward": Ziegler et al. 2019,
                 arXiv:1909.08593; Ouyang et al. 2022, arXiv:2203.02155, eq. 2).
 5. advantages   GAE(gamma, lam) (Schulman et al. 2016, arXiv:1506.02438), then normalised over the
                 batch's tokens (CleanRL's `norm_adv`, TRL's `masked_whiten`).
 6. updates      per minibatch, minimise
                     L = L_clip(eps_low, eps_high)               PPO, Schulman et al. 2017 (arXiv:1707.06347)
                       + value_coef * L_value(clip)               clipped value loss (OpenAI baselines PPO2)
                       - entropy_coef * H                         entropy bonus (Mnih et al. 2016, arXiv:1602.01783)
                       + beta * k3                                with kl_estimator "k3" (GRPO, arXiv:2402.03300, eq. 4)
                       + prefix_kl_coef * k3 [t < K]              prefix KL on the first K completion tokens (rl.losses.prefix_mask)
                       + aux_coef * L_aux                         router load balancing (Switch, arXiv:2101.03961)
                       + pretrain_replay_coef * NLL_pretrain      pretraining replay (PPO-ptx, rl.replay)
                 with Clip-Cov / KL-Cov (Cui et al. 2025, arXiv:2505.22617) acting on L_clip's tokens
                 when switched on, and each token of L_clip weighted by min(pi_old / pi_sampler, tis_cap)
                 with rl.tis_cap (truncated importance sampling, Yao et al. 2025); gradient norms clipped to
                 MAX_GRAD_NORM (policy and value head apart). In a data-parallel run (rl.distributed) the
                 minibatches split the whole batch, each rank's terms are its share of the minibatch's tokens, and
                 the gradients are summed across ranks before the clip.
 7. sync         engine.sync_weights(model) once the step's updates are done (the engine is idle between
                 them): the next step samples from the updated policy.
 8. record       rollouts and metrics; a checkpoint every `checkpoint_every` steps and
                 after the last.

Design choices, stated once:
- The value head is a `Linear(hidden, 1)` on the policy's last hidden state, *detached*: the value
  loss trains the head only, so the policy (what vLLM serves and what the diversity analysis
  measures) changes only through the policy objective, as with the separate critic of TRL's old
  PPOTrainer and OpenRLHF. It starts at zero (V = 0 before any update) and is not part of the HF
  checkpoint; it travels in `trainer_state.pt`.
- Log-probabilities are those of the sampling distribution, logits / temperature (as TRL does).
- The policy loss is the token-level mean over the minibatch (TRL PPOTrainer's `masked_mean`).
- Optimiser: AdamW without weight decay and a constant learning rate, one instance for the whole run.
- Every step's metrics that describe a model (entropy, kl_to_reference, explained_variance, sampler_kl) are
  those of the model that sampled, measured before the updates; loss statistics are means over the updates.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch

from rl.distributed import Shard
from rl.losses import (
    aggregate,
    clip_cov_mask,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    importance_ratio,
    kl_cov_penalty,
    kl_k1,
    kl_k3,
    masked_mean,
    prefix_mask,
    sequence_log_ratio,
    truncated_importance_weights,
)
from rl.recipe import (
    MAX_GRAD_NORM,
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
from rl.rollouts import StepBatch, sampler_logprobs, token_ids
from rl.routing import capture_routing
from rl.seeds import step_seed
from rl.sequences import pack_rows
from rl.shaping import RewardShaping

ADVANTAGE_EPSILON = 1e-8


class ValueHead(torch.nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state h_t (detached), zero-initialised."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.detach().float()).squeeze(-1)


def _last_token_rewards(sequence_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_t = R(x, y) at the last completion token of each row, 0 elsewhere (rows without tokens get nothing)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    has_tokens = last >= 0
    rewards[has_tokens, last[has_tokens]] = sequence_rewards[has_tokens].float()
    return rewards


def _whiten(advantages: torch.Tensor, mask: torch.Tensor, shard: Shard) -> torch.Tensor:
    """A <- (A - mean A) / (std A + 1e-8) over the batch's completion tokens (population std), every rank's;
    0 off the mask."""
    mean = shard.masked_mean(advantages, mask)
    std = shard.masked_mean((advantages - mean) ** 2, mask).sqrt()
    return ((advantages - mean) / (std + ADVANTAGE_EPSILON)) * mask


class PPO:
    """The PPO recipe (rl.recipe.Recipe)."""

    def __init__(self, run: Run):
        self.run = run

    def setup(self, state: dict | None) -> None:
        run, settings = self.run, self.run.settings
        self._exit = ExitStack()
        self._exit.enter_context(frozen_router(run.model, settings.mitigations.freeze_router))
        device = next(run.model.parameters()).device
        self.policy_parameters = [p for p in run.model.parameters() if p.requires_grad]
        self.value_head = ValueHead(run.model.config.hidden_size).to(device)
        self.optimizer = torch.optim.AdamW([{"params": self.policy_parameters},
                                            {"params": list(self.value_head.parameters())}],
                                           lr=settings.learning_rate, weight_decay=0.0)
        if state is not None:
            self.value_head.load_state_dict(state["value_head"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.reference = frozen(run.base_model()) if settings.needs_reference else None
        self.replay = pretrain_replay(run)
        self.aux_coef = aux_loss_coefficient(run.model, settings)
        self.shaping = RewardShaping(settings.mitigations, state)

    def step(self, step: int, batch: StepBatch) -> StepResult:
        run, settings, shard = self.run, self.run.settings, self.run.shard
        ppo, mitigations, model = settings.ppo, settings.mitigations, run.model
        temperature = settings.sampling.temperature or 1.0
        device = next(model.parameters()).device
        # KL-Cov replaces the clipped surrogate by the unclipped one (the authors' code, see rl.losses.kl_cov_penalty).
        eps_low, eps_high = (math.inf, math.inf) if mitigations.kl_cov else (settings.epsilon, settings.clip_high)
        num_sequences = len(batch.flat_completions)
        model.train()

        # 2-3. pi_old, V_old, routing; pi_ref. One forward without gradient each, all sequences packed.
        prompt_ids, completion_ids = token_ids(batch, run.tokenizer)
        sequences = pack_rows(prompt_ids, completion_ids, run.tokenizer.pad_token_id).to(device)
        mask = sequences.mask  # (B, C) completion tokens
        with torch.no_grad():
            with capture_routing(model, sequences.owner, num_sequences) as routing:
                old = policy_forward(model, sequences, temperature, hidden=True)
            old_logprobs, old_values = old.logprobs, self.value_head(old.hidden)
            ref_logprobs = None
            if self.reference is not None:
                ref_logprobs = policy_forward(self.reference, sequences, temperature).logprobs
        sampler = sampler_logprobs(batch, mask)
        tis_weights = None
        if settings.tis_cap is not None:
            tis_weights = truncated_importance_weights(old_logprobs, sampler, settings.tis_cap)

        # 4. Per-token rewards: R on the last token (minus the sequence KL, plus the shaping); KL in the reward with k1.
        sequence_rewards = batch.rewards.flatten().to(device)
        shaping, shaping_metrics = self.shaping(batch)
        if shaping is not None:
            sequence_rewards = sequence_rewards + shaping.to(device, sequence_rewards.dtype)
        sequence_kl = None
        if mitigations.sequence_kl_coef > 0:
            sequence_kl = sequence_log_ratio(old_logprobs, ref_logprobs, mask)
            sequence_rewards = sequence_rewards - mitigations.sequence_kl_coef * sequence_kl
        token_rewards = _last_token_rewards(sequence_rewards, mask)
        if ref_logprobs is not None and settings.kl_estimator == "k1":
            token_rewards = token_rewards - settings.beta * kl_k1(old_logprobs, ref_logprobs) * mask

        # 5. GAE and advantage normalisation.
        advantages, returns = gae(token_rewards, old_values, mask, ppo.gamma, ppo.lam)
        advantages = _whiten(advantages, mask, shard)

        # 6. epochs x minibatches of clipped updates. The minibatches split the whole step's batch (every rank's
        # sequences, numbered in rank order); this rank trains on its own rows of each.
        order_generator = torch.Generator().manual_seed(step_seed(run.seed, step, "minibatches"))
        cov_generator = torch.Generator(device=device).manual_seed(step_seed(run.seed, step, "clip_cov"))
        first_row = shard.rank * num_sequences
        updates = []
        for _ in range(ppo.epochs):
            for rows in torch.randperm(num_sequences * shard.world_size, generator=order_generator).chunk(ppo.minibatches):
                rows = rows[(rows >= first_row) & (rows < first_row + num_sequences)] - first_row
                if len(rows) == 0:
                    updates.append(self._update_without_rows(step, mask))
                    continue
                minibatch = pack_rows([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows],
                                      run.tokenizer.pad_token_id, completion_width=mask.shape[1]).to(device)
                rows = rows.to(device)
                m = mask[rows]
                weight = shard.weights(m).tokens  # this rank's share of the minibatch's tokens (1.0 in one process)
                new = policy_forward(model, minibatch, temperature, hidden=True, router_loss=self.aux_coef > 0,
                                     shard=shard)
                logprobs, values = new.logprobs, self.value_head(new.hidden)

                # PPO clipped surrogate (per token), with the Cui et al. covariance mitigations and TIS.
                ratio = importance_ratio(logprobs, old_logprobs[rows], m)
                per_token, clip_fraction = clipped_policy_loss(ratio, advantages[rows], m, eps_low, eps_high)
                stats = {"clip_fraction": clip_fraction.item() * weight,
                         "approx_kl": masked_mean(kl_k3(old_logprobs[rows], logprobs.detach()), m).item() * weight}
                if mitigations.clip_cov:
                    keep = clip_cov_mask(logprobs, old_logprobs[rows], advantages[rows], m, clip_ratio=mitigations.cov_ratio,
                                         epsilon_low=settings.epsilon, epsilon_high=settings.clip_high,
                                         generator=cov_generator)
                    per_token = per_token * keep
                    stats["clip_cov_fraction"] = masked_mean(1 - keep, m).item()
                if mitigations.kl_cov:
                    penalty = kl_cov_penalty(logprobs, old_logprobs[rows], advantages[rows], m,
                                             kl_ratio=mitigations.cov_ratio, kl_coef=mitigations.kl_cov_coef)
                    per_token = per_token + penalty
                    stats["kl_cov_penalty"] = aggregate(penalty.detach(), m, "bnpo").item()
                if tis_weights is not None:
                    per_token = per_token * tis_weights[rows]
                    stats["tis_capped_fraction"] = (masked_mean((tis_weights[rows] >= settings.tis_cap).float(), m).item()
                                                    * weight)
                # Every term is a token mean over the minibatch: this rank's share of it (rl.distributed).
                policy_loss = aggregate(per_token, m, "bnpo") * weight
                value_loss = clipped_value_loss(values, old_values[rows], returns[rows], m, ppo.value_clip) * weight
                loss = policy_loss + ppo.value_coef * value_loss
                if mitigations.entropy_coef:
                    loss = loss - mitigations.entropy_coef * masked_mean(new.entropy, m) * weight
                if settings.beta > 0 and settings.kl_estimator == "k3":
                    loss = loss + settings.beta * masked_mean(kl_k3(logprobs, ref_logprobs[rows]), m) * weight
                if mitigations.prefix_kl_coef > 0:
                    prefix_kl = aggregate(kl_k3(logprobs, ref_logprobs[rows]) * prefix_mask(m, mitigations.prefix_kl_tokens),
                                          m, "bnpo") * weight
                    loss = loss + mitigations.prefix_kl_coef * prefix_kl
                    stats["prefix_kl"] = prefix_kl.item()
                if new.aux_loss is not None:
                    loss = loss + self.aux_coef * new.aux_loss
                    stats["aux_loss"] = new.aux_loss.item()
                if self.replay is not None:
                    replay_loss = self.replay.loss(model, step, len(updates))
                    loss = loss + mitigations.pretrain_replay_coef * replay_loss
                    stats["replay_loss"] = replay_loss.item()

                stats = shard.sum_values({**stats, "loss": loss.item(), "policy_loss": policy_loss.item(),
                                          "value_loss": value_loss.item()})  # every rank's shares: the minibatch's
                require_finite("loss", torch.tensor(stats["loss"]), step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                updates.append({**stats, "grad_norm": self._optimizer_step(step)})

        # Means over the step's updates; the rest describes the sampling model (before the updates).
        metrics = mean_metrics(updates) | shaping_metrics
        metrics["updates"] = len(updates)
        metrics["explained_variance"] = shard.explained_variance(old_values, returns, mask).item()
        metrics["entropy"] = shard.masked_mean(old.entropy, mask).item()
        if ref_logprobs is not None:
            metrics["kl_to_reference"] = shard.masked_mean(kl_k3(old_logprobs, ref_logprobs), mask).item()
        if sequence_kl is not None:
            metrics["sequence_kl"] = shard.mean(sequence_kl).item()
        metrics["sampler_kl"], metrics["sampler_ratio_max"] = shard.sampler_mismatch(old_logprobs, sampler, mask)
        return StepResult((old.raw_logprobs * mask).sum(-1), routing[0] if routing else None, metrics)

    def _optimizer_step(self, step: int) -> float:
        """Sum the gradients over the ranks, clip them and step; returns the policy's gradient norm (before the clip).
        Policy and value head are clipped separately, as two networks would be."""
        self.run.shard.sum_gradients([*self.policy_parameters, *self.value_head.parameters()])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy_parameters, MAX_GRAD_NORM)
        value_grad_norm = torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), MAX_GRAD_NORM)
        require_finite("gradient norm", torch.stack([grad_norm, value_grad_norm]), step)
        self.optimizer.step()
        return grad_norm.item()

    def _update_without_rows(self, step: int, mask: torch.Tensor) -> dict:
        """A minibatch none of whose rows this rank holds (data parallelism only): the rank adds zero to every sum
        the other ranks make (token counts, router counts, statistics, gradients) and takes the same optimiser
        step. Returns the minibatch's statistics (the other ranks' sums)."""
        settings, shard = self.run.settings, self.run.shard
        shard.weights(mask[:0])
        if self.aux_coef > 0:
            config = self.run.model.config
            shard.load_balancing_loss(None, config.num_experts, config.num_experts_per_tok, None)
        keys = ["clip_fraction", "approx_kl", "loss", "policy_loss", "value_loss"]
        keys += ["tis_capped_fraction"] * (settings.tis_cap is not None)
        keys += ["prefix_kl"] * (settings.mitigations.prefix_kl_coef > 0) + ["aux_loss"] * (self.aux_coef > 0)
        stats = shard.sum_values(dict.fromkeys(keys, 0.0))
        require_finite("loss", torch.tensor(stats["loss"]), step)
        self.optimizer.zero_grad(set_to_none=True)
        return {**stats, "grad_norm": self._optimizer_step(step)}

    def measure(self, step: int, batch: StepBatch) -> StepResult:
        return measure_rollouts(self.run.model, self.run.tokenizer, batch, self.run.settings.sampling.temperature or 1.0,
                                self.reference, self.run.shard)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "value_head": self.value_head.state_dict(),
                **self.shaping.state_dict()}

    def close(self) -> None:
        self._exit.close()
