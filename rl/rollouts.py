"""What every algorithm does each step before its update: pick prompts, sample, grade, reward.

`PromptSet` walks the RL prompts in seeded epochs; `collect` samples `samples_per_prompt`
completions per prompt from the engine, grades them (format, answer, reason) and turns them into
rewards; `to_rollouts` makes the recorder's rows; `pack_batch` the training forward's tensors. The reward
is a list of weighted terms: the correctness term always, plus the mitigations' format-level terms when
switched on.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass

import torch

from rl.config import RLSettings, SamplingSettings
from rl.engines import Completion, RolloutEngine
from rl.losses import format_diversity_bonus
from rl.recorder import Rollout
from rl.seeds import derive_seed, step_seed
from rl.sequences import PackedBatch, pack_rows
from specialists.formats import Format
from specialists.grading import Grade, answer_text, grade_completions
from specialists.sandbox import Sandbox
from specialists.prompting import Prompter
from specialists.tasks import Problem, TaskSettings, generate_problems


def load_prompt_problems(settings: RLSettings, seed: int, task: TaskSettings) -> list[Problem]:
    if settings.prompts == "synthetic":
        return generate_problems(settings.num_prompts, derive_seed(seed, "rl_prompts"), "train", task)
    return settings.prompt_split().train[:settings.num_prompts]  # a prompt file, its held-out problems set aside


def load_heldout_problems(settings: RLSettings, seed: int, task: TaskSettings) -> list[Problem]:
    """The problems of rl.evaluation, never RL prompts: `evaluation.num_problems` of the synthetic task's eval split
    (drawn with `seed`, the experiment's: runs that vary rl.seed share them, as a prompt file's split is drawn
    with heldout_seed), or the first ones of the prompt file's held-out split."""
    count = settings.evaluation.num_problems
    if settings.prompts == "synthetic":
        return generate_problems(count, derive_seed(seed, "heldout_problems"), "eval", task)
    return settings.prompt_split().heldout[:count]


class PromptSet:
    """Prompts in a seeded order, reshuffled every epoch; `batch(step)` is a pure function of the step.
    `prompter` turns each problem into the prompt the model sees (specialists.prompting)."""

    def __init__(self, problems: list[Problem], prompts_per_step: int, seed: int, prompter: Prompter):
        self.problems, self.prompts_per_step, self.seed, self.prompter = problems, prompts_per_step, seed, prompter

    def epoch(self, step: int) -> float:
        """Passes over the prompt set completed before this step's batch."""
        return step * self.prompts_per_step / len(self.problems)

    def batch(self, step: int) -> list[Problem]:
        chosen = []
        for position in range(step * self.prompts_per_step, (step + 1) * self.prompts_per_step):
            epoch, index = divmod(position, len(self.problems))
            chosen.append(self.problems[self._order(epoch)[index]])
        return chosen

    def extra(self, step: int, round_: int) -> list[Problem]:
        """The `round_`-th (1, 2, ...) batch of further prompts of dynamic sampling at `step`: consecutive slices of
        one seeded order of the problems not in `batch(step)`, so no prompt repeats within a step; fewer (or none)
        once they run out. A pure function of (seed, step, round_), like `batch`."""
        taken = {id(problem) for problem in self.batch(step)}
        others = [problem for problem in self.problems if id(problem) not in taken]
        random.Random(derive_seed(self.seed, "dynamic_sampling", step)).shuffle(others)
        return others[(round_ - 1) * self.prompts_per_step:round_ * self.prompts_per_step]

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(derive_seed(self.seed, "prompt_order", epoch)).shuffle(order)
        return order


@dataclass
class StepBatch:
    """One step's rollouts, grouped by prompt: completions[p][g] for prompt p, sample g."""

    problems: list[Problem]
    prompts: list[str]  # each problem's prompt text (PromptSet.prompter)
    completions: list[list[Completion]]
    grades: list[list[Grade]]
    rewards: torch.Tensor  # (prompts, samples)
    sample_time_s: float = 0.0  # the engine's generate calls
    score_time_s: float = 0.0  # grading and rewards
    sampling_rounds: int = 1  # engine calls that made the batch (more with grpo.dynamic_sampling)

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


def collect(engine: RolloutEngine, prompter: Prompter, problems: list[Problem], sampling: SamplingSettings,
            rewards: Rewards, seed: int, first_index: int = 0) -> StepBatch:
    """Sample `sampling.samples_per_prompt` completions of each problem's prompt (`prompter`) with `seed`, grade and
    reward them. `first_index`: the first problem's index in the step's whole batch (a data-parallel rank's share
    is sampled with its global prompt indices, rl.distributed)."""
    prompts = [prompter.text(p) for p in problems]
    started = time.perf_counter()
    groups = engine.generate(prompts, sampling, seed, first_index)
    sampled = time.perf_counter()
    if len(groups) != len(problems) or any(len(group) != sampling.samples_per_prompt for group in groups):
        raise RuntimeError(f"the engine returned {[len(g) for g in groups]} completions per prompt, "
                           f"expected {sampling.samples_per_prompt} for each of {len(problems)} prompts")
    texts = [c.text for group in groups for c in group]
    gold = [p.answer for p in problems for _ in range(sampling.samples_per_prompt)]
    flat_rewards, flat_grades = rewards(texts, gold, sampling.samples_per_prompt)
    size = sampling.samples_per_prompt
    grades = [flat_grades[i:i + size] for i in range(0, len(flat_grades), size)]
    return StepBatch(problems, prompts, groups, grades, flat_rewards.view(len(problems), size),
                     sample_time_s=sampled - started, score_time_s=time.perf_counter() - sampled)


def dynamic_sampling(first: StepBatch, engine: RolloutEngine, prompt_set: PromptSet, step: int, settings: RLSettings,
                     rewards: Rewards, seed: int) -> StepBatch:
    """DAPO's dynamic sampling, Yu et al. 2025 (arXiv:2503.14476, sec. 3.2, eq. 11's constraint
    0 < |{correct outputs}| < G; verl's `filter_groups`): a group whose G rewards are all equal has zero advantage
    under every GRPO scale and baseline, so it is dropped and replaced by the group of a further prompt, sampled
    until the batch holds `prompts_per_step` groups with reward spread.

    `first` is the step's own batch; round r = 1 .. grpo.dynamic_sampling_rounds samples `prompt_set.extra(step, r)`
    with seed step_seed(seed, step, "dynamic_sampling:r"), until enough groups have spread. The batch keeps the
    groups with spread in sampling order (the step's own first); if the rounds (or the prompts) run out before
    there are enough, it is topped up with dropped groups, first sampled first, so it always holds prompts_per_step
    groups (the topped-up ones train only through the KL and entropy terms, as without dynamic sampling). The
    batch is what the update uses and what the step records: a step's rollouts then over-represent prompts of
    mixed outcome (analyses of format shares should read a run without it, or its final step, which is never
    filtered)."""
    wanted = len(first.problems)
    batches = [first]
    for round_ in range(1, settings.grpo.dynamic_sampling_rounds + 1):
        if sum(_has_spread(batch).sum().item() for batch in batches) >= wanted:
            break
        problems = prompt_set.extra(step, round_)
        if not problems:
            break
        batches.append(collect(engine, prompt_set.prompter, problems, settings.sampling, rewards,
                               step_seed(seed, step, f"dynamic_sampling:{round_}")))
    groups = [(batch, g) for batch in batches for g in range(len(batch.problems))]
    spread = torch.cat([_has_spread(batch) for batch in batches]).tolist()
    chosen = ([group for group, ok in zip(groups, spread) if ok] + [group for group, ok in zip(groups, spread) if not ok])
    chosen = chosen[:wanted]
    return StepBatch([b.problems[g] for b, g in chosen], [b.prompts[g] for b, g in chosen],
                     [b.completions[g] for b, g in chosen], [b.grades[g] for b, g in chosen],
                     torch.stack([b.rewards[g] for b, g in chosen]),
                     sample_time_s=sum(b.sample_time_s for b in batches), score_time_s=sum(b.score_time_s for b in batches),
                     sampling_rounds=len(batches))


def _has_spread(batch: StepBatch) -> torch.Tensor:
    """(prompts,) bool: the group's rewards are not all equal."""
    return batch.rewards.max(dim=1).values != batch.rewards.min(dim=1).values


def to_rollouts(step: int, epoch: float, batch: StepBatch, logprobs: torch.Tensor | None,
                expert_load: torch.Tensor | None) -> list[Rollout]:
    """Recorder rows. `logprobs` (completions,): each completion's summed log-probability under the raw
    distribution of the model that sampled it, or None (not scored: the held-out evaluation); `expert_load`
    (completions, layers, experts) or None; both in flat completion order."""
    rows, flat = [], 0
    for problem, prompt, group, grades, rewards in zip(batch.problems, batch.prompts, batch.completions, batch.grades,
                                                       batch.rewards):
        for index, (completion, grade, reward) in enumerate(zip(group, grades, rewards.tolist())):
            rows.append(Rollout(
                step=step, epoch=epoch, prompt_id=problem.id, sample_index=index, prompt=prompt,
                completion=completion.text, answer=answer_text(problem.answer), reward=reward, correct=grade.correct,
                format=grade.format, reason=grade.reason, num_tokens=len(completion.token_ids),
                logprob=None if logprobs is None else float(logprobs[flat]),
                expert_load=None if expert_load is None else expert_load[flat].tolist()))
            flat += 1
    return rows


def token_ids(batch: StepBatch, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of every completion of the batch, flat completion order. The prompt text is
    tokenised as the Prompter and the engines tokenise it (special tokens are in the text, none are added);
    completions keep the engine's token ids."""
    prompt_ids, completion_ids = [], []
    for prompt, group in zip(batch.prompts, batch.completions):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for completion in group:
            prompt_ids.append(ids)
            completion_ids.append(list(completion.token_ids))
    return prompt_ids, completion_ids


def pack_batch(batch: StepBatch, tokenizer) -> PackedBatch:
    """The batch in the training forward's packed layout (rl.sequences.PackedBatch), flat completion order."""
    return pack_rows(*token_ids(batch, tokenizer), tokenizer.pad_token_id)


def sampler_logprobs(batch: StepBatch, mask: torch.Tensor) -> torch.Tensor:
    """The engine's per-token sampling log-probs in the completion layout of `mask` (B, C); 0 off the mask."""
    values = torch.zeros(mask.shape)
    for row, completion in enumerate(batch.flat_completions):
        values[row, :len(completion.token_logprobs)] = torch.tensor(completion.token_logprobs)
    return values.to(mask.device)


def concatenate(batches: list[StepBatch]) -> StepBatch:
    """The data-parallel ranks' shares of one step (rl.distributed), in rank order: the step's whole batch. Times
    are the slowest rank's (the ranks sample at once)."""
    return StepBatch([p for b in batches for p in b.problems], [p for b in batches for p in b.prompts],
                     [g for b in batches for g in b.completions], [g for b in batches for g in b.grades],
                     torch.cat([b.rewards for b in batches]), sample_time_s=max(b.sample_time_s for b in batches),
                     score_time_s=max(b.score_time_s for b in batches),
                     sampling_rounds=max(b.sampling_rounds for b in batches))
