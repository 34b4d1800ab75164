"""The sequence KL in the reward (rl.mitigations.sequence_kl_coef): r <- r - coef * log pi_old(y) / pi_ref(y).

At step 0 the policy is the base, so the penalty is 0; the test compares the second update of two runs that differ
only in the switch, with the once-updated model (checkpoint 1) and the step-1 batch sampled again by hand: GRPO's
gradient norm on the first pass is computed by hand from the penalised rewards; for PPO the logged sequence KL is
checked by hand and the update only shown to change (its value head makes the by-hand update long).
"""

from __future__ import annotations

import pytest
import torch

from rl.config import PPOSettings, RLSettings, SamplingSettings
from rl.engines import HFEngine
from rl.losses import GROUP_STD_EPSILON
from rl.rollouts import collect, token_ids
from rl.seeds import step_seed
from rl.sequences import pack
from rl.training import train
from specialists.model import load_model
from specialists.tokenizer import load_tokenizer

from rl_helpers import ChecksumRewards, grpo_grad_norm_by_hand, make_run, prompt_set_for, read_metrics

pytestmark = pytest.mark.integration

COEF, GROUP = 2.0, 4
TOLERANCE = 1e-5


def settings(algorithm: str, coef: float) -> RLSettings:
    return RLSettings(algorithm=algorithm, steps=2, prompts_per_step=2, num_prompts=8, learning_rate=1e-3,
                      checkpoint_every=1, router_aux_loss_coef=0.0,
                      sampling=SamplingSettings(samples_per_prompt=GROUP, max_new_tokens=24),
                      ppo=PPOSettings(epochs=1, minibatches=1), mitigations={"sequence_kl_coef": coef})


@torch.no_grad()
def step1_by_hand(model_dir, run_dir, config):
    """The step-1 batch sampled again by the model after one update, its rewards (ChecksumRewards(2)) and each
    completion's sum_t log p(y_t) - log q(y_t), p that model, q the base (temperature 1)."""
    model, base, tokenizer = (load_model(run_dir / "checkpoints" / "step_000001"), load_model(model_dir),
                              load_tokenizer(model_dir))
    prompt_set = prompt_set_for(config, tokenizer)
    batch = collect(HFEngine(model, tokenizer), prompt_set.prompter, prompt_set.batch(1), config.sampling,
                    ChecksumRewards(2), step_seed(0, 1, "sampling"))
    prompt_ids, completion_ids = token_ids(batch, tokenizer)
    input_ids, attention_mask, completion_mask = pack(prompt_ids, completion_ids, tokenizer.pad_token_id)
    p, q = (m(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double().log_softmax(-1)
            .gather(-1, input_ids[:, 1:, None]).squeeze(-1) for m in (model, base))
    sequence_kl = ((p - q) * completion_mask[:, 1:]).sum(-1)
    return batch.rewards.flatten().double(), sequence_kl, prompt_ids, completion_ids, tokenizer


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_sequence_kl_is_subtracted_from_the_reward(tiny_moe_dir, tmp_path, algorithm):
    penalised, plain = settings(algorithm, COEF), settings(algorithm, 0.0)
    train(make_run(tiny_moe_dir, tmp_path / "penalised", penalised))
    train(make_run(tiny_moe_dir, tmp_path / "plain", plain))
    with_kl, without = read_metrics(tmp_path / "penalised"), read_metrics(tmp_path / "plain")
    rewards, sequence_kl, prompt_ids, completion_ids, tokenizer = step1_by_hand(tiny_moe_dir, tmp_path / "penalised",
                                                                                 penalised)
    assert with_kl[0]["sequence_kl"] == pytest.approx(0.0, abs=1e-5)  # the base against itself
    assert with_kl[0]["grad_norm"] == pytest.approx(without[0]["grad_norm"], rel=1e-5)  # so the same first update
    assert sequence_kl.abs().max() > 1e-2  # one update moved the completions' likelihood measurably
    assert with_kl[1]["sequence_kl"] == pytest.approx(sequence_kl.mean().item(), abs=TOLERANCE)
    assert without[1]["sequence_kl"] is None
    if algorithm == "grpo":
        # A_i = (r_i - mean_g r) / (std_g r + 1e-4) on r_i = reward_i - coef * sequence_kl_i
        shaped = (rewards - COEF * sequence_kl).view(-1, GROUP)
        advantages = ((shaped - shaped.mean(1, keepdim=True)) / (shaped.std(1, keepdim=True) + GROUP_STD_EPSILON))
        model = load_model(tmp_path / "penalised" / "checkpoints" / "step_000001")
        expected = grpo_grad_norm_by_hand(model, prompt_ids, completion_ids, tokenizer.pad_token_id,
                                          advantages.flatten().tolist())
        assert with_kl[1]["grad_norm"] == pytest.approx(expected, rel=1e-4)
        assert abs(without[1]["grad_norm"] - expected) > 1e-3 * expected
    else:
        # the penalised reward sits on the last token: the returns the value head fits and the whitened advantages
        # change (the policy loss of a first pass is -mean A = 0 either way, so its gradient norm shows it)
        assert with_kl[1]["value_loss"] != pytest.approx(without[1]["value_loss"], rel=1e-3)
        assert with_kl[1]["grad_norm"] != pytest.approx(without[1]["grad_norm"], rel=1e-3)
