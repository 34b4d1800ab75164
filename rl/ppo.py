"""Proximal Policy Optimization on completions with a value head and GAE, in one file (CleanRL style).

Our own implementation: TRL removed its PPOTrainer in 1.13. The math lives in `rl.losses`; this file
is the loop around it. One step (= one batch of rollouts, then `ppo.epochs` x `ppo.minibatches`
optimiser updates):

 1. rollouts     prompts = prompt_set.batch(step); sample `samples_per_prompt` completions each from
                 the engine (seed = sampling_seed(seed, step)), grade them, reward them (rl.rollouts.collect).
 2. pi_old       one teacher-forced forward of the policy without gradient: per-token log-probs
                 log pi_old(y_t), values V_old(s_t), and the routed-token counts of each completion
                 (rl.routing.capture_routing; the recorder's expert_load).
 3. reference    with beta > 0, the same forward of the frozen base model (ref_model): log pi_ref(y_t).
 4. rewards      r_t = R(x, y) on the last completion token, 0 elsewhere; with kl_estimator "k1"
                 minus beta * k1_t on every token ("KL in the reward": Ziegler et al. 2019,
                 arXiv:1909.08593; Ouyang et al. 2022, arXiv:2203.02155, eq. 2).
 5. advantages   GAE(gamma, lam) (Schulman et al. 2016, arXiv:1506.02438), then normalised over the
                 batch's tokens (CleanRL's `norm_adv`, TRL's `masked_whiten`).
 6. updates      per minibatch, minimise
                     L = L_clip(eps_low, eps_high)               PPO, Schulman et al. 2017 (arXiv:1707.06347)
                       + value_coef * L_value(clip)               clipped value loss (OpenAI baselines PPO2)
                       - entropy_coef * H                         entropy bonus (Mnih et al. 2016, arXiv:1602.01783)
                       + beta * k3                                with kl_estimator "k3" (GRPO, arXiv:2402.03300, eq. 4)
                       + aux_coef * L_aux                         router load balancing (Switch, arXiv:2101.03961)
                       + pretrain_replay_coef * NLL_pretrain      pretraining replay (PPO-ptx, rl.replay)
                 with Clip-Cov / KL-Cov (Cui et al. 2025, arXiv:2505.22617) acting on L_clip's tokens
                 when switched on; gradient norms clipped to MAX_GRAD_NORM (policy and value head apart).
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
- Step s's rollouts come from the model after s updates; the checkpoint "step s" holds the model
  after s updates with the optimiser, value head and RNG state, so resuming at s redoes nothing twice.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from rl.config import RLSettings
from rl.engines import RolloutEngine
from rl.losses import (
    aggregate,
    clip_cov_mask,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_cov_penalty,
    kl_k1,
    kl_k3,
    masked_mean,
    token_entropy,
)
from rl.recorder import Recorder
from rl.replay import PretrainReplay, active_replay
from rl.rollouts import PromptSet, Rewards, collect, pack_batch, record_step, sampling_seed, step_seed
from rl.routing import capture_routing
from rl.sequences import token_logprobs
from rl.training import (
    MAX_GRAD_NORM,
    aux_loss_coefficient,
    check_mitigations,
    frozen_router,
    kl_reference,
    require_finite,
    restore_rng_state,
    rng_state,
    start_or_resume,
)

# Means over a step's updates; loss is the minimised total; grad_norm is the policy's before clipping;
# aux_loss is the unweighted load-balancing loss, replay_loss the unweighted pretraining-replay NLL
# (each null when not computed).
UPDATE_METRICS = ("loss", "policy_loss", "value_loss", "approx_kl", "clip_fraction", "entropy", "grad_norm", "aux_loss",
                  "replay_loss")
ADVANTAGE_EPSILON = 1e-8


class ValueHead(torch.nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state h_t (detached), zero-initialised."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.detach()).squeeze(-1)


PPO_MITIGATIONS = {"entropy_coef", "clip_cov", "kl_cov", "format_diversity_coef", "freeze_router", "pretrain_replay_coef"}


def _forward(model, input_ids, attention_mask, temperature: float, value_head=None, router_logits: bool = False):
    """Teacher-forced forward: (log-probs (B, L-1), logits (B, L-1, V) / temperature, values (B, L-1) or None,
    aux loss or None). Entry t-1 belongs to token t: the logits at t-1 predict it, and V is the value of
    the state before it (the hidden state at t-1)."""
    extra = {"output_router_logits": True} if router_logits else {}
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=value_head is not None,
                   use_cache=False, **extra)
    logits = output.logits.float() / temperature
    logprobs = token_logprobs(logits, input_ids)
    values = value_head(output.hidden_states[-1][:, :-1].float()) if value_head is not None else None
    return logprobs, logits[:, :-1], values, (output.aux_loss if router_logits else None)


@torch.no_grad()
def _rollout_statistics(model, value_head, input_ids, attention_mask, completion_mask, temperature, chunk):
    """Step 2: log pi_old, V_old and the routed-token counts per completion, in chunks of `chunk` rows."""
    logprobs, values = [], []
    with capture_routing(model, completion_mask) as routing:
        for rows in torch.arange(input_ids.size(0)).split(chunk):
            lp, _, v, _ = _forward(model, input_ids[rows], attention_mask[rows], temperature, value_head)
            logprobs.append(lp)
            values.append(v)
    expert_load = routing[0] if routing else None
    return torch.cat(logprobs), torch.cat(values), expert_load


@torch.no_grad()
def _reference_logprobs(reference, input_ids, attention_mask, temperature, chunk):
    return torch.cat([_forward(reference, input_ids[rows], attention_mask[rows], temperature)[0]
                      for rows in torch.arange(input_ids.size(0)).split(chunk)])


def _last_token_rewards(sequence_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_t = R(x, y) at the last completion token of each row, 0 elsewhere (rows without tokens get nothing)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    has_tokens = last >= 0
    rewards[has_tokens, last[has_tokens]] = sequence_rewards[has_tokens].float()
    return rewards


def _whiten(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A <- (A - mean A) / (std A + 1e-8) over the batch's completion tokens (population std); 0 off the mask."""
    mean = masked_mean(advantages, mask)
    std = masked_mean((advantages - mean) ** 2, mask).sqrt()
    return ((advantages - mean) / (std + ADVANTAGE_EPSILON)) * mask


def ppo_trainer_state(step: int, optimizer, value_head) -> dict:
    return {"algorithm": "ppo", "step": step, "optimizer": optimizer.state_dict(),
            "value_head": value_head.state_dict(), "rng": rng_state()}


def train_ppo(
    model,
    tokenizer,
    engine: RolloutEngine,
    prompt_set: PromptSet,
    rewards: Rewards,
    settings: RLSettings,
    recorder: Recorder,
    seed: int,
    start_step: int = 0,
    progress: bool = True,
    *,
    ref_model=None,
    trainer_state: dict | None = None,
    replay: PretrainReplay | None = None,
):
    """Post-train `model` with PPO for steps start_step .. settings.steps - 1; returns the model (trained
    in place). Every step writes rollouts/step_*.parquet and a metrics.jsonl line;
    checkpoints (model after s updates; optimiser, value head and RNG state in trainer_state.pt) every
    `checkpoint_every` steps and after the last. The caller owns `engine` (and closes it).

    Resuming (as rl.grpo.train_grpo): pass the model loaded from the checkpoint of `start_step`; anything
    recorded at `start_step` or later is forgotten and the trainer state is read from that checkpoint
    unless `trainer_state` is given. With beta > 0 the KL reference is `ref_model` (used as is, frozen),
    defaulting to a frozen copy of `model` at a fresh start; a resumed run must pass the base model.
    With mitigations.pretrain_replay_coef > 0, `replay` holds the pretraining texts (rl.replay).
    """
    check_mitigations(settings, PPO_MITIGATIONS, "PPO")
    replay = active_replay(settings.mitigations.pretrain_replay_coef, replay)
    reference = kl_reference(model, ref_model, settings, start_step, "PPO")
    trainer_state = start_or_resume("ppo", settings, recorder, start_step, trainer_state)
    if start_step == settings.steps:
        return model

    device = next(model.parameters()).device
    with frozen_router(model, settings.mitigations.freeze_router):
        _ppo_steps(model, tokenizer, engine, prompt_set, rewards, settings, recorder, seed, start_step, progress,
                   trainer_state, reference, replay, device)
    return model


def _ppo_steps(model, tokenizer, engine, prompt_set, rewards, settings, recorder, seed, start_step, progress,
               trainer_state, reference, replay, device):
    ppo, mitigations = settings.ppo, settings.mitigations
    policy_parameters = [p for p in model.parameters() if p.requires_grad]
    value_head = ValueHead(model.config.hidden_size).to(device)
    optimizer = torch.optim.AdamW([{"params": policy_parameters}, {"params": list(value_head.parameters())}],
                                  lr=settings.learning_rate, weight_decay=0.0)
    if trainer_state is not None:
        value_head.load_state_dict(trainer_state["value_head"])
        optimizer.load_state_dict(trainer_state["optimizer"])
        restore_rng_state(trainer_state["rng"])

    aux_coef = aux_loss_coefficient(model, settings)
    temperature = settings.sampling.temperature or 1.0
    # KL-Cov replaces the clipped surrogate by the unclipped one (the authors' code, see rl.losses.kl_cov_penalty).
    eps_low, eps_high = (float("inf"), float("inf")) if mitigations.kl_cov else (settings.epsilon, settings.clip_high)
    num_sequences = settings.prompts_per_step * settings.sampling.samples_per_prompt
    chunk = -(-num_sequences // ppo.minibatches)

    bar = tqdm(range(start_step, settings.steps), desc="ppo", disable=not progress, initial=start_step,
               total=settings.steps)
    for step in bar:
        started = time.perf_counter()
        epoch = prompt_set.epoch(step)

        # 1. Rollouts from the current policy.
        batch = collect(engine, prompt_set.prompter, prompt_set.batch(step), settings, rewards, sampling_seed(seed, step))
        require_finite("reward", batch.rewards, step)
        rollout_s = time.perf_counter() - started
        rollout_tokens = sum(len(c.token_ids) for c in batch.flat_completions)

        # 2-3. pi_old, V_old, routing; pi_ref.
        model.train()
        input_ids, attention_mask, completion_mask = (t.to(device) for t in pack_batch(batch, tokenizer))
        mask = completion_mask[:, 1:]  # aligned with token_logprobs: entry t-1 is token t
        old_logprobs, old_values, expert_load = _rollout_statistics(
            model, value_head, input_ids, attention_mask, completion_mask, temperature, chunk)
        ref_logprobs = None
        if reference is not None:
            ref_logprobs = _reference_logprobs(reference, input_ids, attention_mask, temperature, chunk)

        # 4. Per-token rewards: R on the last token; KL in the reward with k1.
        token_rewards = _last_token_rewards(batch.rewards.flatten().to(device), mask)
        if reference is not None and settings.kl_estimator == "k1":
            token_rewards = token_rewards - settings.beta * kl_k1(old_logprobs, ref_logprobs) * mask

        # 5. GAE and advantage normalisation.
        advantages, returns = gae(token_rewards, old_values, mask, ppo.gamma, ppo.lam)
        advantages = _whiten(advantages, mask)

        # 6. epochs x minibatches of clipped updates.
        order_generator = torch.Generator().manual_seed(step_seed(seed, step, "minibatches"))
        cov_generator = torch.Generator(device=device).manual_seed(step_seed(seed, step, "clip_cov"))
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(ppo.epochs):
            for rows in torch.randperm(num_sequences, generator=order_generator).chunk(ppo.minibatches):
                rows = rows.to(device)
                m = mask[rows]
                logprobs, logits, values, aux_loss = _forward(
                    model, input_ids[rows], attention_mask[rows], temperature, value_head, router_logits=aux_coef > 0)

                # PPO clipped surrogate (per token), with the Cui et al. covariance mitigations.
                per_token, clip_fraction, approx_kl = clipped_policy_loss(
                    logprobs, old_logprobs[rows], advantages[rows], m, eps_low, eps_high)
                if mitigations.clip_cov:
                    per_token = per_token * clip_cov_mask(
                        logprobs, old_logprobs[rows], advantages[rows], m, clip_ratio=mitigations.cov_ratio,
                        epsilon_low=settings.epsilon, epsilon_high=settings.clip_high, generator=cov_generator)
                if mitigations.kl_cov:
                    per_token = per_token + kl_cov_penalty(
                        logprobs, old_logprobs[rows], advantages[rows], m, kl_ratio=mitigations.cov_ratio,
                        kl_coef=mitigations.kl_cov_coef)
                policy_loss = aggregate(per_token, m, "bnpo")
                value_loss = clipped_value_loss(values, old_values[rows], returns[rows], m, ppo.value_clip)
                entropy = masked_mean(token_entropy(logits), m)
                loss = policy_loss + ppo.value_coef * value_loss - mitigations.entropy_coef * entropy
                if reference is not None and settings.kl_estimator == "k3":
                    loss = loss + settings.beta * masked_mean(kl_k3(logprobs, ref_logprobs[rows]), m)
                if aux_loss is not None:
                    loss = loss + aux_coef * aux_loss
                replay_loss = replay.loss(model, step, updates) if replay is not None else None
                if replay_loss is not None:
                    loss = loss + mitigations.pretrain_replay_coef * replay_loss

                require_finite("loss", loss, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # Policy and value head are clipped separately, as two networks would be.
                grad_norm = torch.nn.utils.clip_grad_norm_(policy_parameters, MAX_GRAD_NORM)
                value_grad_norm = torch.nn.utils.clip_grad_norm_(value_head.parameters(), MAX_GRAD_NORM)
                require_finite("gradient norm", torch.stack([grad_norm, value_grad_norm]), step)
                optimizer.step()

                for key, value in zip(UPDATE_METRICS, (loss, policy_loss, value_loss, approx_kl, clip_fraction,
                                                       entropy, grad_norm, aux_loss, replay_loss)):
                    if value is not None:  # aux_loss: MoE with a coefficient > 0 only; replay_loss: with replay
                        sums[key] = sums.get(key, 0.0) + float(value.detach())
                updates += 1

        # 7. The engine serves the updated weights from now on.
        engine.sync_weights(model)

        # 8. Record. Loss statistics are means over the step's updates.
        metrics = {key: sums[key] / updates if key in sums else None for key in UPDATE_METRICS}
        metrics["explained_variance"] = float(explained_variance(old_values, returns, mask))
        metrics["kl_to_reference"] = (float(masked_mean(kl_k3(old_logprobs, ref_logprobs), mask))
                                      if ref_logprobs is not None else None)
        metrics["updates"] = updates
        metrics["rollout_tokens"] = rollout_tokens
        metrics["rollout_tokens_per_s"] = rollout_tokens / max(rollout_s, 1e-9)  # sampling and grading
        metrics["step_time_s"] = time.perf_counter() - started
        record_step(recorder, step, epoch, batch, expert_load, metrics)
        bar.set_postfix(reward=f"{batch.rewards.mean().item():.3f}")

        done = step + 1  # updates so far
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            recorder.save_checkpoint(done, model, tokenizer, ppo_trainer_state(done, optimizer, value_head))
    bar.close()
