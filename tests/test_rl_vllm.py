"""PPO, GRPO and Expert Iteration, 3 steps each, with the session's vLLM engine (tests/conftest.py `vllm_moe`).

The other algorithm tests use the transformers engine, which samples from the training model itself; here
the rollouts come from vLLM, so the weights must be pushed into it after the updates (rl/weight_sync.py).
Each run goes through rl.training.train (as the pipeline calls it) and checks the run directory and the
sync: the log-probability vLLM reported for every completion it sampled at step s equals the teacher-forced
one under checkpoint s (the model after s updates; the base model at step 0; step 3 is the final model,
sampled without an update), so the engine served the weights of every step of the algorithm's loop; the
logged train/inference mismatch of float32 rollouts is nil; and after training the engine serves the
returned model.
"""

from __future__ import annotations


import pytest

from rl.config import RLSettings, SamplingSettings
from rl.training import train
from specialists.model import load_model
from specialists.tasks import prompt_text
from specialists.tokenizer import load_tokenizer

from rl_helpers import (RecordingEngine, check_run_directory, completion_logprob, hf_token_logprobs, make_run,
                        prompt_set_for, read_metrics, vllm_token_logprobs, weights_equal)

pytest.importorskip("vllm")

pytestmark = pytest.mark.integration

STEPS, PROMPTS, SAMPLES = 3, 2, 4
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
