"""PPO, GRPO and Expert Iteration, 3 steps each, with the session's vLLM engine (tests/conftest.py `vllm_moe`);
GRPO and PPO, 2 steps each, with bfloat16 rollouts and truncated importance sampling (`vllm_moe_bf16`).

The other algorithm tests use the transformers engine, which samples from the training model itself; here
the rollouts come from vLLM, so the weights must be pushed into it after the updates (rl/weight_sync.py).
Each run goes through rl.training.train (as the pipeline calls it) and checks the run directory and the
sync: the log-probability vLLM reported for every completion it sampled at step s equals the teacher-forced
one under checkpoint s (the model after s updates; the base model at step 0; step 3 is the final model,
sampled without an update), so the engine served the weights of every step of the algorithm's loop; the
logged train/inference mismatch of float32 rollouts is nil; and after training the engine serves the
returned model. With bfloat16 rollouts the mismatch is real: the logged sampler_kl, sampler_ratio_max and
tis_capped_fraction are checked against their definitions on the engine's log-probs and the checkpoints'.
"""

from __future__ import annotations


import pytest
import torch

from rl.config import EngineSettings, PPOSettings, RLSettings, SamplingSettings
from rl.training import train
from specialists.model import load_model
from specialists.tasks import prompt_text
from specialists.tokenizer import load_tokenizer

from rl_helpers import (BF16_STALE, BF16_TOLERANCE, RecordingEngine, check_run_directory,
                        completion_logprob, hf_token_logprobs, make_run, prompt_set_for, read_metrics,
                        vllm_token_logprobs, weights_equal)

pytest.importorskip("vllm")

pytestmark = pytest.mark.integration

STEPS, PROMPTS, SAMPLES = 3, 2, 4
BF16_STEPS = 2
TOLERANCE = 1e-3  # max |logprob difference| vLLM vs transformers (both float32; they agree to ~1e-5)


@pytest.fixture
def engine(vllm_moe, tiny_moe_dir):
    """`vllm_moe` for one run; afterwards it serves the checkpoint's weights again (conftest's contract)."""
    yield RecordingEngine(vllm_moe)
    vllm_moe.sync_weights(load_model(tiny_moe_dir))


def max_difference(engine, model, sequences) -> float:
    return (vllm_token_logprobs(engine.engine.llm, sequences) - hf_token_logprobs(model, sequences)).abs().max().item()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "ei"])
def test_three_steps_with_vllm(algorithm, engine, tiny_moe_dir, tmp_path):
    settings = RLSettings(algorithm=algorithm, steps=STEPS, prompts_per_step=PROMPTS, num_prompts=8, learning_rate=1e-3,
                          checkpoint_every=1, sampling=SamplingSettings(samples_per_prompt=SAMPLES, max_new_tokens=32))
    tokenizer = load_tokenizer(tiny_moe_dir)
    trained = train(make_run(tiny_moe_dir, tmp_path, settings, engine=engine))

    metrics = check_run_directory(tmp_path, trained.config, steps=STEPS, rows_per_step=PROMPTS * SAMPLES,
                                  checkpoints=[1, 2, 3], algorithm=algorithm)
    assert metrics == read_metrics(tmp_path)
    for line in metrics:  # float32 vLLM against the float32 trainer: no train/inference mismatch to speak of
        assert line["sampler_kl"] < 1e-5 and abs(line["sampler_ratio_max"] - 1) < 1e-2

    # The engine sampled step s with the weights of the model after s updates (and not those of s - 1).
    assert len(engine.calls) == STEPS + 1
    models = [load_model(tiny_moe_dir)] + [load_model(tmp_path / "checkpoints" / f"step_{s:06d}") for s in (1, 2, 3)]
    for step, (prompts, groups) in enumerate(engine.calls):
        errors, stale = [], []
        for prompt, group in zip(prompts, groups, strict=True):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for completion in group:  # temperature 1: the sampling log-probs are the raw ones
                served = sum(completion.token_logprobs)
                errors.append(abs(completion_logprob(models[step], prompt_ids, completion.token_ids) - served))
                if step > 0:
                    stale.append(abs(completion_logprob(models[step - 1], prompt_ids, completion.token_ids) - served))
        assert max(errors) <= TOLERANCE, (step, max(errors))
        assert step == 0 or max(stale) > 10 * TOLERANCE, (step, max(stale))  # the weights did move

    # After training the engine serves the trained model: one fixed prompt + completion, token by token.
    problem = prompt_set_for(settings, tokenizer).problems[0]
    fixed = [tokenizer(prompt_text(problem) + "The answer is 42.", add_special_tokens=False)["input_ids"]]
    assert max_difference(engine, trained, fixed) <= TOLERANCE
    assert max_difference(engine, models[0], fixed) > 10 * TOLERANCE
    assert weights_equal(trained.state_dict(), models[3].state_dict())  # the last checkpoint is the returned model



# bfloat16 rollouts (`[rl.engine] dtype = "bfloat16"`, the session's `vllm_moe_bf16`): GRPO and PPO with truncated
# importance sampling, 2 updates each, checked against the definitions computed here from what the engine returned.


@pytest.fixture
def bfloat16_engine(vllm_moe_bf16, tiny_moe_dir):
    """`vllm_moe_bf16` for one run; afterwards it serves the checkpoint's weights again (conftest's contract)."""
    yield RecordingEngine(vllm_moe_bf16)
    vllm_moe_bf16.sync_weights(load_model(tiny_moe_dir))


def log_ratios(model, tokenizer, prompts, groups) -> torch.Tensor:
    """log r_t = log pi_train(y_t) - log pi_sampler(y_t) of every sampled token (flat, all completions): float32
    teacher-forced under `model` (temperature 1) minus the log-prob the engine reported when it sampled the token."""
    values = []
    for prompt, group in zip(prompts, groups, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for completion in group:
            train_logprobs = hf_token_logprobs(model, [prompt_ids + completion.token_ids])[0, len(prompt_ids) - 1:]
            values.append(train_logprobs - torch.tensor(completion.token_logprobs))
    return torch.cat(values)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_bfloat16_rollouts_with_truncated_importance_sampling(algorithm, bfloat16_engine, tiny_moe_dir, tmp_path):
    """Per step s, from the engine's reported log-probs and checkpoint s's float32 teacher-forced ones (the model
    that sampled step s; the trainer's pi_old): the logged sampler_kl is the mean token k3 = (r - 1) - log r,
    r = pi_train / pi_sampler, and > 0; sampler_ratio_max is max r; tis_capped_fraction is the share of tokens
    with r above the cap. The engine sampled each step with that checkpoint rounded to bfloat16 (BF16_TOLERANCE), not with the one before
    (BF16_STALE)."""
    tokenizer = load_tokenizer(tiny_moe_dir)
    base = load_model(tiny_moe_dir)
    sampling = SamplingSettings(samples_per_prompt=SAMPLES, max_new_tokens=32)
    common = dict(algorithm=algorithm, steps=BF16_STEPS, prompts_per_step=PROMPTS, num_prompts=8, learning_rate=1e-3,
                  checkpoint_every=1, sampling=sampling, engine=EngineSettings(dtype="bfloat16", kv_cache_gib=0.25),
                  # one PPO minibatch: its tis_capped_fraction is then the step's share, not a mean of minibatch shares
                  ppo=PPOSettings(minibatches=1))
    # The cap from the data: the first step's prompts sampled once with another seed; the cap is the median ratio of
    # the tokens the trainer finds likelier than the sampler (r > 1), so some tokens hit it and most do not.
    prompt_set = prompt_set_for(RLSettings(**common), tokenizer)
    prompts = [prompt_set.prompter.text(problem) for problem in prompt_set.batch(0)]
    calibration = log_ratios(base, tokenizer, prompts, bfloat16_engine.engine.generate(prompts, sampling, seed=12345))
    cap = calibration[calibration > 0].median().exp().item()
    trained = train(make_run(tiny_moe_dir, tmp_path, RLSettings(**common, tis_cap=cap), engine=bfloat16_engine))

    metrics = check_run_directory(tmp_path, trained.config, steps=BF16_STEPS, rows_per_step=PROMPTS * SAMPLES,
                                  checkpoints=list(range(1, BF16_STEPS + 1)), algorithm=algorithm)
    models = [base] + [load_model(tmp_path / "checkpoints" / f"step_{s:06d}") for s in range(1, BF16_STEPS + 1)]
    assert len(bfloat16_engine.calls) == BF16_STEPS + 1
    for step, (prompts, groups) in enumerate(bfloat16_engine.calls):
        line, log_r = metrics[step], log_ratios(models[step], tokenizer, prompts, groups)
        ratio = log_r.exp()
        # The trainer's packed forward and this teacher-forced one agree to ~1e-6 per token; the KL is a mean of
        # ~(log r)^2 / 2 with |log r| ~ 1e-3..1e-2, so those 1e-6 move it by ~1e-3 relative and r by ~1e-6.
        assert line["sampler_kl"] > 0
        assert line["sampler_kl"] == pytest.approx((ratio - 1 - log_r).mean().item(), rel=1e-2)
        assert line["sampler_ratio_max"] == pytest.approx(ratio.max().item(), abs=1e-4)
        if step < BF16_STEPS:  # an update step; the final model's step has no loss to reweight
            # tokens within 1e-5 of the cap could fall either side of it in the trainer's forward
            at_least, at_most = ((ratio > cap * (1 + 1e-5)).float().mean().item(),
                                 (ratio > cap * (1 - 1e-5)).float().mean().item())
            assert 0 < at_least and at_most < 1, (step, at_least, at_most)
            assert at_least - 1e-6 <= line["tis_capped_fraction"] <= at_most + 1e-6, (step, line, at_least, at_most)
        else:
            assert line["tis_capped_fraction"] is None
        # The engine served checkpoint s rounded to bfloat16, and not checkpoint s - 1.
        assert log_r.abs().max().item() <= BF16_TOLERANCE, step
        if step > 0:
            stale = log_ratios(models[step - 1], tokenizer, prompts, groups)
            assert stale.abs().max().item() > BF16_STALE, step
