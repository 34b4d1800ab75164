"""DAPO dynamic sampling (rl.grpo.dynamic_sampling; rl.rollouts.dynamic_sampling): groups without reward spread are
dropped and refilled from further seeded prompts.

The selection is checked on scripted completions whose outcomes are set by hand; the integration test samples the
tiny model with the transformers engine, works out by hand which groups the step must keep, and checks the recorded
rollouts and the gradient norm of the first update against a gradient computed by hand on that batch.
"""

from __future__ import annotations

import pytest
import torch

from rl.config import GRPOSettings, RLSettings, SamplingSettings
from rl.engines import Completion, HFEngine
from rl.losses import GROUP_STD_EPSILON
from rl.rollouts import PromptSet, collect, dynamic_sampling
from rl.seeds import step_seed
from specialists.grading import Grade
from specialists.model import load_model
from specialists.tasks import TaskSettings, generate_problems
from specialists.tokenizer import load_tokenizer

from rl_helpers import ChecksumRewards, grpo_grad_norm_by_hand, make_run, prompt_set_for, read_metrics, rollout_rows

GROUP = 2


def settings(rounds: int = 3, **rl) -> RLSettings:
    return RLSettings(prompts_per_step=2, num_prompts=8, sampling=SamplingSettings(samples_per_prompt=GROUP),
                      grpo=GRPOSettings(dynamic_sampling=True, dynamic_sampling_rounds=rounds), **rl)


class ScriptedEngine:
    """Returns, for each prompt, the G completion texts `script[prompt]`; keeps the seed of every call."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.seeds = script, []

    def generate(self, prompts, sampling, seed, first_index=0):
        self.seeds.append(seed)
        return [[Completion(text, [1], [0.0], True) for text in self.script[prompt]] for prompt in prompts]


def right_or_wrong(texts, gold, group_size):
    """Reward 1 for the text "right", 0 otherwise."""
    correct = [text == "right" for text in texts]
    return torch.tensor(correct, dtype=torch.float32), [Grade("other", None, ok, "correct") for ok in correct]


class NoPrompter:
    def text(self, problem):
        return problem.id


def prompts(seed: int = 5) -> PromptSet:
    return PromptSet(generate_problems(8, 0, "train", TaskSettings()), 2, seed, NoPrompter())


def test_extra_prompts_are_seeded_and_never_repeat_within_a_step():
    prompt_set = prompts()
    own = [p.id for p in prompt_set.batch(3)]
    rounds = [[p.id for p in prompt_set.extra(3, r)] for r in (1, 2, 3, 4)]
    assert [len(r) for r in rounds] == [2, 2, 2, 0]  # 8 prompts: 2 of the step's own, 6 others, then none
    assert sorted(own + sum(rounds, [])) == sorted(p.id for p in prompt_set.problems)
    assert [[p.id for p in prompts().extra(3, r)] for r in (1, 2, 3)] == rounds[:3]  # a pure function of the seed
    assert [p.id for p in prompts(seed=6).extra(3, 1)] != rounds[0] or [p.id for p in prompts(6).extra(3, 2)] != rounds[1]


def script_for(prompt_set: PromptSet, step: int, outcomes: list[list[str]]) -> dict[str, list[str]]:
    """outcomes[k] for the k-th prompt in sampling order: the step's own two, then round 1's two, ...; prompts
    past the end of `outcomes` are left unscripted (a test that never samples them)."""
    order = prompt_set.batch(step) + sum((prompt_set.extra(step, r) for r in (1, 2, 3)), [])
    return {problem.id: texts for problem, texts in zip(order, outcomes)}


def run_dynamic(prompt_set, outcomes, rounds=3):
    config = settings(rounds)
    engine = ScriptedEngine(script_for(prompt_set, 0, outcomes))
    first = collect(engine, prompt_set.prompter, prompt_set.batch(0), config.sampling, right_or_wrong, 11)
    batch = dynamic_sampling(first, engine, prompt_set, 0, config, right_or_wrong, 9)
    return batch, engine.seeds


W, R = "wrong", "right"


def test_uniform_groups_are_replaced_by_later_groups_with_spread():
    prompt_set = prompts()
    # own: A all wrong (dropped), B mixed; round 1: C all right (dropped), D mixed -> B, D; no round 2
    batch, seeds = run_dynamic(prompt_set, [[W, W], [W, R], [R, R], [R, W], [W, R], [W, R]])
    order = prompt_set.batch(0) + prompt_set.extra(0, 1)
    assert [p.id for p in batch.problems] == [order[1].id, order[3].id]
    assert batch.rewards.tolist() == [[0.0, 1.0], [1.0, 0.0]] and batch.sampling_rounds == 2
    assert seeds == [11, step_seed(9, 0, "dynamic_sampling:1")]


def test_enough_groups_at_first_means_no_extra_round():
    batch, seeds = run_dynamic(prompts(), [[W, R], [R, W]])
    assert batch.sampling_rounds == 1 and len(seeds) == 1 and batch.rewards.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_short_of_groups_the_batch_is_topped_up_with_dropped_ones_first_sampled_first():
    prompt_set = prompts()
    # one group with spread in all three rounds (round 2's first); rounds = 2 -> 3 engine calls, then the own A
    batch, seeds = run_dynamic(prompt_set, [[W, W], [R, R], [W, W], [R, R], [R, W], [W, W]], rounds=2)
    order = prompt_set.batch(0) + prompt_set.extra(0, 1) + prompt_set.extra(0, 2)
    assert [p.id for p in batch.problems] == [order[4].id, order[0].id]
    assert batch.rewards.tolist() == [[1.0, 0.0], [0.0, 0.0]] and batch.sampling_rounds == 3 and len(seeds) == 3


def test_dynamic_sampling_is_grpo_only():  # test_config_rules runs the same refusal through `echolab run`
    with pytest.raises(ValueError, match="algorithm 'ppo' does not implement grpo.dynamic_sampling"):
        settings(algorithm="ppo")


# ----- integration: the tiny model, the transformers engine ---------------------------------------


INTEGRATION = dict(steps=1, prompts_per_step=2, num_prompts=8, learning_rate=1e-3, router_aux_loss_coef=0.0,
                   sampling=SamplingSettings(samples_per_prompt=4, max_new_tokens=24))
MODULUS = 8  # ChecksumRewards(8): about 1 in 8 completions "correct", so many groups of 4 are all wrong


def expected_step0_batch(model_dir, config: RLSettings):
    """The step-0 batch by hand: sample the step's prompts and then each round's with the run's seeds, keep the
    groups whose rewards differ, in sampling order, the first prompts_per_step of them."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    prompt_set, engine = prompt_set_for(config, tokenizer), HFEngine(model, tokenizer)
    rounds = [(prompt_set.batch(0), step_seed(0, 0, "sampling"))] + [
        (prompt_set.extra(0, r), step_seed(0, 0, f"dynamic_sampling:{r}")) for r in range(1, 4)]
    kept, sampled, own_uniform = [], 0, None
    for problems, seed in rounds:
        batch = collect(engine, prompt_set.prompter, problems, config.sampling, ChecksumRewards(MODULUS), seed)
        sampled += 1
        spread = [(batch.problems[g], batch.completions[g], batch.rewards[g]) for g in range(len(problems))
                  if batch.rewards[g].max() != batch.rewards[g].min()]
        own_uniform = len(problems) - len(spread) if own_uniform is None else own_uniform
        kept += spread
        if len(kept) >= config.prompts_per_step:
            break
    return kept[:config.prompts_per_step], sampled, own_uniform, prompt_set, tokenizer, model


def grad_norm_by_hand(model, tokenizer, prompt_set, kept) -> float:
    """The first GRPO update's gradient norm on the kept groups (rl_helpers.grpo_grad_norm_by_hand), with
    A_i = (r_i - mean_g r) / (std_g r + 1e-4) (Bessel std)."""
    prompt_ids, completion_ids, advantages = [], [], []
    for problem, completions, rewards in kept:
        ids = tokenizer(prompt_set.prompter.text(problem), add_special_tokens=False)["input_ids"]
        group_advantages = (rewards - rewards.mean()) / (rewards.std() + GROUP_STD_EPSILON)
        for completion, advantage in zip(completions, group_advantages, strict=True):
            prompt_ids.append(ids)
            completion_ids.append(list(completion.token_ids))
            advantages.append(advantage.item())
    return grpo_grad_norm_by_hand(model, prompt_ids, completion_ids, tokenizer.pad_token_id, advantages)


@pytest.mark.integration
def test_the_first_update_trains_on_the_refilled_groups(tiny_moe_dir, tmp_path):
    from rl.training import train

    config = RLSettings(grpo=GRPOSettings(dynamic_sampling=True), **INTEGRATION)
    kept, sampled, own_uniform, prompt_set, tokenizer, model = expected_step0_batch(tiny_moe_dir, config)
    assert own_uniform >= 1 and sampled >= 2  # the seed exercises a drop and a refill
    train(make_run(tiny_moe_dir, tmp_path / "dynamic", config, rewards=ChecksumRewards(MODULUS)))
    train(make_run(tiny_moe_dir, tmp_path / "plain", RLSettings(**INTEGRATION), rewards=ChecksumRewards(MODULUS)))
    dynamic, plain = read_metrics(tmp_path / "dynamic"), read_metrics(tmp_path / "plain")

    rows = rollout_rows(tmp_path / "dynamic", 0)
    assert [(r["prompt_id"], r["completion"]) for r in rows] == [
        (problem.id, completion.text) for problem, completions, _ in kept for completion in completions]
    assert dynamic[0]["sampling_rounds"] == sampled and dynamic[0]["frac_reward_zero_std"] == 0.0
    assert plain[0]["sampling_rounds"] == 1 and plain[0]["frac_reward_zero_std"] == own_uniform / 2
    expected = grad_norm_by_hand(model, tokenizer, prompt_set, kept)
    assert dynamic[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert abs(plain[0]["grad_norm"] - expected) > 1e-3 * expected  # without the switch the update differs
    # the final model's step is never filtered: its own prompts, one round
    final = rollout_rows(tmp_path / "dynamic", 1)
    assert dynamic[1]["sampling_rounds"] == 1
    assert sorted({r["prompt_id"] for r in final}) == sorted(p.id for p in prompt_set.batch(1))
