"""GRPO (rl/grpo.py) through the training driver (rl/training.py) with the transformers engine, on the session's
tiny pretrained models (tests/conftest.py).

Tiny settings throughout: 2 prompts x 4 samples x 24 tokens per step. The models are barely trained, so
real grading finds almost nothing correct; runs that need a reward signal use `ChecksumRewards` (a fixed
share of completions counts as correct) or `DigitRewards` (real grading, reward = share of digits).
The loss itself is checked against TRL in test_grpo_parity.py; here the loop around it: what reaches the
loss (advantages, settings, mitigations, each by a computed amount), what is recorded, resume and
determinism.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict

import pytest
import torch

from rl.config import GRPOSettings, MitigationSettings, RLSettings, SamplingSettings
from rl.engines import Completion, HFEngine
from rl.grpo import PolicyBatch, advantages_of, grpo_loss
from rl.losses import group_advantages, pass_at_k_advantages, unlikeliness_rewards
from rl.recipe import aux_loss_coefficient
from rl.rollouts import Rewards, StepBatch, collect, pack_batch
from rl.seeds import step_seed
from rl.training import train
from specialists.formats import FORMAT_SETS
from specialists.grading import Grade
from specialists.model import load_model
from specialists.sandbox import Sandbox
from specialists.tasks import Problem
from specialists.tokenizer import load_tokenizer

from rl_helpers import (ChecksumRewards, Crash, CrashAt, RecordingEngine, check_run_directory, completion_logprob,
                        make_run, prompt_set_for, read_metrics, rollout_rows, untimed, weights_equal)

pytestmark = pytest.mark.integration

PROMPTS, SAMPLES, NEW_TOKENS = 2, 4, 24
LN2 = math.log(2)


class DigitRewards(Rewards):
    """Graded like Rewards (formats, answers, the sandbox), but rewarded by the share of digits in the
    completion, so rewards are never all equal."""

    def __call__(self, texts, gold, group_size):
        _, grades = super().__call__(texts, gold, group_size)
        return torch.tensor([digit_share(t) for t in texts]), grades


def digit_share(text: str) -> float:
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


def settings(steps=3, **overrides) -> RLSettings:
    return RLSettings(steps=steps, prompts_per_step=PROMPTS, num_prompts=8, learning_rate=1e-3, checkpoint_every=2,
                      sampling=SamplingSettings(samples_per_prompt=SAMPLES, max_new_tokens=NEW_TOKENS), **overrides)


def run(model_dir, run_dir, rl_settings, observers=(), **kwargs):
    """rl.training.train on a Run built as the pipeline builds it; returns (trained model, metrics lines)."""
    trained = train(make_run(model_dir, run_dir, rl_settings, **kwargs), observers)
    return trained, read_metrics(run_dir)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=1) as box:
        yield box


@pytest.fixture(scope="module")
def three_steps(tiny_moe_dir, sandbox, tmp_path_factory):
    """(run directory, weights before, trained model, metrics lines, what the engine sampled at each step)."""
    run_dir = tmp_path_factory.mktemp("three-steps")
    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = RecordingEngine(HFEngine(model, tokenizer))
    rewards = DigitRewards(FORMAT_SETS["synthetic"], sandbox, 1.0, 0.0)
    trained, metrics = run(tiny_moe_dir, run_dir, settings(), rewards=rewards, model=model, engine=engine)
    return run_dir, before, trained, metrics, engine.calls


# ----- the run directory ------------------------------------------------------------------------


def test_three_steps_write_a_complete_run_directory(three_steps, tiny_moe_dir):
    run_dir, _, trained, metrics, sampled = three_steps
    # steps 0-2 update, step 3 samples the final model; checkpoints after 2 updates (checkpoint_every) and the last
    assert check_run_directory(run_dir, trained.config, steps=3, rows_per_step=PROMPTS * SAMPLES, checkpoints=[2, 3],
                               algorithm="grpo") == metrics
    prompt_set = prompt_set_for(settings(), load_tokenizer(tiny_moe_dir))
    for step in range(4):
        rows = rollout_rows(run_dir, step)
        assert {r["epoch"] for r in rows} == {prompt_set.epoch(step)}
        assert [r["prompt_id"] for r in rows] == [p.id for p in prompt_set.batch(step) for _ in range(SAMPLES)]
        assert [r["sample_index"] for r in rows] == list(range(SAMPLES)) * PROMPTS
        for r in rows:
            assert r["reward"] == pytest.approx(digit_share(r["completion"]))
            assert r["format"] and r["reason"] in {"correct", "wrong", "no_answer", "timeout", "forbidden", "error"}
        # a completion shorter than max_new_tokens ended with end-of-text; one of full length may have too
        full_length = sum(r["num_tokens"] == NEW_TOKENS for r in rows) / len(rows)
        assert 0 <= metrics[step]["truncated_fraction"] <= full_length
        assert metrics[step]["rollout_tokens"] == sum(r["num_tokens"] for r in rows)

    for line in metrics[:3]:
        for key in ("loss", "policy_loss", "entropy", "clip_fraction", "approx_kl", "grad_norm", "aux_loss",
                    "sampler_kl", "sampler_ratio_max", "reward_mean", "step_time_s", "rollout_tokens_per_s"):
            assert isinstance(line[key], float) and math.isfinite(line[key]), key
        assert line["updates"] == 1 and line["kl_to_reference"] is None  # beta = 0
        # transformers samples with the very weights and float32 maths the trainer uses: no mismatch
        assert line["sampler_kl"] < 1e-5 and abs(line["sampler_ratio_max"] - 1) < 1e-3
    assert metrics[3]["entropy"] > 0  # the final model is measured, not updated

    for step in (2, 3):
        state = torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt", weights_only=True)
        assert state["optimizer"]["state"]
    final = load_model(run_dir / "checkpoints" / "step_000003")
    assert weights_equal(trained.state_dict(), final.state_dict())
    # the recorded log-prob of each completion is its raw log-prob under the model that sampled it: step 3's
    # under checkpoint 3 (the final model), step 2's under checkpoint 2
    tokenizer = load_tokenizer(tiny_moe_dir)
    assert len(sampled) == 4
    for step, model in ((2, load_model(run_dir / "checkpoints" / "step_000002")), (3, final)):
        prompts, groups = sampled[step]
        rows = rollout_rows(run_dir, step)
        completions = [(prompt, c) for prompt, group in zip(prompts, groups, strict=True) for c in group]
        for row, (prompt, sample) in zip(rows, completions, strict=True):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert row["logprob"] == pytest.approx(completion_logprob(model, prompt_ids, sample.token_ids), abs=1e-4)


def test_weights_change_and_the_model_is_handed_back_trainable(three_steps):
    _, before, trained, _, _ = three_steps
    changed = [name for name, value in trained.state_dict().items() if not torch.equal(value, before[name])]
    assert any(".mlp.gate." in name for name in changed) and any("self_attn" in name for name in changed)
    assert all(p.requires_grad for p in trained.parameters())


def test_observers_see_every_recorded_step(tiny_moe_dir, tmp_path):
    class Collect:
        def __init__(self):
            self.calls = []

        def on_step(self, step, rollouts, metrics):
            self.calls.append((step, rollouts, metrics))

    observer = Collect()
    _, metrics = run(tiny_moe_dir, tmp_path, settings(steps=2), observers=[observer])
    assert [step for step, _, _ in observer.calls] == [0, 1, 2]
    for (step, rollouts, line), recorded in zip(observer.calls, metrics, strict=True):
        assert line == recorded  # the line as written to metrics.jsonl
        assert [asdict(r) for r in rollouts] == rollout_rows(tmp_path, step)


# ----- determinism and resume ------------------------------------------------------------------


def test_same_seed_same_metrics_and_rollouts(three_steps, tiny_moe_dir, sandbox, tmp_path):
    run_dir, _, trained, metrics, _ = three_steps
    again, lines = run(tiny_moe_dir, tmp_path, settings(), rewards=DigitRewards(FORMAT_SETS["synthetic"], sandbox, 1.0, 0.0))
    assert untimed(lines) == untimed(metrics)
    for step in range(4):
        assert rollout_rows(tmp_path, step) == rollout_rows(run_dir, step)
    assert weights_equal(again.state_dict(), trained.state_dict())


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_moe_dir, tmp_path):
    """Killed after step 2 was recorded, before its checkpoint (checkpoint 2 holds the model after steps 0-1):
    the resumed run starts from checkpoint 2 with its optimiser state and ends with the weights, the optimiser
    state, the rollouts and the metrics of the uninterrupted run. Without the optimiser state the resumed
    update would differ (Adam's moments)."""
    rl_settings = settings(steps=3, grpo=GRPOSettings(num_iterations=2), beta=0.05)
    whole, whole_metrics = run(tiny_moe_dir, tmp_path / "whole", rl_settings)

    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(tiny_moe_dir, crashed, rl_settings, observers=[CrashAt(2)])
    assert [line["step"] for line in read_metrics(crashed)] == [0, 1, 2]
    step_0 = (crashed / "rollouts" / "step_000000.parquet").stat()
    resumed, metrics = run(tiny_moe_dir, crashed, rl_settings, start_step=2,
                           model=load_model(crashed / "checkpoints" / "step_000002"), reference=load_model(tiny_moe_dir))

    assert (crashed / "rollouts" / "step_000000.parquet").stat().st_mtime_ns == step_0.st_mtime_ns  # kept, not redone
    assert untimed(metrics) == untimed(whole_metrics)
    for step in range(4):
        assert rollout_rows(crashed, step) == rollout_rows(tmp_path / "whole", step)
    assert weights_equal(resumed.state_dict(), whole.state_dict())
    states = [torch.load(directory / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=True)
              for directory in (crashed, tmp_path / "whole")]
    assert states[0]["optimizer"]["state"].keys() == states[1]["optimizer"]["state"].keys()
    for key, moments in states[1]["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(states[0]["optimizer"]["state"][key][name], value), (key, name)


def test_resume_after_the_last_checkpoint_records_the_final_model(three_steps, tiny_moe_dir, sandbox, tmp_path):
    """Killed after checkpoint 3 but before step 3 (the final model) was recorded: resuming at 3 only records it."""
    run_dir, _, _, metrics, _ = three_steps
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)
    (killed / "rollouts" / "step_000003.parquet").unlink()
    (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in (killed / "metrics.jsonl").read_text().splitlines()[:3]))
    _, resumed = run(tiny_moe_dir, killed, settings(), start_step=3, model=load_model(killed / "checkpoints" / "step_000003"),
                     rewards=DigitRewards(FORMAT_SETS["synthetic"], sandbox, 1.0, 0.0))
    assert untimed(resumed) == untimed(metrics)
    assert rollout_rows(killed, 3) == rollout_rows(run_dir, 3)


# ----- what reaches the loss -------------------------------------------------------------------


def completion(logprobs: list[float]) -> Completion:
    return Completion(text="x", token_ids=list(range(len(logprobs))), token_logprobs=logprobs, finished=True)


def step_batch(rewards: list[float], correct: list[bool], logprobs: list[list[float]]) -> StepBatch:
    """Two prompts of two samples each."""
    problems = [Problem("p", "P?", 1.0), Problem("q", "Q?", 2.0)]
    grades = [Grade("natural_language", 1.0, ok, "correct" if ok else "wrong") for ok in correct]
    return StepBatch(problems, ["Question: P?", "Question: Q?"], [[completion(lp) for lp in logprobs[i:i + 2]] for i in (0, 2)],
                     [grades[0:2], grades[2:4]], torch.tensor(rewards).view(2, 2))


def grpo_settings(**overrides) -> RLSettings:
    mitigations = overrides.pop("mitigations", MitigationSettings())
    return RLSettings(sampling=SamplingSettings(samples_per_prompt=2), grpo=GRPOSettings(**overrides),
                      mitigations=mitigations)


def test_advantages_of_each_setting_hand_computed():
    batch = step_batch([1.0, 0.0, 0.5, 0.25], [True, False, True, True], [[-1.0, -1.0], [-3.0], [-0.5], [-2.0, -4.0]])
    # GRPO: group 1 mean 0.5, unbiased std sqrt(0.5); group 2 mean 0.375, std sqrt(0.03125).
    a1, a2 = 0.5 / (math.sqrt(0.5) + 1e-4), 0.125 / (math.sqrt(0.03125) + 1e-4)
    assert advantages_of(batch, grpo_settings()).tolist() == pytest.approx([a1, -a1, a2, -a2])
    # scale none: only centred; leave-one-out: G / (G - 1) = 2 times that
    assert advantages_of(batch, grpo_settings(scale_rewards="none")).tolist() == pytest.approx([0.5, -0.5, 0.125, -0.125])
    assert (advantages_of(batch, grpo_settings(scale_rewards="none", baseline="leave_one_out")).tolist()
            == pytest.approx([1.0, -1.0, 0.25, -0.25]))
    # batch std: rewards 1, 0, 0.5, 0.25: mean 0.4375, squared deviations sum 0.546875, / 3
    b = math.sqrt(0.546875 / 3) + 1e-4
    assert advantages_of(batch, grpo_settings(scale_rewards="batch")).tolist() == pytest.approx([0.5 / b, -0.5 / b, 0.125 / b, -0.125 / b])
    # unlikeliness (beta 0.5): likelihood = mean token log-prob of the sampler: -1, -3 | -0.5, -3. Group 1: the
    # correct first sample is the likelier: reward 1 * (1 - 0.5 * 1/2) = 0.75, against 0 -> mean 0.375, A = +-0.375/std.
    # Group 2: both correct; -0.5 is likelier: 0.5 * 0.75 = 0.375, the other keeps 0.25 -> mean 0.3125.
    u1, u2 = 0.375 / (math.sqrt(2 * 0.375**2) + 1e-4), 0.0625 / (math.sqrt(2 * 0.0625**2) + 1e-4)
    unlikely = grpo_settings(mitigations=MitigationSettings(unlikeliness_beta=0.5))
    assert advantages_of(batch, unlikely).tolist() == pytest.approx([u1, -u1, u2, -u2])
    # pass@2 over groups of 2: group 1 has one correct: R_mean = 1 - C(1,2)/C(2,2) = 1, sigma 0 -> all 0;
    # group 2 all correct: also 0. pass@1 is GRPO with the population std: +-1 in group 1, 0 in group 2.
    assert advantages_of(batch, grpo_settings(mitigations=MitigationSettings(pass_at_k=2))).tolist() == [0.0] * 4
    assert advantages_of(batch, grpo_settings(mitigations=MitigationSettings(pass_at_k=1))).tolist() == pytest.approx([1, -1, 0, 0])


def first_update_by_hand(model_dir, rl_settings) -> tuple[float, float, torch.Tensor]:
    """(loss, gradient norm, advantages) of the first update of a run: its step-0 batch sampled again with the
    same seed, the advantages computed from rl.losses' functions directly, the loss from grpo_loss on the base
    model, the gradient norm over every parameter (all train; nothing frozen)."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    prompt_set = prompt_set_for(rl_settings, tokenizer)
    batch = collect(HFEngine(model, tokenizer), prompt_set.prompter, prompt_set.batch(0), rl_settings.sampling,
                    ChecksumRewards(2), step_seed(0, 0, "sampling"))
    grpo, mitigations = rl_settings.grpo, rl_settings.mitigations
    rewards, correct = batch.rewards.flatten(), torch.tensor([g.correct for g in batch.flat_grades])
    if mitigations.pass_at_k:
        advantages = pass_at_k_advantages(correct, SAMPLES, mitigations.pass_at_k)
    else:
        if mitigations.unlikeliness_beta:
            likelihood = torch.tensor([sum(c.token_logprobs) / len(c.token_logprobs) for c in batch.flat_completions])
            rewards = unlikeliness_rewards(rewards, likelihood, correct, SAMPLES, mitigations.unlikeliness_beta)
        advantages = group_advantages(rewards, SAMPLES, grpo.scale_rewards, grpo.baseline)
    model.train()
    loss, _, _ = grpo_loss(model, PolicyBatch(pack_batch(batch, tokenizer), advantages), rl_settings,
                           aux_loss_coefficient(model, rl_settings))
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None]).norm()
    return loss.item(), grad_norm.item(), advantages


VARIANTS = {
    "grpo": {}, "dr_grpo": {"grpo": GRPOSettings(loss_type="dr_grpo")},
    "bnpo": {"grpo": GRPOSettings(loss_type="bnpo")},
    "gspo": {"grpo": GRPOSettings(importance_sampling_level="sequence")},
    "rloo": {"grpo": GRPOSettings(baseline="leave_one_out", scale_rewards="none")},
    "batch_std": {"grpo": GRPOSettings(scale_rewards="batch")},
    "unlikeliness": {"mitigations": MitigationSettings(unlikeliness_beta=0.5)},
    "pass_at_2": {"mitigations": MitigationSettings(pass_at_k=2)},
}


@pytest.fixture(scope="module")
def first_updates(tiny_moe_dir, tmp_path_factory):
    """Per variant: (the first metrics line the loop wrote, the first update's loss, gradient norm and
    advantages by hand)."""
    results = {}
    for name, overrides in VARIANTS.items():
        rl_settings = settings(steps=1, **overrides)
        _, metrics = run(tiny_moe_dir, tmp_path_factory.mktemp(name), rl_settings)
        results[name] = (metrics[0], *first_update_by_hand(tiny_moe_dir, rl_settings))
    return results


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_setting_reaches_the_first_update(variant, first_updates):
    """The loop minimised, in its first update, the loss and gradient computed by hand from the step's batch.
    On the weights that sampled every ratio is 1, so with centred advantages the policy term's value is the
    same whatever they are (it is their mean); the gradient carries them, so the gradient norm is compared."""
    line, loss, grad_norm, advantages = first_updates[variant]
    assert line["loss"] == pytest.approx(loss, abs=1e-6)
    assert line["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)  # float32 norm accumulation against float64
    # the batch gives the setting something to act on, and the setting changes the update
    baseline, _, _, baseline_advantages = first_updates["grpo"]
    assert advantages.abs().sum() > 0
    if variant == "gspo":
        # With loss_type grpo, on the weights that sampled, GSPO's gradient is GRPO's (the sequence ratio's
        # gradient is the mean of the tokens'; Zheng et al. 2025): it differs only off-policy
        # (test_gspo_differs_from_grpo_off_policy).
        assert line["grad_norm"] == pytest.approx(baseline["grad_norm"], rel=1e-4)
    elif variant != "grpo":
        assert abs(line["grad_norm"] - baseline["grad_norm"]) > 1e-3 * baseline["grad_norm"]
    if variant in ("rloo", "batch_std", "unlikeliness", "pass_at_2"):
        assert not torch.allclose(advantages, baseline_advantages)


def test_gspo_differs_from_grpo_off_policy(tiny_moe_dir, tmp_path):
    """With two passes over the batch the second is off-policy, and the sequence ratio clips and weighs whole
    sequences: the losses part."""
    lines = {}
    for level in ("token", "sequence"):
        rl_settings = settings(steps=1, grpo=GRPOSettings(num_iterations=2, importance_sampling_level=level))
        lines[level] = run(tiny_moe_dir, tmp_path / level, rl_settings)[1][0]
    assert lines["token"]["updates"] == lines["sequence"]["updates"] == 2
    assert abs(lines["token"]["loss"] - lines["sequence"]["loss"]) > 1e-5


# ----- KL, mitigations, truncated importance sampling --------------------------------------------


def test_beta_adds_the_kl_to_the_initial_model(tiny_moe_dir, tmp_path):
    _, metrics = run(tiny_moe_dir, tmp_path, settings(steps=2, beta=0.1))
    assert metrics[0]["kl_to_reference"] == 0.0  # the policy is the reference before the first update
    assert metrics[1]["kl_to_reference"] > 0 and metrics[2]["kl_to_reference"] > 0  # and so is the final model's


def test_dense_model_runs_without_routing_data(tiny_dense_dir, tmp_path):
    _, metrics = run(tiny_dense_dir, tmp_path, settings(steps=2))
    assert len(metrics) == 3 and all(line["aux_loss"] is None for line in metrics)
    assert all(r["expert_load"] is None for r in rollout_rows(tmp_path, 1))


def test_freeze_router_with_entropy_bonus_and_clip_cov(tiny_moe_dir, tmp_path):
    before = load_model(tiny_moe_dir).state_dict()
    mitigations = MitigationSettings(freeze_router=True, entropy_coef=0.01, clip_cov=True, cov_ratio=0.05)
    trained, metrics = run(tiny_moe_dir, tmp_path, settings(steps=1, mitigations=mitigations))
    after = trained.state_dict()
    gates = [name for name in after if name.endswith(".mlp.gate.weight")]
    assert gates and all(torch.equal(after[name], before[name]) for name in gates)
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert 0 < metrics[0]["clip_cov_fraction"] <= 0.1
    assert all(p.requires_grad for p in trained.parameters())  # the router trains again after the run


def test_kl_cov_with_two_iterations_per_batch(tiny_moe_dir, tmp_path):
    rl_settings = settings(steps=1, grpo=GRPOSettings(num_iterations=2),
                           mitigations=MitigationSettings(kl_cov=True, cov_ratio=0.05))
    _, metrics = run(tiny_moe_dir, tmp_path, rl_settings)
    assert metrics[0]["updates"] == 2  # one batch of rollouts, two optimiser steps
    # |log pi - log pi_old| is 0 on the first pass (the weights that sampled), > 0 on the second: the mean of both
    assert metrics[0]["kl_cov_penalty"] > 0 and metrics[0]["approx_kl"] > 0


class ShiftedSampler:
    """The transformers engine, but reporting every token's sampling log-prob `shift` lower than it was: the
    trainer then finds each sampled token exp(shift) times likelier than the "sampler" did."""

    def __init__(self, engine, shift: float):
        self.engine, self.shift = engine, shift

    def generate(self, prompts, sampling, seed, first_index=0):
        return [[Completion(c.text, c.token_ids, [lp - self.shift for lp in c.token_logprobs], c.finished) for c in group]
                for group in self.engine.generate(prompts, sampling, seed, first_index)]

    def sync_weights(self, model):
        self.engine.sync_weights(model)

    def close(self):
        pass


def test_truncated_importance_sampling(tiny_moe_dir, tmp_path):
    """Without a mismatch (float32, same weights) the weights are 1 and the loss is the uncorrected one; with the
    sampler's log-probs lowered by ln 2 every ratio is 2, capped at 1.5, so the policy loss is 1.5 times the
    uncorrected one and the mismatch is logged as max ratio 2 and KL k3(2) = 1 - ln 2."""
    plain = settings(steps=1)
    capped = settings(steps=1, tis_cap=1.5)
    _, uncorrected = run(tiny_moe_dir, tmp_path / "plain", plain)
    _, float32 = run(tiny_moe_dir, tmp_path / "float32", capped)
    assert float32[0]["policy_loss"] == pytest.approx(uncorrected[0]["policy_loss"], abs=1e-6)
    assert float32[0]["tis_capped_fraction"] == 0.0

    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    shifted = ShiftedSampler(HFEngine(model, tokenizer), LN2)
    _, corrected = run(tiny_moe_dir, tmp_path / "shifted", capped, engine=shifted, model=model)
    line = corrected[0]
    assert line["sampler_ratio_max"] == pytest.approx(2.0, rel=1e-4)
    assert line["sampler_kl"] == pytest.approx(1 - LN2, abs=1e-4)
    assert line["tis_capped_fraction"] == 1.0
    assert line["policy_loss"] == pytest.approx(1.5 * uncorrected[0]["policy_loss"], abs=1e-6)
