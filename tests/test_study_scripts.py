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
    from rl_helpers import RecordingEngine
    from specialists.formats import FORMAT_SETS
    from specialists.prompting import Prompter
    from specialists.sandbox import Sandbox
    from specialists.tasks import generate_problems

    heldout = study_module("heldout_pass_at_k")
    problems = generate_problems(6, 0, "eval")
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=48, samples_per_prompt=8)
    prompter = Prompter(load_tokenizer(tiny_moe_dir), "Problem: {question}\nSolution:\n")  # a run's rl.prompt_template
    engine = RecordingEngine(vllm_moe)
    with Sandbox() as sandbox:
        result, again = (heldout.evaluate_model(engine, load_model(tiny_moe_dir), prompter, problems, sampling,
                                                FORMAT_SETS["synthetic"], sandbox, seed=0) for _ in range(2))
    assert result == again  # seeded sampling
    assert engine.calls[0][0] == [f"Problem: {p.question}\nSolution:\n" for p in problems]  # the run's template
    assert set(result) == {"pass@1", "pass@8", "format_share"}
    assert 0 <= result["pass@1"] <= result["pass@8"] <= 1
    assert sum(result["format_share"].values()) == pytest.approx(1, abs=1e-2)


def test_heldout_pass_at_k_takes_a_model_path_runs_base_without_pretraining(tmp_path, monkeypatch):
    """A `[model] path` run's base is that checkpoint (experiments.pipeline.base_model), not a built-in model
    pretrained from the config's [pretrain] part (which would take minutes and be the wrong model)."""
    from experiments.config import ExperimentConfig
    from model_families import build_checkpoint

    import experiments.pipeline

    monkeypatch.setattr(experiments.pipeline, "base_model_dir", lambda *args, **kwargs: pytest.fail("pretrained"))
    checkpoint = build_checkpoint("llama", tmp_path / "base")
    configs = [ExperimentConfig.model_validate({"model": {"path": str(checkpoint)}, "rl": {"seed": seed}})
               for seed in (0, 1)]
    assert study_module("heldout_pass_at_k").shared_base(configs) == checkpoint
    other = ExperimentConfig.model_validate({"model": {"path": str(checkpoint)}, "rl": {"prompt_template": "Q: {question}"}})
    with pytest.raises(SystemExit, match="prompt_template"):
        study_module("heldout_pass_at_k").shared_base([configs[0], other])
