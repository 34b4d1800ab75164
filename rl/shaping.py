"""Reward shaping that remembers earlier steps: the format-mix KL to the base model (mitigations.format_kl_coef)
and outcome-based exploration (mitigations.outcome_exploration_coef). PPO and GRPO add its terms to the step's
rewards before their advantages; the recorded reward (rollouts, reward_mean) stays the task's.

    r_i <- r_i - format_kl_coef * log p(f_i) / q(f_i)                         (rl.losses.format_kl_shares)
               + outcome_exploration_coef * (b_i - p_i)                       (Song et al. 2025, arXiv:2509.06941)

b_i the historical bonus (rl.losses.historical_exploration_bonus), p_i the batch penalty
(rl.losses.batch_exploration_penalty); mitigations.outcome_exploration_mode keeps either or both.

Its state is what the terms need from the past: q, the format counts of the step-0 batch (the model is still
the base there; the format KL is measured against them from step 0 on), and N(x, a), the final answers sampled
per prompt in every earlier update step (with grpo.dynamic_sampling: in the groups it kept, the ones trained on).
Both travel in the checkpoint's trainer state (`state_dict`), so a resumed run shapes exactly as the uninterrupted
one.
"""

from __future__ import annotations

from collections import Counter

import torch

from rl.config import MitigationSettings
from rl.losses import batch_exploration_penalty, format_kl_shares, historical_exploration_bonus
from rl.rollouts import StepBatch
from specialists.errors import UserError


class RewardShaping:
    """The shaping terms of one run. `state`: a checkpoint's `state_dict()`, or None at a fresh start."""

    def __init__(self, mitigations: MitigationSettings, state: dict | None):
        self.mitigations = mitigations
        self.active = mitigations.format_kl_coef > 0 or mitigations.outcome_exploration_coef > 0
        self.base_format_counts: dict[str, int] | None = None
        self.answers_seen: dict[str, dict[str, int]] = {}
        if state is not None and self.active:
            if "reward_shaping" not in state:
                raise UserError("the checkpoint has no reward-shaping state (format_kl_coef, outcome_exploration_coef "
                                "were off when it was written): resume with the settings it was trained with")
            saved = state["reward_shaping"]
            self.base_format_counts = saved["base_format_counts"]
            self.answers_seen = {prompt: dict(answers) for prompt, answers in saved["answers_seen"].items()}

    def __call__(self, batch: StepBatch) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(the term added to each completion's reward, flat order, float64 (completions,); the step's metrics),
        or (None, {}) with both switches off. Updates the state: call once per update step, in step order."""
        if not self.active:
            return None, {}
        mitigations, grades = self.mitigations, batch.flat_grades
        shaping, metrics = torch.zeros(len(grades), dtype=torch.float64), {}
        if mitigations.format_kl_coef > 0:
            formats = [grade.format for grade in grades]
            if self.base_format_counts is None:  # step 0: the base model sampled this batch
                self.base_format_counts = dict(Counter(formats))
            log_ratio, kl = format_kl_shares(formats, self.base_format_counts)
            shaping -= mitigations.format_kl_coef * log_ratio
            metrics["format_kl"] = kl
        if mitigations.outcome_exploration_coef > 0:
            mode, group = mitigations.outcome_exploration_mode, len(batch.grades[0])
            answers = [grade.answer for grade in grades]
            prompts = [problem.id for problem in batch.problems for _ in range(group)]
            if mode in ("historical", "both"):
                bonus = historical_exploration_bonus(answers, prompts, self.answers_seen)
                shaping += mitigations.outcome_exploration_coef * bonus
                metrics["outcome_ucb_bonus"] = bonus.mean().item()
            if mode in ("batch", "both"):
                penalty = batch_exploration_penalty(answers, group)
                shaping -= mitigations.outcome_exploration_coef * penalty
                metrics["outcome_batch_penalty"] = penalty.mean().item()
            for prompt, answer in zip(prompts, answers):
                if answer is not None:
                    seen = self.answers_seen.setdefault(prompt, {})
                    seen[answer] = seen.get(answer, 0) + 1
        return shaping, metrics

    def state_dict(self) -> dict:
        """{"reward_shaping": ...} for the checkpoint's trainer state; {} with both switches off."""
        if not self.active:
            return {}
        return {"reward_shaping": {"base_format_counts": self.base_format_counts,
                                   "answers_seen": {prompt: dict(seen) for prompt, seen in self.answers_seen.items()}}}
