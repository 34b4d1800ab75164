"""Expert Iteration, as run in the Echo Chamber paper (Zhao et al. 2025, arXiv:2504.07912).

Each round (one recorded step) does, with k = sampling.samples_per_prompt:

 1. sample     k completions per prompt of prompt_set.batch(step) from the current model
               (seed = sampling_seed(seed, step)), grade and reward them (rl.rollouts.collect);
 2. route      a teacher-forced forward of those completions under the model that sampled them,
               with rl.routing.capture_routing: the recorder's expert_load;
 3. filter     keep the correct completions (grade.correct), then deduplicate them by completion
               text per prompt, first sample kept (`select_for_sft`);
 4. fine-tune  start from the base model (expert_iteration.start_from = "base", the paper's choice)
               or from the latest model ("latest"), and minimise the negative log-likelihood of the kept completions given their prompts,
                   L_SFT = - sum_{i,t} log pi(y_it | x_i, y_i,<t) / sum_i |y_i|   (completion tokens only),
               plus aux_coef * L_aux (router load balancing) for an MoE, for expert_iteration.sft_epochs
               epochs in minibatches of SFT_BATCH_SIZE, with a fresh AdamW (constant lr, no decay);
 5. sync       engine.sync_weights(model), so the next round samples from the fine-tuned model;
 6. record     rollouts, rollouts and metrics; a checkpoint every `checkpoint_every` rounds and
               after the last.

A round with no correct sample fine-tunes on nothing: the model is the base model again ("base") or
unchanged ("latest"). The data of a round are that round's samples only; nothing accumulates.
Mitigations: only freeze_router (and format_diversity_coef, which changes the recorded reward but not
what is kept); the rest act on policy-gradient losses that EI does not have and are refused, and so is
pretrain_replay_coef (EI's update is already supervised).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from rl.config import RLSettings
from rl.engines import Completion, RolloutEngine
from rl.losses import masked_mean
from rl.recorder import Recorder
from rl.rollouts import PromptSet, Rewards, StepBatch, collect, pack_batch, record_step, sampling_seed, step_seed
from rl.routing import capture_routing
from rl.sequences import pack, token_logprobs
from rl.training import (
    MAX_GRAD_NORM,
    aux_loss_coefficient,
    check_mitigations,
    frozen_router,
    require_finite,
    restore_rng_state,
    rng_state,
    start_or_resume,
)
from specialists.errors import UserError

SFT_BATCH_SIZE = 16
EI_MITIGATIONS = {"freeze_router", "format_diversity_coef"}


def select_for_sft(batch: StepBatch) -> tuple[int, list[tuple[str, Completion]]]:
    """(number of correct samples, the correct (prompt text, completion) pairs deduplicated by completion text
    per prompt).

    Order is kept (prompt by prompt, sample by sample) and the first of equal texts survives.
    Two prompts with the same id count as one prompt (a prompt set smaller than a step's batch).
    """
    correct, seen, unique = 0, set(), []
    for problem, prompt, group, grades in zip(batch.problems, batch.prompts, batch.completions, batch.grades):
        for completion, grade in zip(group, grades):
            if not grade.correct:
                continue
            correct += 1
            key = (problem.id, completion.text)
            if key not in seen:
                seen.add(key)
                unique.append((prompt, completion))
    return correct, unique


@torch.no_grad()
def expert_load_of(model, input_ids, attention_mask, completion_mask, chunk: int = 64) -> torch.Tensor | None:
    """Routed-token counts (completions, layers, experts) of each completion's tokens; None for a dense model."""
    with capture_routing(model, completion_mask) as routing:
        for rows in torch.arange(input_ids.size(0)).split(chunk):
            model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False)
    return routing[0] if routing else None


def supervised_finetune(model, tokenizer, samples: list[tuple[str, Completion]], settings: RLSettings,
                        seed: int, step: int) -> dict:
    """Step 4 of round `step`: fine-tune `model` in place on prompt + completion, loss on completion tokens
    only, minibatches drawn with `seed`. Returns {"sft_loss": mean batch loss (None without data),
    "sft_updates": optimiser steps}."""
    if not samples:
        return {"sft_loss": None, "sft_updates": 0}
    device = next(model.parameters()).device
    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in samples]  # as pack_batch
    input_ids, attention_mask, completion_mask = (
        t.to(device) for t in pack(prompt_ids, [list(c.token_ids) for _, c in samples], tokenizer.pad_token_id))
    aux_coef = aux_loss_coefficient(model, settings)
    extra = {"output_router_logits": True} if aux_coef > 0 else {}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(settings.expert_iteration.sft_epochs):
        for rows in torch.randperm(len(samples), generator=generator).split(SFT_BATCH_SIZE):
            rows = rows.to(device)
            output = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False, **extra)
            # Negative log-likelihood per completion token, mean over the minibatch's completion tokens.
            nll = -masked_mean(token_logprobs(output.logits, input_ids[rows]), completion_mask[rows, 1:])
            loss = nll + aux_coef * output.aux_loss if aux_coef > 0 else nll
            require_finite("loss", loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
            require_finite("gradient norm", grad_norm, step)
            optimizer.step()
            losses.append(float(nll.detach()))
    return {"sft_loss": sum(losses) / len(losses), "sft_updates": len(losses)}


def train_expert_iteration(
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
):
    """Run EI rounds start_step .. settings.steps - 1 on `model`; returns the model (changed in place).
    Every round writes rollouts/step_*.parquet and a metrics.jsonl line; checkpoints
    (model after s rounds, RNG state in trainer_state.pt) every `checkpoint_every` rounds and after the
    last. The caller owns `engine`.

    Resuming (as rl.grpo.train_grpo): pass the model loaded from the checkpoint of `start_step`; anything
    recorded at `start_step` or later is forgotten. With start_from "base", `ref_model` is the base model
    every round fine-tunes from (its weights are copied), defaulting to `model` at a fresh start; a
    resumed run must pass it.
    """
    check_mitigations(settings, EI_MITIGATIONS, "Expert Iteration")
    if settings.beta > 0:
        raise UserError("Expert Iteration has no KL term: set beta = 0")
    from_base = settings.expert_iteration.start_from == "base"
    if from_base and start_step > 0 and ref_model is None:
        raise ValueError("resuming Expert Iteration with start_from 'base' needs ref_model (the base model)")
    trainer_state = start_or_resume("ei", settings, recorder, start_step, trainer_state)
    if start_step == settings.steps:
        return model
    if trainer_state is not None:
        restore_rng_state(trainer_state["rng"])
    base_weights = None
    if from_base:
        source = ref_model if ref_model is not None else model
        base_weights = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
    with frozen_router(model, settings.mitigations.freeze_router):
        _rounds(model, tokenizer, engine, prompt_set, rewards, settings, recorder, seed, start_step, progress,
                base_weights)
    return model


def _rounds(model, tokenizer, engine, prompt_set, rewards, settings, recorder, seed, start_step, progress,
            base_weights):
    device = next(model.parameters()).device

    bar = tqdm(range(start_step, settings.steps), desc="expert iteration", disable=not progress,
               initial=start_step, total=settings.steps)
    for step in bar:
        started = time.perf_counter()
        epoch = prompt_set.epoch(step)

        # 1-2. Sample, grade; routing under the model that sampled.
        batch = collect(engine, prompt_set.prompter, prompt_set.batch(step), settings, rewards, sampling_seed(seed, step))
        require_finite("reward", batch.rewards, step)
        rollout_s = time.perf_counter() - started
        rollout_tokens = sum(len(c.token_ids) for c in batch.flat_completions)
        input_ids, attention_mask, completion_mask = (t.to(device) for t in pack_batch(batch, tokenizer))
        expert_load = expert_load_of(model, input_ids, attention_mask, completion_mask)

        # 3. Keep the correct samples, deduplicated per prompt.
        kept, samples = select_for_sft(batch)

        # 4. Fine-tune from the base (reset in place, so the engine's handle stays valid) or the latest model.
        if base_weights is not None:
            model.load_state_dict(base_weights)
        sft = supervised_finetune(model, tokenizer, samples, settings, step_seed(seed, step, "sft"), step)

        # 5. The engine serves the fine-tuned weights from now on.
        engine.sync_weights(model)

        # 6. Record.
        metrics = {"sampled": len(batch.flat_completions), "kept": kept, "kept_unique": len(samples), **sft,
                   "rollout_tokens": rollout_tokens, "rollout_tokens_per_s": rollout_tokens / max(rollout_s, 1e-9),
                   "step_time_s": time.perf_counter() - started}
        record_step(recorder, step, epoch, batch, expert_load, metrics)
        bar.set_postfix(kept=len(samples))

        done = step + 1
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            recorder.save_checkpoint(done, model, tokenizer, {"algorithm": "ei", "step": done, "rng": rng_state()})
    bar.close()
