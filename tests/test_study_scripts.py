"""The study's own measurement scripts (experiments/studies/echo_chamber/) on a real tiny model."""

import importlib.util
from pathlib import Path

import pytest

from specialists.model import load_model

STUDY = Path("experiments/studies/echo_chamber")


def study_module(name: str):
    spec = importlib.util.spec_from_file_location(name, STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
