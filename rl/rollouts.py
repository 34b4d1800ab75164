"""What every algorithm does each step before its update: pick prompts, sample, grade, reward.

`PromptSet` walks the RL prompts in seeded epochs; `collect` samples `samples_per_prompt`
completions per prompt from the engine, grades them (format, answer, reason) and turns them into
rewards; `to_rollouts` makes the recorder's rows. The reward is a list of weighted terms: the
correctness term always, plus the mitigations' format-level terms when switched on. Shared by the
algorithms' step loops: `sampling_seed` and `step_seed` (per-step seeds), `pack_batch`
(teacher-forcing tensors) and `record_step` (rollouts and metrics of one step).
"""

from __future__ import annotations

import hashlib
import math
import functools
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rl.config import RLSettings
from rl.engines import Completion, RolloutEngine
from rl.losses import format_diversity_bonus
from rl.recorder import Recorder, Rollout
from rl.sequences import pack
from specialists.formats import Format
from specialists.grading import Grade, grade_completions
from specialists.sandbox import Sandbox
from specialists.tasks import Problem, TaskSettings, generate_problems, load_gsm8k, prompt_text

RL_PROMPT_SEED_OFFSET = 10_000  # RL prompts come from a different draw than the pretraining corpus


def load_prompt_problems(settings: RLSettings, seed: int, task: TaskSettings) -> list[Problem]:
    if settings.prompts == "synthetic":
        return generate_problems(settings.num_prompts, seed + RL_PROMPT_SEED_OFFSET, "train", task)
    return load_gsm8k(Path(settings.prompts), limit=settings.num_prompts)


class PromptSet:
    """Prompts in a seeded order, reshuffled every epoch; `batch(step)` is a pure function of the step."""

    def __init__(self, problems: list[Problem], prompts_per_step: int, seed: int):
        self.problems, self.prompts_per_step, self.seed = problems, prompts_per_step, seed

    def epoch(self, step: int) -> float:
        """Passes over the prompt set completed before this step's batch."""
        return step * self.prompts_per_step / len(self.problems)

    def batch(self, step: int) -> list[Problem]:
        chosen = []
        for position in range(step * self.prompts_per_step, (step + 1) * self.prompts_per_step):
            epoch, index = divmod(position, len(self.problems))
            chosen.append(self.problems[self._order(epoch)[index]])
        return chosen

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order


@dataclass
class StepBatch:
    """One step's rollouts, grouped by prompt: completions[p][g] for prompt p, sample g."""

    problems: list[Problem]
    completions: list[list[Completion]]
    grades: list[list[Grade]]
    rewards: torch.Tensor  # (prompts, samples)

    @property
    def flat_completions(self) -> list[Completion]:
        return [c for group in self.completions for c in group]

    @property
    def flat_grades(self) -> list[Grade]:
        return [g for group in self.grades for g in group]


class Rewards:
    """reward = reward_scale * correct + format_diversity_coef * bonus (see rl.losses.format_diversity_bonus)."""

    def __init__(self, formats: tuple[Format, ...], sandbox: Sandbox, reward_scale: float, format_diversity_coef: float):
        self.formats, self.sandbox = formats, sandbox
        self.reward_scale, self.format_diversity_coef = reward_scale, format_diversity_coef

    def __call__(self, texts: list[str], gold: list[float | None], group_size: int) -> tuple[torch.Tensor, list[Grade]]:
        grades = grade_completions(texts, gold, self.formats, self.sandbox)
        correct = torch.tensor([g.correct for g in grades], dtype=torch.float32)
        rewards = self.reward_scale * correct
        if self.format_diversity_coef > 0:
            rewards = rewards + format_diversity_bonus([g.format for g in grades], correct, group_size, self.format_diversity_coef)
        return rewards, grades


def collect(engine: RolloutEngine, problems: list[Problem], settings: RLSettings, rewards: Rewards, seed: int) -> StepBatch:
    sampling = settings.sampling
    groups = engine.generate([prompt_text(p) for p in problems], sampling, seed)
    texts = [c.text for group in groups for c in group]
    gold = [p.answer for p in problems for _ in range(sampling.samples_per_prompt)]
    flat_rewards, flat_grades = rewards(texts, gold, sampling.samples_per_prompt)
    size = sampling.samples_per_prompt
    grades = [flat_grades[i:i + size] for i in range(0, len(flat_grades), size)]
    return StepBatch(problems, groups, grades, flat_rewards.view(len(problems), size))


def to_rollouts(step: int, epoch: float, batch: StepBatch, expert_load: torch.Tensor | None) -> list[Rollout]:
    """Recorder rows; `expert_load` is (completions, layers, experts) in flat completion order, or None."""
    rows, flat = [], 0
    for problem, group, grades, rewards in zip(batch.problems, batch.completions, batch.grades, batch.rewards):
        for index, (completion, grade, reward) in enumerate(zip(group, grades, rewards.tolist())):
            rows.append(Rollout(
                step=step, epoch=epoch, prompt_id=problem.id, sample_index=index, prompt=prompt_text(problem),
                completion=completion.text, answer=problem.answer, reward=reward, correct=grade.correct,
                format=grade.format, reason=grade.reason, num_tokens=len(completion.token_ids),
                logprob=completion.logprob,
                expert_load=None if expert_load is None else expert_load[flat].tolist()))
            flat += 1
    return rows


# ---------------------------------------------------------------------------------------------
# Shared by the step loops of PPO, GRPO and Expert Iteration
# ---------------------------------------------------------------------------------------------


def sampling_seed(seed: int, step: int) -> int:
    """The engine's seed for the rollouts of `step`, below 2**31 (vLLM). The one formula PPO, GRPO and EI
    use, so all three give the engine the same seed at the same step."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


def step_seed(seed: int, step: int, stream: str) -> int:
    """A 31-bit seed for one other use of randomness (`stream`: "minibatches", "sft", ...) at one step:
    a pure function of (seed, step, stream), so a resumed run draws exactly what the uninterrupted one did."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def pack_batch(batch: StepBatch, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing tensors of every (prompt, completion) of the batch, in flat completion order:
    (input_ids, attention_mask, completion_mask) as `rl.sequences.pack` makes them. The prompt is
    tokenised as the engines tokenise it (no special tokens); completions keep the engine's token ids."""
    prompt_ids, completion_ids = [], []
    for problem, group in zip(batch.problems, batch.completions):
        ids = tokenizer(prompt_text(problem), add_special_tokens=False)["input_ids"]
        for completion in group:
            prompt_ids.append(ids)
            completion_ids.append(list(completion.token_ids))
    return pack(prompt_ids, completion_ids, tokenizer.pad_token_id)


def _json_safe(value):
    """NaN / inf (e.g. explained variance of constant returns) become null: metrics.jsonl stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def record_step(recorder: Recorder, step: int, epoch: float, batch: StepBatch, expert_load: torch.Tensor | None,
                metrics: dict) -> list[Rollout]:
    """Write one step: its rollouts and one metrics line. The metrics line gets
    `epoch`, `reward_mean`, `reward_std` (population) and `accuracy` (mean correctness) of the batch and
    `truncated_fraction` (completions cut at max_new_tokens) added to the algorithm's own `metrics`. Returns the
    rollout rows."""
    rows = to_rollouts(step, epoch, batch, expert_load)
    recorder.write_rollouts(step, rows)
    rewards = batch.rewards.double().flatten()
    line = {
        "epoch": epoch,
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "accuracy": sum(g.correct for g in batch.flat_grades) / max(len(batch.flat_grades), 1),
        "truncated_fraction": sum(not c.finished for c in batch.flat_completions) / max(len(batch.flat_completions), 1),
        **metrics,
    }
    recorder.write_metrics(step, {key: _json_safe(value) for key, value in line.items()})
    return rows
