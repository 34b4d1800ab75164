"""PPO, GRPO and Expert Iteration, 3 steps each, with the session's vLLM engine (tests/conftest.py `vllm_moe`).

The other algorithm tests use the transformers engine, which samples from the training model itself; here
the rollouts come from vLLM, so the weights must be pushed into it after the updates (rl/weight_sync.py).
Each run goes through rl.train.train (as the pipeline calls it) and checks the run directory and the sync:
the log-probability vLLM reported for every completion it sampled at step s equals the teacher-forced one
under checkpoint s (the model after s updates; the base model at step 0), so the engine served the weights
of every step of the algorithm's loop; and after training the engine serves the returned model.
"""

from __future__ import annotations

import os

import pytest

from rl.config import RLSettings, SamplingSettings
from rl.recorder import Recorder
from rl.train import train
from specialists.model import load_model
from specialists.tasks import prompt_text
from specialists.tokenizer import load_tokenizer

from rl_helpers import (ChecksumRewards, check_run_directory, completion_logprob, hf_token_logprobs, prompt_set_for,
                        vllm_token_logprobs, weights_equal)

os.environ.setdefault("OMP_NUM_THREADS", "1")
pytest.importorskip("vllm")

pytestmark = pytest.mark.integration

STEPS, PROMPTS, SAMPLES = 3, 2, 4
TOLERANCE = 1e-3  # max |logprob difference| vLLM vs transformers (both float32; they agree to ~1e-5)


class RecordingEngine:
    """The session's engine, keeping what each `generate` call returned (token ids and vLLM's logprobs)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, sampling, seed):
        groups = self.engine.generate(prompts, sampling, seed)
        self.calls.append((prompts, groups))
        return groups

    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def close(self) -> None:
        pass  # the session owns the engine


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
    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    trained = train(settings, model=model, tokenizer=tokenizer, engine=engine, prompt_set=prompt_set_for(settings, tokenizer),
                    rewards=ChecksumRewards(2), recorder=Recorder(tmp_path), seed=0, base_model_dir=tiny_moe_dir,
                    progress=False)

    check_run_directory(tmp_path, trained.config, steps=STEPS, rows_per_step=PROMPTS * SAMPLES,
                        checkpoints=[1, 2, 3], algorithm=algorithm)

    # The engine sampled step s with the weights of the model after s updates (and not those of s - 1).
    assert len(engine.calls) == STEPS
    models = [load_model(tiny_moe_dir)] + [load_model(tmp_path / "checkpoints" / f"step_{s:06d}") for s in (1, 2, 3)]
    for step, (prompts, groups) in enumerate(engine.calls):
        errors, stale = [], []
        for prompt, group in zip(prompts, groups):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for completion in group:
                errors.append(abs(completion_logprob(models[step], prompt_ids, completion.token_ids) - completion.logprob))
                if step > 0:
                    stale.append(abs(completion_logprob(models[step - 1], prompt_ids, completion.token_ids)
                                     - completion.logprob))
        assert max(errors) <= TOLERANCE, (step, max(errors))
        assert step == 0 or max(stale) > 10 * TOLERANCE, (step, max(stale))  # the weights did move

    # After training the engine serves the trained model: one fixed prompt + completion, token by token.
    problem = prompt_set_for(settings, tokenizer).problems[0]
    fixed = [tokenizer(prompt_text(problem) + "The answer is 42.", add_special_tokens=False)["input_ids"]]
    assert max_difference(engine, trained, fixed) <= TOLERANCE
    assert max_difference(engine, models[0], fixed) > 10 * TOLERANCE
    assert weights_equal(trained.state_dict(), models[3].state_dict())  # the last checkpoint is the returned model
