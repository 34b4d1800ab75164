"""The training driver: one loop for PPO, GRPO and Expert Iteration.

`train(run, observers)` runs the recipe of `run.settings.algorithm` (rl.recipe: setup, step, measure,
state_dict, close) over steps run.start_step .. N = settings.steps:

    for step s:
      0. evaluate    when rl.evaluation is on and s % every == 0 or s = N: the model of step s samples the held-out
                     problems (run.heldout, never RL prompts) with the same engine, seed
                     step_seed(seed, s, "heldout"), graded and rewarded as RL's rollouts are; recorded to
                     heldout/step_s.parquet (not scored: logprob null), then each observer's on_heldout(s, rows)
                     if it has one (rl.recipe.HeldoutObserver). Before step 1, whose seeded sampling resets what
                     the engine draws from, so the RL steps are the same with evaluation on or off
      1. sample      batch = collect(engine, prompt_set.prompter, prompt_set.batch(s), ...,
                     seed = step_seed(seed, s, "sampling")): samples_per_prompt completions of each prompt (its
                     text from the Prompter), graded and rewarded; with grpo.dynamic_sampling (s < N) groups
                     without reward spread are replaced (rl.rollouts.dynamic_sampling); rewards must be finite
      2. update      result = recipe.step(s, batch): the algorithm's updates with them; at s = N (after the last
                     update) recipe.measure(s, batch) instead: the final model is sampled and measured, not updated
      3. sync        engine.sync_weights(model) after an update: step s + 1 samples the updated model
      4. record      rollouts/step_s.parquet and one metrics.jsonl line (the vocabulary of
                     specialists.run_directory.METRICS), then each observer's on_step(s, rollouts, metrics)
      5. checkpoint  after the update of step s, when (s + 1) % checkpoint_every == 0 or s + 1 == N: the model
                     after s + 1 updates, with the recipe's state (optimiser, value head) and the RNG states

So steps 0..N cover every model the run produced, and checkpoint N holds the model of step N.

Resume: `run.model` is loaded from the checkpoint of `run.start_step` (0: the base model); the driver forgets
what was recorded at start_step or later (rollouts, held-out evaluations, metrics lines; a killed run may
have left some), reads that checkpoint's
trainer_state.pt, restores the RNG states and hands the state to `recipe.setup`. A run killed after
checkpoint N but before step N's records resumes at N and only records the final model.

Data parallelism (`run.shard`, rl.distributed): each rank samples its contiguous share of `prompt_set.batch(s)`
with the prompts' global indices (whole prompt groups, so advantages stay per group) and runs the recipe on it (the
recipes make their sums and gradients global); rank 0 gathers the shares, then alone records, checkpoints, calls the
observers and runs the held-out evaluation (its engine holds the same weights as every rank's). One process is
rank 0 of one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from rl.config import RLSettings, SamplingSettings
from rl.expert_iteration import ExpertIteration
from rl.grpo import GRPO
from rl.losses import zero_std_fraction
from rl.ppo import PPO
from rl.recipe import HeldoutObserver, Recipe, Run, StepObserver, StepResult, require_finite
from rl.rollouts import StepBatch, collect, concatenate, dynamic_sampling, to_rollouts
from rl.seeds import step_seed
from specialists.errors import UserError
from specialists.run_directory import ALGORITHM_METRICS, METRICS

RECIPES: dict[str, type] = {"grpo": GRPO, "ppo": PPO, "ei": ExpertIteration}


def train(run: Run, observers: Sequence[StepObserver] = ()):
    """Run (or resume) `run` to the end: the update steps start_step .. N - 1 and the final model's step N.
    Returns the trained model (`run.model`, changed in place). The caller owns the engine."""
    settings, shard = run.settings, run.shard
    if not 0 <= run.start_step <= settings.steps:
        raise ValueError(f"start_step must be in [0, {settings.steps}], got {run.start_step}")
    state = _resume_state(run)
    if shard.leads:
        run.recorder.forget_from(run.start_step)
    if state is not None:
        restore_rng_state(state["rng"])
    if settings.evaluation.every > 0 and not run.heldout:
        raise ValueError("rl.evaluation is on (every > 0) but the run has no held-out problems (Run.heldout)")
    recipe: Recipe = RECIPES[settings.algorithm](run)
    bar = tqdm(total=settings.steps + 1, initial=run.start_step, desc=settings.algorithm,
               disable=not (run.progress and shard.leads))
    try:
        recipe.setup(state)
        for step in range(run.start_step, settings.steps + 1):
            # 0. Evaluate the current model on the held-out problems.
            if evaluates(settings, step) and shard.leads:
                evaluation = collect(run.engine, run.prompt_set.prompter, run.heldout, heldout_sampling(settings),
                                     run.rewards, step_seed(run.seed, step, "heldout"))
                heldout_rows = to_rollouts(step, run.prompt_set.epoch(step), evaluation, None, None)
                run.recorder.write_heldout(step, heldout_rows)
                for observer in observers:
                    if isinstance(observer, HeldoutObserver):
                        observer.on_heldout(step, heldout_rows)
            started = time.perf_counter()
            # 1. Sample the current model.
            update = step < settings.steps
            share = shard.part(settings.prompts_per_step)
            batch = collect(run.engine, run.prompt_set.prompter, run.prompt_set.batch(step)[share], settings.sampling,
                            run.rewards, step_seed(run.seed, step, "sampling"), first_index=share.start)
            if update and settings.grpo.dynamic_sampling:
                batch = dynamic_sampling(batch, run.engine, run.prompt_set, step, settings, run.rewards, run.seed)
            require_finite("reward", batch.rewards, step)

            # 2-3. Update with the rollouts and serve the new weights; the last step measures the final model.
            recipe_started = time.perf_counter()
            result = recipe.step(step, batch) if update else recipe.measure(step, batch)
            synced = time.perf_counter()
            if update:
                run.engine.sync_weights(run.model)
            timings = {"update_time_s": synced - recipe_started, "sync_time_s": time.perf_counter() - synced}

            # 4. Record (rank 0, with every rank's share).
            expert_load = None if result.expert_load is None else result.expert_load.cpu()
            shares = shard.gather(f"step{step}", (batch, result.logprobs.cpu(), expert_load))
            if not shard.leads:
                continue
            batch, result = _whole_step(shares, result)
            rows = to_rollouts(step, run.prompt_set.epoch(step), batch, result.logprobs, result.expert_load)
            run.recorder.write_rollouts(step, rows)
            line = metrics_line(settings.algorithm, run.prompt_set.epoch(step), update, batch, result,
                                {**timings, "step_time_s": time.perf_counter() - started})
            run.recorder.write_metrics(step, line)
            for observer in observers:
                observer.on_step(step, rows, {"step": step, **line})
            bar.update(1)
            bar.set_postfix(reward=f"{line['reward_mean']:.3f}")

            # 5. Checkpoint the model after step + 1 updates.
            done = step + 1
            if update and (done % settings.checkpoint_every == 0 or done == settings.steps):
                state = {"algorithm": settings.algorithm, "step": done, "rng": rng_state(), **recipe.state_dict()}
                run.recorder.save_checkpoint(done, run.model, run.tokenizer, state)
    finally:
        bar.close()
        recipe.close()
    return run.model


def _whole_step(shares: list[tuple], result: StepResult) -> tuple[StepBatch, StepResult]:
    """The step's whole batch and result from the ranks' (batch, logprobs, expert_load) shares, in rank order; the
    metrics are already every rank's (the recipes reduce them)."""
    if len(shares) == 1:
        return shares[0][0], result
    batches, logprobs, loads = zip(*shares)
    return concatenate(list(batches)), StepResult(
        torch.cat(logprobs), None if loads[0] is None else torch.cat(loads), result.metrics)


def evaluates(settings: RLSettings, step: int) -> bool:
    """Whether the model of `step` is evaluated on the held-out problems: every `evaluation.every`-th step (step 0
    first) and the final model's step; never when evaluation.every is 0."""
    every = settings.evaluation.every
    return every > 0 and (step % every == 0 or step == settings.steps)


def heldout_sampling(settings: RLSettings) -> SamplingSettings:
    """The held-out evaluation's sampling: rl.evaluation's temperature and samples, rl.sampling's top_p and length."""
    evaluation = settings.evaluation
    return settings.sampling.model_copy(update={"temperature": evaluation.temperature,
                                                "samples_per_prompt": evaluation.samples_per_problem})


def metrics_line(algorithm: str, epoch: float, update: bool, batch: StepBatch, result: StepResult,
                 timings: dict) -> dict:
    """One metrics.jsonl line (without `step`, which the recorder adds): every key of the vocabulary and of the
    algorithm's own (specialists.run_directory.METRICS, ALGORITHM_METRICS; null where it does not apply), filled
    from the recipe's result, the step's reward statistics and timings. NaN and infinities (e.g. explained
    variance of constant returns) become null, so the file stays strict JSON."""
    rewards = batch.rewards.double()
    completions = batch.flat_completions
    tokens = sum(len(c.token_ids) for c in completions)
    line = dict.fromkeys(METRICS | ALGORITHM_METRICS[algorithm])
    del line["step"]
    line.update(result.metrics)
    line.update(
        epoch=epoch, update=update,
        reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
        accuracy=sum(g.correct for g in batch.flat_grades) / max(len(completions), 1),
        frac_reward_zero_std=zero_std_fraction(rewards),
        truncated_fraction=sum(not c.finished for c in completions) / max(len(completions), 1),
        rollout_tokens=tokens, sample_time_s=batch.sample_time_s, score_time_s=batch.score_time_s,
        sampling_rounds=batch.sampling_rounds,
        rollout_tokens_per_s=tokens / max(batch.sample_time_s, 1e-9), **timings)
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in line.items()}


def _resume_state(run: Run) -> dict | None:
    """The trainer state of the checkpoint a resumed run starts from (None at step 0)."""
    if run.start_step == 0:
        return None
    path = run.recorder.checkpoint_dir(run.start_step) / "trainer_state.pt"
    if not path.exists():
        raise UserError(f"cannot resume at step {run.start_step}: {path} is missing")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("algorithm") != run.settings.algorithm or state.get("step") != run.start_step:
        raise UserError(f"trainer state of {state.get('algorithm')!r} step {state.get('step')} "
                        f"cannot resume {run.settings.algorithm!r} at step {run.start_step}")
    return state


def rng_state() -> dict:
    """The global RNG states a checkpoint stores, so that a resumed run draws what the uninterrupted one did."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
