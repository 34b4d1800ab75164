"""GRPO and its variants (Dr. GRPO, DAPO, BNPO) on TRL's `GRPOTrainer`, with rollouts from our engines.

TRL does the optimisation: the clipped surrogate with clip-higher (`epsilon`, `epsilon_high`), the loss
aggregation of each `loss_type`, the k3 KL to the reference model (`beta`), the entropy bonus
(`entropy_coef`), the router load-balancing loss (`router_aux_loss_coef`) and `num_iterations` passes
over each batch. `EchoGRPOTrainer` subclasses it and changes only where the data comes from and what
is recorded:

- prompts: `PromptSetSampler` makes TRL's dataloader walk `rl.rollouts.PromptSet` (step g's batch is
  `prompt_set.batch(g)`, each prompt repeated `samples_per_prompt` times, as TRL's RepeatSampler lays
  them out), so epochs are counted exactly as for PPO;
- rollouts: TRL's `rollout_func` hook calls our `RolloutEngine` (vLLM or transformers), never TRL's own
  vLLM integration; `engine.sync_weights(model)` runs whenever the global step changed since the last
  generation, and once more when training ends;
- rewards: `rl.rollouts.Rewards` (correctness x `reward_scale`, plus the format-diversity bonus), with
  every completion's Grade kept for the recorder;
- advantages: `compute_advantages` replaces TRL's group-normalised advantages when a mitigation acts
  on them (unlikeliness reward, pass@k training); otherwise TRL's stand;
- per-token mitigations: Clip-Cov zeroes the advantage of the selected tokens (identical to masking
  their policy loss), KL-Cov adds its penalty to the loss; both read the log-probabilities of TRL's own
  loss forward (see `_get_per_token_logps_and_entropies`);
- pretraining replay: `replay_loss` adds pretrain_replay_coef x the NLL of a replay batch (rl.replay) to
  every optimiser step's loss;
- recording: the loss forward runs inside `rl.routing.capture_routing`, so each completion's expert
  load comes from the training forward; each optimiser step writes its rollouts
  and one metrics line (TRL's logged metrics plus ours), and checkpoints go through the Recorder.

Step numbering (SPEC.md): the rollouts of step s come from the model after s updates; step 0 is the
model before any update; the metrics line of step s describes the update made with them; the
checkpoint of step s holds the model after s updates. With `num_iterations = mu > 1`, rollouts are taken
at steps 0, mu, 2 mu, ... (TRL reuses each batch for mu optimiser steps) and every optimiser step still
writes its metrics line.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Sampler

from rl.config import RLSettings
from rl.engines import Completion, RolloutEngine
from rl.losses import (
    aggregate,
    clip_cov_mask,
    group_advantages,
    kl_cov_penalty,
    pass_at_k_advantages,
    unlikeliness_rewards,
)
from rl.recorder import Recorder
from rl.replay import PretrainReplay, active_replay
from rl.rollouts import PromptSet, Rewards, StepBatch, record_step, sampling_seed, step_seed
from rl.routing import capture_routing
from rl.training import (
    MAX_GRAD_NORM,
    check_mitigations,
    frozen,
    frozen_router,
    kl_reference,
    require_finite,
    restore_rng_state,
    rng_state,
    start_or_resume,
)
from specialists.grading import Grade
from specialists.model import is_moe

REWARD_NAME = "echolab_reward"  # TRL logs rewards/<name>/mean and /std
GRPO_MITIGATIONS = {"entropy_coef", "clip_cov", "kl_cov", "format_diversity_coef", "unlikeliness_beta", "pass_at_k",
                    "freeze_router", "pretrain_replay_coef"}
# TRL's own reward summary; the metrics line carries the shared reward_mean / reward_std (rl.rollouts.record_step).
_DROPPED_TRL_KEYS = {"reward", "reward_std", "epoch", "num_input_tokens_seen"}


# ---------------------------------------------------------------------------------------------
# Data: the prompt set as a dataset, walked in PromptSet order
# ---------------------------------------------------------------------------------------------


def prompt_dataset(prompt_set: PromptSet):
    """A `datasets.Dataset` with one row per problem: prompt, prompt_id, answer (TRL passes the columns to
    reward functions as keyword arguments) and problem_index (position in `prompt_set.problems`)."""
    from datasets import Dataset

    problems = prompt_set.problems
    return Dataset.from_dict({
        "prompt": [prompt_set.prompter.text(p) for p in problems],
        "prompt_id": [str(p.id) for p in problems],
        "answer": [float(p.answer) for p in problems],
        "problem_index": list(range(len(problems))),
    })


class PromptSetSampler(Sampler[int]):
    """Dataset indices in the order TRL's RepeatSampler would give them, but drawn from `PromptSet`.

    Generation g uses `prompt_set.batch(g)`; each of its prompts appears `samples` times in a row (one
    per completion), and the whole batch `iterations` times (TRL fetches a batch every optimiser step
    and reuses the rollouts of generation g for `num_iterations` steps). One dataloader batch of
    `prompts_per_step * samples` indices = one optimiser step.
    """

    def __init__(self, prompt_set: PromptSet, first_generation: int, generations: int, samples: int, iterations: int):
        self.prompt_set, self.first_generation, self.generations = prompt_set, first_generation, generations
        self.samples, self.iterations = samples, iterations
        self._position = {id(problem): index for index, problem in enumerate(prompt_set.problems)}

    def indices(self, generation: int) -> list[int]:
        return [self._position[id(problem)] for problem in self.prompt_set.batch(generation)]

    def __iter__(self):
        for generation in range(self.first_generation, self.first_generation + self.generations):
            batch = self.indices(generation)
            for _ in range(self.iterations):
                for index in batch:
                    yield from [index] * self.samples

    def __len__(self) -> int:
        return self.generations * self.iterations * self.prompt_set.prompts_per_step * self.samples


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def grpo_config(settings: RLSettings, seed: int, output_dir: str | Path, *, max_steps: int | None = None,
                moe: bool = True, progress: bool = False, **overrides):
    """TRL's GRPOConfig for these settings, on CPU (use_cpu, no bf16, no gradient checkpointing).

    One optimiser step per generation batch: per_device_train_batch_size = prompts_per_step x
    samples_per_prompt, gradient_accumulation_steps = steps_per_generation = 1. `router_aux_loss_coef`
    is passed only for MoE models (None: the model's own); a dense model has no router loss.
    """
    trl, _ = _import_trl()
    sampling, grpo = settings.sampling, settings.grpo
    if sampling.temperature <= 0:
        raise ValueError("GRPO needs sampled rollouts: sampling.temperature must be > 0")
    if sampling.samples_per_prompt < 2:
        raise ValueError("GRPO needs sampling.samples_per_prompt >= 2 (group-relative advantages)")
    arguments = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=seed,
        data_seed=seed,
        max_steps=settings.steps if max_steps is None else max_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        per_device_train_batch_size=settings.prompts_per_step * sampling.samples_per_prompt,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=sampling.samples_per_prompt,
        num_iterations=grpo.num_iterations,
        max_completion_length=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        beta=settings.beta,
        epsilon=settings.epsilon,
        epsilon_high=settings.clip_high,
        entropy_coef=settings.mitigations.entropy_coef,
        router_aux_loss_coef=settings.router_aux_loss_coef if moe else None,
        use_vllm=False,
        log_completions=False,
    )
    arguments.update(overrides)
    return trl.GRPOConfig(**arguments)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class _Generation:
    """What one generation (step) produced, filled in as TRL moves through it."""

    step: int
    generation: int
    problems: list
    prompts: list[str]
    completions: list[list[Completion]]
    generation_s: float
    grading_s: float = 0.0
    grades: list[Grade] = field(default_factory=list)
    rewards: torch.Tensor | None = None  # flat (prompts * samples,)
    expert_load: torch.Tensor | None = None  # (completions, layers, experts), flat completion order


def _import_trl():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRL currently supports vLLM versions.*")
        import trl
        from trl.trainer.utils import add_fused_lm_head
    return trl, add_fused_lm_head


def _make_trainer_class():
    trl, add_fused_lm_head = _import_trl()
    GRPOTrainer = trl.GRPOTrainer

    class EchoGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer fed by our engine, prompt set and rewards; records every step.

        Hooks a subclass may override:
        - `compute_advantages(rewards, correct, sequence_logprobs)`: advantages replacing TRL's, or None;
        - `per_token_advantages(logps, old_logps, advantages, mask)`: per-token reshaping (Clip-Cov);
        - `extra_loss(logps, old_logps, advantages, mask, inputs)`: a term added to TRL's loss (KL-Cov);
        - `replay_loss(model)`: a term added to the loss outside the policy forward (pretraining replay);
        - `record_step(step, logs)`: what is written after each optimiser step.
        """

        def __init__(self, model, tokenizer, engine: RolloutEngine, prompt_set: PromptSet, rewards: Rewards,
                     settings: RLSettings, seed: int, args, *, start_step: int = 0, recorder: Recorder | None = None,
                     ref_model=None, optimizers=(None, None), callbacks=None, progress: bool = False,
                     replay: PretrainReplay | None = None):
            mitigations = settings.mitigations
            mu = settings.grpo.num_iterations
            if mitigations.pass_at_k and (mitigations.unlikeliness_beta > 0 or mitigations.format_diversity_coef > 0):
                raise ValueError("mitigations.pass_at_k replaces the advantages by pass@k ones computed from "
                                 "correctness alone; it does not combine with unlikeliness_beta or format_diversity_coef")
            if mitigations.clip_cov and mitigations.kl_cov:
                raise ValueError("mitigations.clip_cov and mitigations.kl_cov are alternatives; switch on one")
            if mitigations.kl_cov and mu == 1:
                raise ValueError("mitigations.kl_cov needs grpo.num_iterations > 1: its penalty |log pi - log pi_old| "
                                 "has zero gradient on the first pass over a batch, so with one pass it does nothing")
            if start_step % mu:
                raise ValueError(f"start_step {start_step} must be a multiple of grpo.num_iterations ({mu}): "
                                 "rollouts are taken every num_iterations steps")
            self.engine, self.prompt_set, self.rewards = engine, prompt_set, rewards
            self.settings, self.seed, self.start_step = settings, seed, start_step
            self.recorder, self.progress = recorder, progress
            self.replay = active_replay(mitigations.pretrain_replay_coef, replay)
            self._generation: _Generation | None = None
            self._generations_done = 0
            self._synced_step: int | None = None
            self._capture_routing = False
            self._loss_inputs: dict | None = None
            self._step_started: float | None = None
            self._bar = None
            remaining = settings.steps - start_step
            self._sampler = PromptSetSampler(prompt_set, start_step // mu, math.ceil(remaining / mu),
                                             settings.sampling.samples_per_prompt, mu)
            beta = args.beta
            args.beta = 0.0  # TRL would reload the reference from model.config._name_or_path; we bring our own
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*rollout_func.*experimental.*")
                super().__init__(model=model, reward_funcs=[self._reward], args=args,
                                 train_dataset=prompt_dataset(prompt_set), processing_class=tokenizer,
                                 callbacks=callbacks, optimizers=optimizers, rollout_func=self._rollout)
            args.beta = self.beta = beta
            if beta != 0.0:
                if ref_model is None:
                    raise ValueError("beta > 0 needs the reference model")
                frozen(ref_model)
                add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
            if mitigations.kl_cov:
                # KL-Cov's loss is the unclipped surrogate plus the penalty (authors' code, verl `kl_cov`).
                self.epsilon_low = self.epsilon_high = math.inf
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            self.remove_callback(PrinterCallback)  # they print every log dict; we keep our own bar
            self.remove_callback(ProgressCallback)

        # ----- prompts ---------------------------------------------------------------------

        def _get_train_sampler(self, dataset=None) -> Sampler:
            return self._sampler

        # ----- rollouts --------------------------------------------------------------------

        def _rollout(self, prompts: list[str], trainer) -> dict:
            """TRL's rollout_func: one prompt per completion in, token ids out. Generates with our engine."""
            samples = self.settings.sampling.samples_per_prompt
            generation = self.start_step // self.settings.grpo.num_iterations + self._generations_done
            step = self.start_step + self.state.global_step
            problems = self.prompt_set.batch(generation)
            texts = [self.prompt_set.prompter.text(p) for p in problems]
            expected = [text for text in texts for _ in range(samples)]
            if list(prompts) != expected:
                raise RuntimeError("TRL's batch is not the PromptSet batch of generation "
                                   f"{generation}; got {len(prompts)} prompts")
            if self._synced_step != self.state.global_step:
                self.engine.sync_weights(self.accelerator.unwrap_model(self.model))
                self._synced_step = self.state.global_step
            started = time.perf_counter()
            groups = self.engine.generate(texts, self.settings.sampling,
                                          sampling_seed(self.seed, step))
            generation_s = time.perf_counter() - started
            if len(groups) != len(problems) or any(len(g) != samples for g in groups):
                raise RuntimeError(f"the engine returned {[len(g) for g in groups]} completions per prompt, "
                                   f"expected {samples} for each of {len(problems)} prompts")
            self._generation = _Generation(step, generation, problems, texts, groups, generation_s)
            self._generations_done += 1
            self._capture_routing = True
            prompt_ids = [self.processing_class(text, add_special_tokens=False)["input_ids"] for text in texts]
            flat = [c for group in groups for c in group]
            return {
                "prompt_ids": [ids for ids in prompt_ids for _ in range(samples)],
                "completion_ids": [list(c.token_ids) for c in flat],
                "logprobs": None,  # per-token sampling log-probs only serve TRL's vLLM importance correction
                "completion_text": [c.text for c in flat],
            }

        # ----- rewards and advantages ------------------------------------------------------

        def _reward(self, prompts, completions, completion_ids, completion_text, answer, **kwargs) -> list[float]:
            started = time.perf_counter()
            rewards, grades = self.rewards(list(completion_text), list(answer), self.settings.sampling.samples_per_prompt)
            require_finite("reward", rewards, self._generation.step)
            self._generation.grades, self._generation.rewards = grades, rewards
            self._generation.grading_s = time.perf_counter() - started
            return rewards.tolist()

        _reward.__name__ = REWARD_NAME

        def compute_advantages(self, rewards: torch.Tensor, correct: torch.Tensor,
                               sequence_logprobs: torch.Tensor) -> torch.Tensor | None:
            """Advantages replacing TRL's (flat completion order), or None to keep TRL's.

            - pass@k training (Chen et al. 2025, arXiv:2508.10751): analytical pass@k advantages from correctness;
            - unlikeliness reward (He et al. 2025, arXiv:2506.02355): the rewards of likely correct completions are
              lowered (ranked by mean per-token log-prob under the sampling policy), then group-normalised
              exactly as TRL does (`scale_rewards`).
            """
            mitigations, samples = self.settings.mitigations, self.num_generations
            if mitigations.pass_at_k:
                return pass_at_k_advantages(correct, samples, mitigations.pass_at_k)
            if mitigations.unlikeliness_beta > 0:
                shaped = unlikeliness_rewards(rewards, sequence_logprobs, correct, samples, mitigations.unlikeliness_beta)
                return group_advantages(shaped, samples, self.scale_rewards)
            return None

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            generation = self._generation
            flat = [c for group in generation.completions for c in group]
            correct = torch.tensor([g.correct for g in generation.grades])
            mean_logprob = torch.tensor([c.logprob / max(len(c.token_ids), 1) for c in flat])
            advantages = self.compute_advantages(generation.rewards, correct, mean_logprob)
            if advantages is not None:
                output["advantages"] = advantages.to(output["advantages"])
            # TRL shuffles the batch before the loss; this column tells each row's place in the generation
            output["echolab_row"] = torch.arange(len(flat))
            return output

        # ----- loss ------------------------------------------------------------------------

        def _compute_loss(self, model, inputs):
            inputs = dict(inputs)  # the hooks may replace entries; TRL reuses the buffered batch when mu > 1
            self._loss_inputs = inputs
            try:
                if self._capture_routing:
                    self._capture_routing = False
                    token_mask = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], dim=1)
                    with capture_routing(self.accelerator.unwrap_model(model), token_mask) as routed:
                        loss = super()._compute_loss(model, inputs)
                    if routed:
                        load = torch.empty_like(routed[0])
                        load[inputs["echolab_row"]] = routed[0]
                        self._generation.expert_load = load
                else:
                    loss = super()._compute_loss(model, inputs)
                extra = inputs.pop("echolab_extra_loss", None)
                loss = loss if extra is None else loss + extra
            finally:
                self._loss_inputs = None
            replay = self.replay_loss(model)  # its own forward, after the routing capture has ended
            loss = loss if replay is None else loss + replay
            require_finite("loss", loss, self.start_step + self.state.global_step)
            return loss

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
            inputs = self._loss_inputs
            if inputs is not None:  # the policy forward of TRL's loss; it reads inputs["advantages"] next
                mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
                old = inputs.get("old_per_token_logps")
                old = logps.detach() if old is None else old
                advantages = inputs["advantages"]
                advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
                reshaped = self.per_token_advantages(logps, old, advantages, mask)
                if reshaped is not None:
                    inputs["advantages"] = reshaped
                extra = self.extra_loss(logps, old, advantages, mask, inputs)
                if extra is not None:
                    inputs["echolab_extra_loss"] = extra
            return logps, entropies, aux_loss

        def per_token_advantages(self, logps, old_logps, advantages, mask) -> torch.Tensor | None:
            """Clip-Cov (Cui et al. 2025, arXiv:2505.22617): the selected tokens get advantage 0, which makes their
            clipped-surrogate loss -min(rho 0, clip(rho) 0) = 0, i.e. the authors' `loss * corr` with corr = 0."""
            mitigations = self.settings.mitigations
            if not mitigations.clip_cov:
                return None
            generator = torch.Generator(device=logps.device)
            generator.manual_seed(step_seed(self.seed, self.start_step + self.state.global_step, "clip_cov"))
            keep = clip_cov_mask(logps.detach(), old_logps, advantages, mask, clip_ratio=mitigations.cov_ratio,
                                 epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, generator=generator)
            self._metrics["train"]["clip_cov/fraction"].append(
                float(((1 - keep) * mask).sum() / mask.sum().clamp(min=1)))
            return advantages * keep

        def extra_loss(self, logps, old_logps, advantages, mask, inputs) -> torch.Tensor | None:
            """KL-Cov (Cui et al. 2025, arXiv:2505.22617): kl_cov_coef |log pi - log pi_old| on the top-covariance
            tokens, aggregated like TRL aggregates the policy loss of this loss_type."""
            mitigations = self.settings.mitigations
            if not mitigations.kl_cov:
                return None
            penalty = kl_cov_penalty(logps, old_logps, advantages, mask, kl_ratio=mitigations.cov_ratio,
                                     kl_coef=mitigations.kl_cov_coef)
            term = aggregate(penalty, mask, self.loss_type, max_completion_length=self.max_completion_length,
                             global_token_count=inputs["num_items_in_batch"])
            if self.loss_type != "dapo":
                term = term / self.current_gradient_accumulation_steps
            self._metrics["train"]["kl_cov/penalty"].append(float(term.detach()))
            return term

        def replay_loss(self, model) -> torch.Tensor | None:
            """Pretraining replay (PPO-ptx, Ouyang et al. 2022, arXiv:2203.02155; see rl.replay):
            pretrain_replay_coef x the mean token NLL of this optimiser step's replay batch. One loss call per
            optimiser step (gradient_accumulation_steps = 1), so the term is not divided further."""
            if self.replay is None:
                return None
            nll = self.replay.loss(model, self.start_step + self.state.global_step)
            self._metrics["train"]["replay_loss"].append(float(nll.detach()))
            return self.settings.mitigations.pretrain_replay_coef * nll

        # ----- recording -------------------------------------------------------------------

        def training_step(self, model, inputs, num_items_in_batch):
            if self._step_started is None:
                self._step_started = time.perf_counter()
            if self.progress and self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=self.settings.steps, initial=self.start_step, desc="grpo")
            return super().training_step(model, inputs, num_items_in_batch)

        def log(self, logs: dict, start_time: float | None = None) -> None:
            is_step = self.model.training and "loss" in logs and "train_runtime" not in logs
            super().log(logs, start_time)
            if is_step:
                self.record_step(self.start_step + self.state.global_step - 1, dict(logs))

        def record_step(self, step: int, logs: dict) -> None:
            """After the update made with the rollouts of `step`: write its rollouts (when
            they were taken at this step), its metrics line, and the checkpoint when due.

            The metrics line holds TRL's logged metrics of the update (loss, grad_norm, entropy, kl with beta > 0,
            clip_ratio/*, aux_loss, completions/*, rewards/echolab_reward/*, frac_reward_zero_std, step_time, ...)
            and ours: step_time_s, rollout_tokens, rollout_time_s (sampling + grading), rollout_tokens_per_s, and
            from rl.rollouts.record_step epoch, reward_mean, reward_std (population) and accuracy. Steps without
            rollouts (num_iterations > 1) carry TRL's metrics and step_time_s only.
            """
            metrics = {key: value for key, value in logs.items()
                       if key not in _DROPPED_TRL_KEYS and not key.startswith("train_")}
            generation = self._generation
            fresh = generation is not None and generation.step == step
            if fresh:
                tokens = sum(len(c.token_ids) for group in generation.completions for c in group)
                rollout_s = generation.generation_s + generation.grading_s
                metrics.update(rollout_tokens=tokens, rollout_time_s=rollout_s,
                               rollout_tokens_per_s=tokens / max(rollout_s, 1e-9))
            metrics["step_time_s"] = time.perf_counter() - (self._step_started or time.perf_counter())
            self._step_started = None
            metrics = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                       for key, value in metrics.items()}
            if self.recorder is not None:
                if fresh:
                    size = self.settings.sampling.samples_per_prompt
                    grades = generation.grades
                    batch = StepBatch(generation.problems, generation.prompts, generation.completions,
                                      [grades[i:i + size] for i in range(0, len(grades), size)],
                                      generation.rewards.view(len(generation.problems), size))
                    record_step(self.recorder, step, self.prompt_set.epoch(generation.generation), batch,
                                generation.expert_load, metrics)
                else:
                    self.recorder.write_metrics(step, metrics)
            self.last_metrics = metrics
            done = step + 1
            # A resumed run restarts at a generation, so intermediate checkpoints sit on multiples of num_iterations.
            checkpoint_due = (done % self.settings.checkpoint_every == 0 and done % self.settings.grpo.num_iterations == 0
                              or done == self.settings.steps)
            if self.recorder is not None and checkpoint_due:
                self.recorder.save_checkpoint(done, self.accelerator.unwrap_model(self.model), self.processing_class,
                                              self.trainer_state(done))
            if self._bar is not None:
                self._bar.update(1)
                if fresh:
                    self._bar.set_postfix(reward=f"{generation.rewards.mean().item():.3f}")
                if done == self.settings.steps:
                    self._bar.close()

        def trainer_state(self, step: int) -> dict:
            """What a resumed run needs besides the weights: optimiser, schedule, RNG states."""
            return {
                "algorithm": "grpo",
                "step": step,
                "seed": self.seed,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "num_input_tokens_seen": self.state.num_input_tokens_seen,
                "rng": rng_state(),
            }

    return EchoGRPOTrainer


_TRAINER_CLASS = None


def trainer_class():
    """`EchoGRPOTrainer` (a `trl.GRPOTrainer` subclass); built on first use so importing rl.grpo stays light."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _make_trainer_class()
    return _TRAINER_CLASS


def __getattr__(name: str):
    if name == "EchoGRPOTrainer":
        return trainer_class()
    raise AttributeError(f"module 'rl.grpo' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def train_grpo(model, tokenizer, engine: RolloutEngine, prompt_set: PromptSet, rewards: Rewards,
               settings: RLSettings, recorder: Recorder, seed: int, start_step: int = 0, progress: bool = True, *,
               ref_model=None, trainer_state: dict | None = None, callbacks=None,
               replay: PretrainReplay | None = None):
    """Post-train `model` with GRPO for steps start_step .. settings.steps - 1; returns the model.

    Every step writes rollouts/step_*.parquet (SPEC columns, expert_load from the training forward),
    and a metrics.jsonl line; checkpoints (model after s updates, with optimiser,
    schedule and RNG state in trainer_state.pt) every `checkpoint_every` steps and after the last.

    Resuming (as rl.ppo.train_ppo): pass the model loaded from the checkpoint of `start_step`; the optimiser,
    RNG state and TRL's token count are read from that checkpoint's trainer_state.pt unless `trainer_state` is
    given, and anything recorded at `start_step` or later is forgotten first. With beta > 0 the reference is
    `ref_model` (frozen), defaulting to a copy of `model` at a fresh start; a resumed run must pass the base model.
    The caller owns `engine`; when training ends it serves the returned model (as after PPO and EI). The
    learning rate is constant (AdamW, no weight decay); gradients are clipped at norm MAX_GRAD_NORM (TRL's
    default). With mitigations.pretrain_replay_coef > 0, `replay` holds the pretraining texts (rl.replay).
    """
    check_mitigations(settings, GRPO_MITIGATIONS, "GRPO")
    replay = active_replay(settings.mitigations.pretrain_replay_coef, replay)
    ref_model = kl_reference(model, ref_model, settings, start_step, "GRPO")
    trainer_state = start_or_resume("grpo", settings, recorder, start_step, trainer_state)
    if start_step == settings.steps:
        return model

    callbacks = list(callbacks or [])
    if trainer_state is not None:
        callbacks.append(_restore_state_callback(trainer_state))
    had_own_forward = "forward" in vars(model)
    try:
        with frozen_router(model, settings.mitigations.freeze_router):
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                          betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            if trainer_state is not None:
                optimizer.load_state_dict(trainer_state["optimizer"])
                scheduler.load_state_dict(trainer_state["lr_scheduler"])
            with tempfile.TemporaryDirectory(prefix="echolab-grpo-") as scratch:
                args = grpo_config(settings, seed, scratch, max_steps=settings.steps - start_step, moe=is_moe(model))
                trainer = trainer_class()(model, tokenizer, engine, prompt_set, rewards, settings, seed, args,
                                          start_step=start_step, recorder=recorder, ref_model=ref_model,
                                          optimizers=(optimizer, scheduler), callbacks=callbacks, progress=progress,
                                          replay=replay)
                trainer.train()
    finally:
        if not had_own_forward and "forward" in vars(model):
            del model.forward  # TRL patches its fused log-prob head onto the instance; restore the class forward
    # The trainer pushes lazily, before each generation; the last update has none after it.
    engine.sync_weights(model)
    return model


def _restore_state_callback(trainer_state: dict):
    """A callback restoring, when training begins, what the checkpoint's trainer_state holds besides the
    optimiser and schedule (which are loaded before the trainer is built): RNG states and token count."""
    from transformers import TrainerCallback

    class RestoreState(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            restore_rng_state(trainer_state["rng"])
            state.num_input_tokens_seen = trainer_state.get("num_input_tokens_seen", 0)

    return RestoreState()
