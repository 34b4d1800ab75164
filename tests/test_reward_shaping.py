"""Reward shaping with state across steps (rl.shaping.RewardShaping): the format-mix KL to the base
(mitigations.format_kl_coef) and outcome-based exploration (mitigations.outcome_exploration_coef).

The unit test walks two hand-made steps. The runs use a stand-in reward whose format, final answer and
correctness are checksums of the completion text, so every shaping term is recomputed here from the recorded
rollouts with plain loops: GRPO's gradient norm by hand from the shaped rewards (step 0: the outcome terms;
step 1: both, with the step-0 formats as the base and the step-0 answers as the history), PPO's first value loss
by hand from its shaped returns, every logged metric, and a resumed run equal to the uninterrupted one (the
base format counts and the answers seen travel in the checkpoint).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter

import pytest
import torch

from rl.config import GRPOSettings, MitigationSettings, PPOSettings, RLSettings, SamplingSettings
from rl.engines import HFEngine
from rl.losses import GROUP_STD_EPSILON
from rl.rollouts import StepBatch, collect, token_ids
from rl.seeds import step_seed
from rl.shaping import RewardShaping
from rl.training import train
from specialists.errors import UserError
from specialists.grading import Grade
from specialists.model import load_model
from specialists.tasks import Problem
from specialists.tokenizer import load_tokenizer

from rl_helpers import (Crash, CrashAt, grpo_grad_norm_by_hand, make_run, prompt_set_for, read_metrics, rollout_rows,
                        untimed)

FORMATS = ("python_function", "llm_code", "natural_language")
GROUP, FORMAT_KL_COEF, OUTCOME_COEF = 4, 1.0, 0.5


# ----- the state across steps, on hand-made batches -------------------------------------------------------------


def batch_of(prompt_ids: list[str], formats: list[str], answers: list[str | None]) -> StepBatch:
    """Groups of 2 completions; rewards 0 (the shaping is what is checked)."""
    grades = [Grade(f, a, False, "wrong") for f, a in zip(formats, answers)]
    problems = [Problem(prompt, "q", 1.0) for prompt in prompt_ids]
    return StepBatch(problems, ["q"] * len(problems), [[None, None]] * len(problems),
                     [grades[i:i + 2] for i in range(0, len(grades), 2)], torch.zeros(len(problems), 2))


def test_reward_shaping_remembers_the_base_formats_and_the_answers_seen():
    mitigations = MitigationSettings(format_kl_coef=2.0, outcome_exploration_coef=0.5)
    shaping = RewardShaping(mitigations, None)
    # Step 0: the base's formats a, a, b, b -> the format term is 0. Answers: x, x on p (penalty 1/2 each), y, None
    # on q (0, 0); none seen before: bonus 1, 1, 1 and 0 for the missing answer.
    # shaping = 0.5 * (bonus - penalty) = 0.25, 0.25, 0.5, 0.
    terms, metrics = shaping(batch_of(["p", "q"], ["a", "a", "b", "b"], ["x", "x", "y", None]))
    assert terms.tolist() == pytest.approx([0.25, 0.25, 0.5, 0.0])
    assert metrics == pytest.approx({"format_kl": 0.0, "outcome_ucb_bonus": 0.75, "outcome_batch_penalty": 0.25})
    saved = shaping.state_dict()
    assert saved == {"reward_shaping": {"base_format_counts": {"a": 2, "b": 2}, "answers_seen": {"p": {"x": 2}, "q": {"y": 1}}}}

    # Step 1: formats a, a, a, c. K = {a, b, c}, n = m = 4: p = 3.5, 0.5, 1.5 and q = 2.5, 2.5, 0.5 (/5.5):
    # format term -2 * ln(3.5/2.5) on a, -2 * ln 3 on c. Answers x, z on p: N = 2, 0 -> bonus 1/sqrt 2, 1; y, y on
    # q: N = 1 -> bonus 1, 1, penalty 1/2 each.
    step1 = batch_of(["p", "q"], ["a", "a", "a", "c"], ["x", "z", "y", "y"])
    expected = [-2 * math.log(1.4) + 0.5 * 2 ** -0.5, -2 * math.log(1.4) + 0.5,
                -2 * math.log(1.4) + 0.5 * 0.5, -2 * math.log(3) + 0.5 * 0.5]
    kl = (3.5 * math.log(1.4) + 0.5 * math.log(0.2) + 1.5 * math.log(3)) / 5.5
    resumed = RewardShaping(mitigations, saved)
    for state in (shaping, resumed):  # the running one and one rebuilt from the checkpoint shape alike
        terms, metrics = state(step1)
        assert terms.tolist() == pytest.approx(expected)
        assert metrics == pytest.approx({"format_kl": kl, "outcome_ucb_bonus": (2 ** -0.5 + 3) / 4,
                                         "outcome_batch_penalty": 0.25})
    assert resumed.state_dict()["reward_shaping"]["answers_seen"] == {"p": {"x": 3, "z": 1}, "q": {"y": 3}}


def test_reward_shaping_modes_and_off():
    batch = batch_of(["p"], ["a", "a"], ["x", "x"])
    historical = RewardShaping(MitigationSettings(outcome_exploration_coef=1.0, outcome_exploration_mode="historical"), None)
    terms, metrics = historical(batch)
    assert terms.tolist() == [1.0, 1.0] and metrics == {"outcome_ucb_bonus": 1.0}
    in_batch = RewardShaping(MitigationSettings(outcome_exploration_coef=1.0, outcome_exploration_mode="batch"), None)
    assert in_batch(batch)[1] == {"outcome_batch_penalty": 0.5}
    off = RewardShaping(MitigationSettings(), {"optimizer": {}})
    assert off(batch) == (None, {}) and off.state_dict() == {}


def test_resuming_without_the_shaping_state_is_refused():
    with pytest.raises(UserError, match="no reward-shaping state"):
        RewardShaping(MitigationSettings(format_kl_coef=0.1), {"optimizer": {}})


# ----- tiny runs -----------------------------------------------------------------------------------------------


def checksum(text: str) -> int:
    return zlib.crc32(text.encode())


def answer_of(text: str) -> str:
    return str((checksum(text) >> 3) % 3)


class OutcomeRewards:
    """Stand-in for rl.rollouts.Rewards on the barely trained test models, whose completions fit no format and
    state no answer: correct iff crc32 is even, the format and the final answer are other bits of it."""

    def __call__(self, texts, gold, group_size):
        grades = [Grade(FORMATS[(checksum(t) >> 1) % 3], answer_of(t), checksum(t) % 2 == 0, "wrong") for t in texts]
        return torch.tensor([g.correct for g in grades], dtype=torch.float32), grades


def settings(algorithm: str, shaped: bool, steps: int = 2) -> RLSettings:
    mitigations = (MitigationSettings(format_kl_coef=FORMAT_KL_COEF, outcome_exploration_coef=OUTCOME_COEF) if shaped
                   else MitigationSettings())
    # two prompts, both in every step's batch: from step 1 on, the history of the same prompts counts
    return RLSettings(algorithm=algorithm, steps=steps, prompts_per_step=2, num_prompts=2, learning_rate=1e-3,
                      checkpoint_every=1, router_aux_loss_coef=0.0,
                      sampling=SamplingSettings(samples_per_prompt=GROUP, max_new_tokens=24),
                      grpo=GRPOSettings(), ppo=PPOSettings(epochs=1, minibatches=1), mitigations=mitigations)


def shaping_by_hand(rows_by_step: list[list[dict]], step: int) -> tuple[list[float], dict[str, float]]:
    """The shaping terms of `step`'s completions and its metrics, from the recorded rollouts: formats against step 0's,
    answers against those of the earlier steps' same prompt."""
    rows, base = rows_by_step[step], Counter(row["format"] for row in rows_by_step[0])
    batch = Counter(row["format"] for row in rows)
    formats = set(base) | set(batch)
    p = {f: (batch[f] + 0.5) / (len(rows) + 0.5 * len(formats)) for f in formats}
    q = {f: (base[f] + 0.5) / (sum(base.values()) + 0.5 * len(formats)) for f in formats}
    seen = Counter((row["prompt_id"], answer_of(row["completion"])) for earlier in rows_by_step[:step] for row in earlier)
    terms, bonuses, penalties = [], [], []
    for row in rows:
        answer = answer_of(row["completion"])
        bonus = 1 / math.sqrt(max(seen[(row["prompt_id"], answer)], 1))
        group = [other for other in rows if other["prompt_id"] == row["prompt_id"]]
        penalty = (sum(answer_of(other["completion"]) == answer for other in group) - 1) / GROUP
        terms.append(-FORMAT_KL_COEF * math.log(p[row["format"]] / q[row["format"]]) + OUTCOME_COEF * (bonus - penalty))
        bonuses.append(bonus)
        penalties.append(penalty)
    metrics = {"format_kl": sum(p[f] * math.log(p[f] / q[f]) for f in formats),
               "outcome_ucb_bonus": sum(bonuses) / len(rows), "outcome_batch_penalty": sum(penalties) / len(rows)}
    return terms, metrics


@pytest.fixture(scope="module")
def grpo_runs(tiny_moe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shaping-grpo")
    for name, shaped in (("shaped", True), ("plain", False)):
        train(make_run(tiny_moe_dir, root / name, settings("grpo", shaped), rewards=OutcomeRewards()))
    return root


@pytest.mark.integration
def test_grpo_adds_the_shaping_to_the_rewards_before_its_advantages(grpo_runs, tiny_moe_dir):
    shaped, plain = read_metrics(grpo_runs / "shaped"), read_metrics(grpo_runs / "plain")
    rows = [rollout_rows(grpo_runs / "shaped", step) for step in range(3)]
    config, tokenizer = settings("grpo", True), load_tokenizer(tiny_moe_dir)
    prompt_set = prompt_set_for(config, tokenizer)
    for step, model_dir in ((0, tiny_moe_dir), (1, grpo_runs / "shaped" / "checkpoints" / "step_000001")):
        terms, metrics = shaping_by_hand(rows, step)
        assert {key: shaped[step][key] for key in metrics} == pytest.approx(metrics, abs=1e-6)
        # the step's batch sampled again by the model that sampled it: the recorded one
        model = load_model(model_dir)
        batch = collect(HFEngine(model, tokenizer), prompt_set.prompter, prompt_set.batch(step), config.sampling,
                        OutcomeRewards(), step_seed(0, step, "sampling"))
        assert [c.text for c in batch.flat_completions] == [row["completion"] for row in rows[step]]
        # A_i = (r_i - mean_g r) / (std_g r + 1e-4) on r_i = reward_i + shaping_i
        rewards = (torch.tensor([row["reward"] for row in rows[step]], dtype=torch.float64)
                   + torch.tensor(terms, dtype=torch.float64)).view(-1, GROUP)
        advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + GROUP_STD_EPSILON)
        expected = grpo_grad_norm_by_hand(model, *token_ids(batch, tokenizer), tokenizer.pad_token_id,
                                          advantages.flatten().tolist())
        assert shaped[step]["grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert shaped[0]["format_kl"] == 0.0  # the base against itself
    assert shaped[1]["format_kl"] > 1e-3  # the step-1 mix differs from the base's: the format term acts
    assert shaped[1]["outcome_ucb_bonus"] < 1  # step 1 met answers of step 0: the history acts
    assert abs(shaped[0]["grad_norm"] - plain[0]["grad_norm"]) > 1e-3 * plain[0]["grad_norm"]
    for key in ("format_kl", "outcome_ucb_bonus", "outcome_batch_penalty"):
        assert plain[0][key] is None and shaped[2][key] is None  # off, and the final model's step (no update)
    assert [row["reward"] for row in rows[0]] == [float(checksum(row["completion"]) % 2 == 0) for row in rows[0]]


@pytest.mark.integration
def test_ppo_adds_the_shaping_to_the_last_token_reward(tiny_moe_dir, tmp_path):
    """PPO's first update: the value head starts at 0, so V = V_old = 0 and the value loss is 0.5 x the mean over
    completion tokens of R_t^2, with R_t = lam^(L - 1 - t) (reward + shaping) (GAE, gamma 1, reward on the last
    token)."""
    train(make_run(tiny_moe_dir, tmp_path, settings("ppo", True), rewards=OutcomeRewards()))
    metrics = read_metrics(tmp_path)
    rows = [rollout_rows(tmp_path, step) for step in range(3)]
    lam = PPOSettings().lam
    terms, step0 = shaping_by_hand(rows, 0)
    squares = [(lam ** (row["num_tokens"] - 1 - t) * (row["reward"] + term)) ** 2
               for row, term in zip(rows[0], terms) for t in range(row["num_tokens"])]
    assert metrics[0]["value_loss"] == pytest.approx(0.5 * sum(squares) / len(squares), rel=1e-5)
    for step in (0, 1):
        _, expected = shaping_by_hand(rows, step)
        assert {key: metrics[step][key] for key in expected} == pytest.approx(expected, abs=1e-6)


@pytest.mark.integration
def test_resume_keeps_the_base_formats_and_the_answers_seen(tiny_moe_dir, tmp_path):
    """Killed after step 2 was recorded: resumed from checkpoint 2, steps 2 and 3 shape (and so train) as the
    uninterrupted run's, which needs step 0's format counts and the answers of steps 0-1 from the checkpoint."""
    config = settings("grpo", True, steps=3)
    train(make_run(tiny_moe_dir, tmp_path / "whole", config, rewards=OutcomeRewards()))
    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(make_run(tiny_moe_dir, crashed, config, rewards=OutcomeRewards()), observers=[CrashAt(2)])
    train(make_run(tiny_moe_dir, crashed, config, rewards=OutcomeRewards(), start_step=2,
                   model=load_model(crashed / "checkpoints" / "step_000002")))
    whole = read_metrics(tmp_path / "whole")
    assert untimed(read_metrics(crashed)) == untimed(whole)
    assert whole[2]["outcome_ucb_bonus"] < 1  # step 2 met answers seen before: the history mattered
