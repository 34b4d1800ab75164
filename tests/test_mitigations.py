"""Each mitigation switch (rl/config.py MitigationSettings) changes the loss or the reward as its source says.

Where each switch is tested (`here` = this file):

- entropy_coef: here, the GRPO and the PPO loss change by exactly -coef * mean token entropy;
  test_losses::test_token_entropy; test_grpo_parity (TRL's entropy bonus).
- clip_cov (with cov_ratio): test_losses::test_clip_cov_*; test_grpo::test_freeze_router_with_entropy_bonus_and_clip_cov;
  test_ppo::test_mitigations_and_frozen_router.
- kl_cov (with cov_ratio, kl_cov_coef): test_losses::test_kl_cov_*; test_grpo::test_kl_cov_with_two_iterations_per_batch;
  test_ppo::test_mitigations_and_frozen_router.
- format_diversity_coef: test_losses::test_format_diversity_bonus; here, rl.rollouts.Rewards adds it to the reward.
- unlikeliness_beta, pass_at_k: test_losses::test_unlikeliness_rewards_* / test_pass_at_k_*;
  test_grpo::test_advantages_of_each_setting_hand_computed and test_each_setting_reaches_the_first_update.
- freeze_router: test_grpo::test_freeze_router_with_entropy_bonus_and_clip_cov; test_ppo::test_mitigations_and_frozen_router;
  here for Expert Iteration.
- pretrain_replay_coef (with pretrain_replay_batch): here, the NLL by hand, the GRPO and the PPO loss change by exactly
  coef * NLL, 2-step runs log replay_loss.
- prefix_kl_coef (with prefix_kl_tokens): test_losses::test_prefix_*; here, the GRPO and the PPO loss of the second
  update change by exactly coef * the prefix KL of the once-updated model, computed by hand (the first update's is 0).
- sequence_kl_coef: test_losses::test_sequence_log_ratio_*; tests/test_sequence_kl.py, the second update of GRPO
  (gradient norm by hand) and PPO (the logged sequence KL by hand).
- format_kl_coef, outcome_exploration_coef (with outcome_exploration_mode): test_losses::test_format_kl_shares_* /
  test_historical_exploration_bonus_* / test_batch_exploration_penalty_*; tests/test_reward_shaping.py, the state across
  steps by hand, GRPO's gradient norm of steps 0 and 1 and PPO's first value loss by hand, resume.
- grpo.dynamic_sampling (with dynamic_sampling_rounds): tests/test_dynamic_sampling.py, the selection on scripted
  outcomes and the first update's gradient norm on the refilled batch by hand.
Which algorithm accepts which switch is a rule of the config (refused when it is loaded), not of the loops.

The loss checks compare the first update of two runs that differ only in the switch (one optimiser step per
step: its `loss` metric is the minimised loss): same seed, same rollouts, same weights, so the losses differ by
the switch's term alone, which the test computes itself from the base model.
"""

from __future__ import annotations

import math

import pytest
import torch

from rl.config import ExpertIterationSettings, MitigationSettings, PPOSettings, RLSettings, SamplingSettings
from rl.engines import HFEngine
from rl.replay import PretrainReplay
from rl.rollouts import Rewards, collect, token_ids
from rl.seeds import step_seed
from rl.sequences import pack
from rl.training import train
from specialists.config import PretrainSettings, SpecialistsConfig
from specialists.formats import FORMAT_SETS
from specialists.model import load_model
from specialists.pretrain import build_corpus
from specialists.tasks import TaskSettings, generate_problems
from specialists.tokenizer import load_tokenizer

from rl_helpers import ChecksumRewards, make_run, prompt_set_for, read_metrics


pytestmark = pytest.mark.integration

ENTROPY_COEF, REPLAY_COEF, REPLAY_BATCH = 0.1, 0.5, 4
PREFIX_KL_COEF, PREFIX_KL_TOKENS = 10.0, 3  # a large coefficient: one update's KL is small
TOLERANCE = 1e-5  # float32 losses of order 1


def rl_settings(algorithm: str, steps: int = 2, checkpoint_every: int = 10, **mitigations) -> RLSettings:
    return RLSettings(algorithm=algorithm, steps=steps, prompts_per_step=2, num_prompts=8, learning_rate=1e-3,
                      checkpoint_every=checkpoint_every,
                      sampling=SamplingSettings(samples_per_prompt=4, max_new_tokens=24),
                      ppo=PPOSettings(epochs=1, minibatches=1),  # one update per PPO step
                      expert_iteration=ExpertIterationSettings(sft_epochs=1, start_from="latest"),
                      mitigations=MitigationSettings(pretrain_replay_batch=REPLAY_BATCH, **mitigations))


@pytest.fixture(scope="module")
def replay_texts():
    """Texts of the pretraining mixture, as the pipeline passes them (specialists.pretrain.build_corpus)."""
    return [example.text for example in build_corpus(SpecialistsConfig(pretrain=PretrainSettings(num_examples=40)))]


def run(model_dir, run_dir, settings, replay_texts=None):
    """rl.training.train as the pipeline calls it, with the transformers engine and ChecksumRewards(2); returns
    the trained model."""
    return train(make_run(model_dir, run_dir, settings, replay_texts=replay_texts))


@torch.no_grad()
def nll_by_hand(model, token_ids: list[list[int]]) -> float:
    """Mean token NLL of the texts, each run alone (no padding): sum_b sum_{t>=1} -log p(x_bt | x_b,<t) / sum_b (|x_b| - 1)."""
    total, count = 0.0, 0
    for ids in token_ids:
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
        total -= logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        count += len(ids) - 1
    return total / count


def mean_entropy_by_hand(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the masked positions of H = -sum_v p_v log p_v of each next-token distribution."""
    logprobs = logits.double().log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return ((entropy * mask).sum() / mask.sum()).item()


def step0_replay_nll(model_dir, replay_texts) -> float:
    """The replay NLL of the first update (step 0, update 0) under the base model, computed by hand."""
    tokenizer = load_tokenizer(model_dir)
    replay = PretrainReplay.from_texts(replay_texts, tokenizer, REPLAY_BATCH, seed=0)  # seeded with the run's seed
    return nll_by_hand(load_model(model_dir), [replay.token_ids[i] for i in replay.indices(0, 0)])


# ----- pretraining replay: the loss term by hand ------------------------------------------------


def test_replay_batches_are_seeded_and_the_loss_is_the_mean_token_nll(tiny_moe_dir, replay_texts):
    tokenizer, model = load_tokenizer(tiny_moe_dir), load_model(tiny_moe_dir)
    replay = PretrainReplay.from_texts(replay_texts, tokenizer, 3, seed=7)
    chosen = replay.indices(5, 1)
    assert len(set(chosen)) == 3 and replay.indices(5, 1) == chosen  # without replacement; a pure function
    assert {tuple(replay.indices(step, update)) for step in range(3) for update in range(3)} != {tuple(chosen)}
    with torch.no_grad():
        nll = replay.loss(model, 5, 1).item()  # padded batch, as in training
    assert nll == pytest.approx(nll_by_hand(model, [replay.token_ids[i] for i in chosen]), abs=TOLERANCE)
    small = PretrainReplay.from_texts(replay_texts[:2], tokenizer, 8, seed=0)
    assert sorted(small.indices(0)) == [0, 1]  # fewer texts than a batch: all of them


@torch.no_grad()
def step1_prefix_kl(model_dir, run_dir, settings, per_sequence: bool) -> float:
    """The prefix KL of the step-1 update, by hand: the model after one update (checkpoint 1) samples the step-1
    batch again with the run's seed; k3 = exp(log q - log p) - (log q - log p) - 1 of each of the first
    PREFIX_KL_TOKENS completion tokens, p that model and q the base, at the sampling temperature; then averaged as
    the policy loss is: per_sequence (GRPO's loss_type grpo) the mean over completions of (prefix sum / completion
    length), else (PPO) the prefix sum over all completion tokens."""
    model, base, tokenizer = load_model(run_dir / "checkpoints" / "step_000001"), load_model(model_dir), load_tokenizer(model_dir)
    prompt_set = prompt_set_for(settings, tokenizer)
    batch = collect(HFEngine(model, tokenizer), prompt_set.prompter, prompt_set.batch(1), settings.sampling,
                    ChecksumRewards(2), step_seed(0, 1, "sampling"))
    input_ids, attention_mask, completion_mask = pack(*token_ids(batch, tokenizer), tokenizer.pad_token_id)
    targets, mask = input_ids[:, 1:], completion_mask[:, 1:].bool()
    temperature = settings.sampling.temperature
    p, q = ((m(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double() / temperature)
            .log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) for m in (model, base))
    k3 = torch.exp(q - p) - (q - p) - 1
    per_row, tokens = [], 0
    for row in range(len(input_ids)):
        positions = mask[row].nonzero().squeeze(-1).tolist()
        per_row.append(sum(k3[row, t].item() for t in positions[:PREFIX_KL_TOKENS]) / (len(positions) if per_sequence else 1))
        tokens += len(positions)
    return sum(per_row) / len(per_row) if per_sequence else sum(per_row) / tokens


def check_prefix_kl(baseline: list[dict], prefix: list[dict], by_hand: float) -> None:
    # Step 0: the policy is the base, so k3 = 0 and so is its gradient (dk3/dlog p = 1 - q/p): both runs make the
    # same first update (up to float noise between the policy's and the frozen copy's forwards) and sample the same
    # step-1 batch. Step 1: the loss differs by coef x the prefix KL of the updated policy.
    assert prefix[0]["prefix_kl"] == pytest.approx(0.0, abs=1e-6)
    assert prefix[0]["loss"] == pytest.approx(baseline[0]["loss"], abs=TOLERANCE)
    assert by_hand > 1e-4  # the update moved the prefix tokens measurably
    assert prefix[1]["prefix_kl"] == pytest.approx(by_hand, abs=TOLERANCE)
    assert prefix[1]["loss"] - baseline[1]["loss"] == pytest.approx(PREFIX_KL_COEF * by_hand, abs=TOLERANCE * PREFIX_KL_COEF)
    assert prefix[1]["policy_loss"] == pytest.approx(baseline[1]["policy_loss"], abs=TOLERANCE)
    assert baseline[1]["prefix_kl"] is None and prefix[2]["prefix_kl"] is None  # off, and no update at the end


def prefix_kl_settings(algorithm: str) -> RLSettings:
    return rl_settings(algorithm, checkpoint_every=1, prefix_kl_coef=PREFIX_KL_COEF, prefix_kl_tokens=PREFIX_KL_TOKENS)


# ----- PPO: three runs that differ only in a switch ---------------------------------------------


@pytest.fixture(scope="module")
def ppo_runs(tiny_moe_dir, replay_texts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ppo-mitigations")
    run(tiny_moe_dir, directory / "baseline", rl_settings("ppo"))
    run(tiny_moe_dir, directory / "entropy", rl_settings("ppo", steps=1, entropy_coef=ENTROPY_COEF))
    run(tiny_moe_dir, directory / "replay", rl_settings("ppo", pretrain_replay_coef=REPLAY_COEF), replay_texts)
    run(tiny_moe_dir, directory / "prefix_kl", prefix_kl_settings("ppo"))
    return {name: read_metrics(directory / name) for name in ("baseline", "entropy", "replay", "prefix_kl")} | {
        "directory": directory}


def step0_entropy(model_dir, settings) -> float:
    """Mean token entropy of the base model over the step-0 batch, sampled again with the run's seed (the first
    update of PPO with one minibatch, and of GRPO, sees that whole batch)."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    prompt_set = prompt_set_for(settings, tokenizer)
    batch = collect(HFEngine(model, tokenizer), prompt_set.prompter, prompt_set.batch(0), settings.sampling,
                    ChecksumRewards(2), step_seed(0, 0, "sampling"))
    # a plain right-padded forward, not the loop's packed one
    input_ids, attention_mask, completion_mask = pack(*token_ids(batch, tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return mean_entropy_by_hand(logits / settings.sampling.temperature, completion_mask[:, 1:])


def test_entropy_bonus_changes_the_ppo_loss_by_minus_coef_times_entropy(ppo_runs, tiny_moe_dir):
    entropy = step0_entropy(tiny_moe_dir, rl_settings("ppo"))
    baseline, bonus = ppo_runs["baseline"][0], ppo_runs["entropy"][0]
    assert bonus["entropy"] == pytest.approx(entropy, abs=TOLERANCE) == baseline["entropy"]
    assert bonus["loss"] - baseline["loss"] == pytest.approx(-ENTROPY_COEF * entropy, abs=TOLERANCE)
    assert bonus["policy_loss"] == baseline["policy_loss"] and bonus["value_loss"] == baseline["value_loss"]


def test_pretrain_replay_changes_the_ppo_loss_by_coef_times_nll(ppo_runs, tiny_moe_dir, replay_texts):
    nll = step0_replay_nll(tiny_moe_dir, replay_texts)
    baseline, replay = ppo_runs["baseline"], ppo_runs["replay"]
    assert replay[0]["replay_loss"] == pytest.approx(nll, abs=TOLERANCE)
    assert replay[0]["loss"] - baseline[0]["loss"] == pytest.approx(REPLAY_COEF * nll, abs=TOLERANCE)
    assert replay[0]["policy_loss"] == baseline[0]["policy_loss"]
    # every update step of the 2-step run logs its replay loss; without the switch, or without an update, it is null
    assert len(replay) == 3 and all(math.isfinite(m["replay_loss"]) and m["replay_loss"] > 0 for m in replay[:2])
    assert all(m["replay_loss"] is None for m in baseline) and replay[2]["replay_loss"] is None


def test_prefix_kl_changes_the_ppo_loss_by_coef_times_the_prefix_kl(ppo_runs, tiny_moe_dir):
    # PPO's policy loss is the token mean over the minibatch (here the whole batch): so is the prefix KL
    by_hand = step1_prefix_kl(tiny_moe_dir, ppo_runs["directory"] / "prefix_kl", prefix_kl_settings("ppo"), per_sequence=False)
    check_prefix_kl(ppo_runs["baseline"], ppo_runs["prefix_kl"], by_hand)
    assert ppo_runs["prefix_kl"][1]["value_loss"] == pytest.approx(ppo_runs["baseline"][1]["value_loss"], abs=TOLERANCE)


# ----- GRPO: the same --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_runs(tiny_moe_dir, replay_texts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("grpo-mitigations")
    run(tiny_moe_dir, directory / "baseline", rl_settings("grpo"))
    run(tiny_moe_dir, directory / "entropy", rl_settings("grpo", steps=1, entropy_coef=ENTROPY_COEF))
    run(tiny_moe_dir, directory / "replay", rl_settings("grpo", pretrain_replay_coef=REPLAY_COEF), replay_texts)
    run(tiny_moe_dir, directory / "prefix_kl", prefix_kl_settings("grpo"))
    return {name: read_metrics(directory / name) for name in ("baseline", "entropy", "replay", "prefix_kl")} | {
        "directory": directory}


def test_entropy_bonus_changes_the_grpo_loss_by_minus_coef_times_entropy(grpo_runs, tiny_moe_dir):
    # GRPO's entropy, as TRL's: mean over the completion tokens of the entropy of pi(. | prompt, y_<t) at the
    # sampling temperature (test_grpo_parity checks the term against TRL's)
    entropy = step0_entropy(tiny_moe_dir, rl_settings("grpo"))
    baseline, bonus = grpo_runs["baseline"][0], grpo_runs["entropy"][0]
    assert bonus["entropy"] == pytest.approx(entropy, abs=TOLERANCE) == baseline["entropy"]
    assert bonus["loss"] - baseline["loss"] == pytest.approx(-ENTROPY_COEF * entropy, abs=TOLERANCE)
    assert bonus["policy_loss"] == baseline["policy_loss"]


def test_pretrain_replay_changes_the_grpo_loss_by_coef_times_nll(grpo_runs, tiny_moe_dir, replay_texts):
    nll = step0_replay_nll(tiny_moe_dir, replay_texts)
    baseline, replay = grpo_runs["baseline"], grpo_runs["replay"]
    assert replay[0]["replay_loss"] == pytest.approx(nll, abs=TOLERANCE)
    assert replay[0]["loss"] - baseline[0]["loss"] == pytest.approx(REPLAY_COEF * nll, abs=TOLERANCE)
    assert replay[0]["policy_loss"] == baseline[0]["policy_loss"]
    updated = replay[:2]  # the last line is the final model's, without an update
    assert len(replay) == 3 and all(math.isfinite(m["replay_loss"]) and m["replay_loss"] > 0 for m in updated)
    assert all(m["replay_loss"] is None for m in baseline) and replay[2]["replay_loss"] is None


def test_prefix_kl_changes_the_grpo_loss_by_coef_times_the_prefix_kl(grpo_runs, tiny_moe_dir):
    # loss_type grpo: each completion's mean over its tokens, then the mean over completions; on the first pass the
    # importance ratio weighting the KL is 1
    by_hand = step1_prefix_kl(tiny_moe_dir, grpo_runs["directory"] / "prefix_kl", prefix_kl_settings("grpo"), per_sequence=True)
    check_prefix_kl(grpo_runs["baseline"], grpo_runs["prefix_kl"], by_hand)


def test_pretrain_replay_needs_the_texts(tiny_moe_dir, tmp_path):
    for algorithm in ("ppo", "grpo"):
        with pytest.raises(ValueError, match="Run.replay"):
            run(tiny_moe_dir, tmp_path / algorithm, rl_settings(algorithm, pretrain_replay_coef=REPLAY_COEF))


# ----- freeze_router in Expert Iteration; the format-diversity reward -----------------------------


def test_freeze_router_keeps_the_router_in_expert_iteration(tiny_moe_dir, tmp_path):
    base = load_model(tiny_moe_dir).state_dict()
    trained = run(tiny_moe_dir, tmp_path, rl_settings("ei", steps=1, freeze_router=True))
    after = trained.state_dict()
    gates = [name for name in after if name.endswith(".mlp.gate.weight")]
    assert gates and all(torch.equal(after[name], base[name]) for name in gates)
    assert not torch.equal(after["lm_head.weight"], base["lm_head.weight"])
    assert all(p.requires_grad for p in trained.parameters())  # unfrozen after the run


def test_format_diversity_bonus_is_added_to_the_reward():
    formats = FORMAT_SETS["synthetic"]
    language = next(f for f in formats if f.name == "natural_language")
    problem = generate_problems(1, 0, "train", TaskSettings())[0]
    solution = language.render(problem, "easy")
    texts = [solution, solution, solution, "no idea"]
    gold = [problem.answer, problem.answer, problem.answer + 1, problem.answer]  # the third is graded wrong
    # natural_language 3 of 4 in the group: each correct one earns 0.5 * (1 - 3/4); wrong ones and "other" nothing
    rewards, grades = Rewards(formats, sandbox=None, reward_scale=2.0, format_diversity_coef=0.5)(texts, gold, 4)
    assert [g.correct for g in grades] == [True, True, False, False]
    assert rewards.tolist() == pytest.approx([2.125, 2.125, 0.0, 0.0])
