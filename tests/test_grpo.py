"""GRPO on TRL's GRPOTrainer (rl/grpo.py) with the transformers engine, on tiny pretrained models.

Tiny settings throughout (2 prompts x 4 samples x 24 tokens per step) so the whole file runs in well
under a minute on 2 cores. The models are barely trained, so `correct` is almost always False; where a
test needs advantages that are not all zero it uses `DigitRewards` (real grading, reward = share of
digits in the completion).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from rl.config import GRPOSettings, MitigationSettings, RLSettings, SamplingSettings
from rl.engines import HFEngine
from rl.grpo import PromptSetSampler, train_grpo
from rl.recorder import Recorder
from rl.rollouts import PromptSet, Rewards
from specialists.config import ModelSettings, PretrainSettings, SpecialistsConfig
from specialists.formats import FORMAT_SETS
from specialists.model import build_model, load_model
from specialists.pretrain import pretrain
from specialists.sandbox import Sandbox
from specialists.tasks import TaskSettings, generate_problems
from specialists.tokenizer import load_tokenizer

from rl_helpers import TIMING_KEYS, check_run_directory, read_metrics, rollout_rows

os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPTS, SAMPLES = 2, 4
STEP_KEYS = {"loss", "grad_norm", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "reward_mean", "reward_std", "accuracy", "truncated_fraction", "epoch", "step_time_s",
             "rollout_tokens_per_s"}


class DigitRewards(Rewards):
    """Graded like Rewards, but rewarded by the share of digits in the completion (never all equal)."""

    def __call__(self, texts, gold, group_size):
        _, grades = super().__call__(texts, gold, group_size)
        return torch.tensor([sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]), grades


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny pretrained MoE, and a dense model (untrained: it only has to run) sharing its tokenizer."""
    base = tmp_path_factory.mktemp("grpo-models")
    moe = pretrain(SpecialistsConfig(pretrain=PretrainSettings(num_examples=300, batch_size=32)), base / "moe", progress=False)
    tokenizer = load_tokenizer(moe)
    dense = build_model(ModelSettings(kind="dense"), len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)
    dense.save_pretrained(base / "dense")
    tokenizer.save_pretrained(base / "dense")
    return {"moe": moe, "dense": base / "dense"}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=1) as box:
        yield box


@pytest.fixture(scope="module")
def problems():
    return generate_problems(12, 10_000, "train", TaskSettings())


def settings(steps=3, **overrides) -> RLSettings:
    return RLSettings(steps=steps, prompts_per_step=PROMPTS, learning_rate=1e-3, checkpoint_every=2,
                      sampling=SamplingSettings(samples_per_prompt=SAMPLES, max_new_tokens=24), **overrides)


def run(models, sandbox, problems, run_dir, rl_settings, kind="moe", reward_class=Rewards, start_step=0, model=None):
    model = load_model(models[kind]) if model is None else model
    tokenizer = load_tokenizer(models[kind])
    rewards = reward_class(FORMAT_SETS["synthetic"], sandbox, rl_settings.reward_scale, 0.0)
    trained = train_grpo(model, tokenizer, HFEngine(model, tokenizer), PromptSet(problems, PROMPTS, seed=0), rewards,
                         rl_settings, Recorder(run_dir), seed=0, start_step=start_step, progress=False)
    return trained, read_metrics(run_dir)


def untimed(metrics):
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in metrics]


@pytest.fixture(scope="module")
def three_steps(models, sandbox, problems, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("three-steps")
    before = {k: v.clone() for k, v in load_model(models["moe"]).state_dict().items()}
    trained, metrics = run(models, sandbox, problems, run_dir, settings())
    return run_dir, before, trained, metrics


def test_three_steps_write_a_complete_run_directory(three_steps, problems):
    run_dir, _, trained, metrics = three_steps
    # schema, routed-token counts, three metrics lines; checkpoints after 2 updates
    # (checkpoint_every) and after the last, each resumable
    assert check_run_directory(run_dir, trained.config, steps=3, rows_per_step=PROMPTS * SAMPLES, checkpoints=[2, 3],
                               algorithm="grpo") == metrics
    prompt_set = PromptSet(problems, PROMPTS, seed=0)
    for step in range(3):
        rows = rollout_rows(run_dir, step)
        assert {r["epoch"] for r in rows} == {prompt_set.epoch(step)}
        # the prompts TRL trained on are the PromptSet's batch of this step, each sampled SAMPLES times
        assert [r["prompt_id"] for r in rows] == [p.id for p in prompt_set.batch(step) for _ in range(SAMPLES)]
        assert [r["sample_index"] for r in rows] == list(range(SAMPLES)) * PROMPTS
        for r in rows:
            assert r["reward"] == float(r["correct"])  # reward_scale 1, no bonus
            assert r["format"] and r["reason"]
        # a completion shorter than max_new_tokens ended with end-of-text; one of full length may have too
        full_length = sum(r["num_tokens"] == 24 for r in rows) / len(rows)
        assert 0 <= metrics[step]["truncated_fraction"] <= full_length

    for line in metrics:
        assert STEP_KEYS | {"aux_loss"} <= set(line), STEP_KEYS | {"aux_loss"} - set(line)
        assert all(math.isfinite(line[k]) for k in STEP_KEYS | {"aux_loss"})
        assert line["rollout_tokens_per_s"] > 0

    for step in (2, 3):
        directory = run_dir / "checkpoints" / f"step_{step:06d}"
        state = torch.load(directory / "trainer_state.pt", weights_only=True)  # as rl.training.start_or_resume loads it
        assert state["optimizer"]["state"]
    reloaded = load_model(run_dir / "checkpoints" / "step_000003")
    for name, value in trained.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name


def test_weights_change_and_the_model_is_handed_back_clean(three_steps):
    _, before, trained, _ = three_steps
    changed = [name for name, value in trained.state_dict().items() if not torch.equal(value, before[name])]
    assert any(".mlp.gate." in name for name in changed) and any("self_attn" in name for name in changed)
    assert "forward" not in vars(trained)  # TRL's fused head is unpatched
    assert all(p.requires_grad for p in trained.parameters())


def test_same_seed_same_metrics_and_rollouts(three_steps, models, sandbox, problems, tmp_path):
    run_dir, _, _, metrics = three_steps
    _, again = run(models, sandbox, problems, tmp_path, settings())
    assert untimed(again) == untimed(metrics)
    for step in range(3):
        assert rollout_rows(tmp_path, step) == rollout_rows(run_dir, step)


def test_resume_from_checkpoint_reproduces_the_run(three_steps, models, sandbox, problems, tmp_path):
    _, _, _, metrics = three_steps
    run(models, sandbox, problems, tmp_path, settings(steps=2))
    (tmp_path / "metrics.jsonl").write_text((tmp_path / "metrics.jsonl").read_text() + '{"step": 2, "stale": 1}\n')
    checkpoint = load_model(tmp_path / "checkpoints" / "step_000002")
    _, resumed = run(models, sandbox, problems, tmp_path, settings(), start_step=2, model=checkpoint)
    assert untimed(resumed) == untimed(metrics)  # optimiser state, RNG and token count carried over; stale line gone


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo", "bnpo"])  # "grpo", the default: the three-step run
def test_each_loss_type_runs_a_step(loss_type, models, sandbox, problems, tmp_path):
    _, metrics = run(models, sandbox, problems, tmp_path, settings(steps=1, grpo=GRPOSettings(loss_type=loss_type)),
                     reward_class=DigitRewards)
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"]) and metrics[0]["reward_std"] > 0
    assert metrics[0]["grad_norm"] > 0


def test_beta_adds_the_kl_to_the_initial_model(models, sandbox, problems, tmp_path):
    _, metrics = run(models, sandbox, problems, tmp_path, settings(steps=2, beta=0.1), reward_class=DigitRewards)
    assert metrics[0]["kl"] == 0.0  # the policy is the reference before the first update
    assert metrics[1]["kl"] > 0


def test_dense_model_runs_without_routing_data(models, sandbox, problems, tmp_path):
    _, metrics = run(models, sandbox, problems, tmp_path, settings(steps=2), kind="dense", reward_class=DigitRewards)
    assert len(metrics) == 2 and "aux_loss" not in metrics[0]
    assert all(r["expert_load"] is None for r in rollout_rows(tmp_path, 1))


def test_freeze_router_with_entropy_bonus_and_clip_cov(models, sandbox, problems, tmp_path):
    before = load_model(models["moe"]).state_dict()
    mitigations = MitigationSettings(freeze_router=True, entropy_coef=0.01, clip_cov=True, cov_ratio=0.05)
    trained, metrics = run(models, sandbox, problems, tmp_path, settings(steps=1, mitigations=mitigations),
                           reward_class=DigitRewards)
    after = trained.state_dict()
    gates = [name for name in after if name.endswith(".mlp.gate.weight")]
    assert gates and all(torch.equal(after[name], before[name]) for name in gates)
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert 0 < metrics[0]["clip_cov/fraction"] <= 0.1 and metrics[0]["entropy_coef"] == 0.01


def test_kl_cov_with_two_iterations_per_batch(models, sandbox, problems, tmp_path):
    rl_settings = settings(steps=2, grpo=GRPOSettings(num_iterations=2), mitigations=MitigationSettings(kl_cov=True, cov_ratio=0.05))
    _, metrics = run(models, sandbox, problems, tmp_path, rl_settings, reward_class=DigitRewards)
    assert [m["step"] for m in metrics] == [0, 1]
    assert "reward_mean" in metrics[0] and "reward_mean" not in metrics[1]  # one generation, two optimiser steps
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step_000000.parquet"]
    assert metrics[0]["kl_cov/penalty"] == 0.0 < metrics[1]["kl_cov/penalty"]  # |log pi - log pi_old| is 0 on-policy
    with pytest.raises(ValueError, match="num_iterations"):
        run(models, sandbox, problems, tmp_path / "x", settings(steps=1, mitigations=MitigationSettings(kl_cov=True)))


@pytest.mark.parametrize("mitigations", [MitigationSettings(unlikeliness_beta=0.5), MitigationSettings(pass_at_k=2)])
def test_advantage_mitigations_replace_trl_advantages(mitigations, models, sandbox, problems, tmp_path):
    from rl.grpo import trainer_class

    seen = []
    original = trainer_class().compute_advantages

    def spy(self, rewards, correct, sequence_logprobs):
        seen.append(original(self, rewards, correct, sequence_logprobs))
        return seen[-1]

    trainer_class().compute_advantages = spy
    try:
        run(models, sandbox, problems, tmp_path, settings(steps=1, mitigations=mitigations), reward_class=DigitRewards)
    finally:
        trainer_class().compute_advantages = original
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (PROMPTS * SAMPLES,)


def test_prompt_sampler_walks_the_prompt_set(problems):
    prompt_set = PromptSet(problems, 5, seed=3)
    sampler = PromptSetSampler(prompt_set, first_generation=2, generations=3, samples=2, iterations=2)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 3 * 2 * 5 * 2
    for g in range(3):
        block = indices[g * 20:(g + 1) * 20]
        expected = [problems.index(p) for p in prompt_set.batch(2 + g) for _ in range(2)]
        assert block == expected * 2
