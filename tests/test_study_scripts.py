"""The study's own measurement scripts (experiments/studies/echo_chamber/) on a real tiny model."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from specialists.model import load_model
from specialists.tokenizer import load_tokenizer

STUDY = Path("experiments/studies/echo_chamber")


def study_module(name: str):
    spec = importlib.util.spec_from_file_location(name, STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_position_kl_is_zero_against_itself_and_the_exact_kl_otherwise(tiny_moe_dir):
    token_kl = study_module("token_kl")
    model, tokenizer = load_model(tiny_moe_dir).eval(), load_tokenizer(tiny_moe_dir)
    prompt, completion = "Mia has 7 apples.", " She buys 5 more."
    same = token_kl.position_kl(model, model, tokenizer, [prompt], [completion])[0]
    assert torch.equal(same, torch.zeros_like(same))

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # sharper next-token distributions everywhere
    kl = token_kl.position_kl(model, other, tokenizer, [prompt], [completion])[0]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert kl.shape == (len(completion_ids),) and (kl > 0).all()
    # the first completion token is predicted from the prompt alone
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids).logits[0, -1], -1)
        log_q = torch.log_softmax(other(ids).logits[0, -1], -1)
    expected = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum")
    assert torch.allclose(kl[0], expected, rtol=1e-4)


def test_heldout_pass_at_k_scores_the_graded_samples(tiny_moe_dir, vllm_moe):
    from rl.config import SamplingSettings
    from specialists.sandbox import Sandbox
    from specialists.tasks import generate_problems

    heldout = study_module("heldout_pass_at_k")
    problems = generate_problems(6, 0, "eval")
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=48, samples_per_prompt=8)
    with Sandbox() as sandbox:
        result = heldout.evaluate_model(vllm_moe, load_model(tiny_moe_dir), problems, sampling, sandbox, seed=0)
        again = heldout.evaluate_model(vllm_moe, load_model(tiny_moe_dir), problems, sampling, sandbox, seed=0)
    assert result == again  # seeded sampling
    assert set(result) == {"pass@1", "pass@8", "format_share"}
    assert 0 <= result["pass@1"] <= result["pass@8"] <= 1
    assert sum(result["format_share"].values()) == pytest.approx(1, abs=1e-2)
