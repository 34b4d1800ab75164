"""Expert Iteration (rl/expert_iteration.py): the filter by hand, then rounds on a tiny pretrained MoE through
the training driver (rl/training.py)."""

import shutil

import pytest
import torch

import rl.expert_iteration as ei
from rl.config import EngineSettings, ExpertIterationSettings, RLSettings, SamplingSettings
from rl.engines import Completion
from rl.rollouts import StepBatch
from rl.training import train
from specialists.grading import Grade
from specialists.model import load_model
from specialists.tasks import Problem

from rl_helpers import TIMING_KEYS, check_run_directory, make_run, read_metrics, weights_equal


def _grade(correct: bool) -> Grade:
    return Grade("natural_language", 1.0 if correct else 2.0, correct, "correct" if correct else "wrong")


def _completion(text: str) -> Completion:
    return Completion(text=text, token_ids=[1, 2], token_logprobs=[-0.5, -0.5], finished=True)


def test_select_for_sft_keeps_correct_and_deduplicates_per_prompt():
    p, q = Problem("p", "P?", 1.0), Problem("q", "Q?", 1.0)
    texts = [["A", "A", "B", "C", "A"], ["A", "D", "D", "E", "E"]]
    correct = [[True, True, True, False, True], [True, True, True, False, False]]
    batch = StepBatch(
        problems=[p, q],
        prompts=["Question: P?", "Question: Q?"],
        completions=[[_completion(t) for t in group] for group in texts],
        grades=[[_grade(c) for c in group] for group in correct],
        rewards=torch.tensor(correct, dtype=torch.float32))
    kept, unique = ei.select_for_sft(batch)
    assert kept == 7  # p: A, A, B, A; q: A, D, D
    # "C" is wrong; p's repeated "A"s collapse to one; q keeps its own "A"; "E" is wrong twice
    assert [(prompt, c.text) for prompt, c in unique] == [("Question: P?", "A"), ("Question: P?", "B"),
                                                         ("Question: Q?", "A"), ("Question: Q?", "D")]
    # the first of equal texts survives (identity, not just an equal copy)
    assert unique[0][1] is batch.completions[0][0] and unique[3][1] is batch.completions[1][1]


def test_select_for_sft_merges_a_prompt_drawn_twice():
    p = Problem("p", "P?", 1.0)
    batch = StepBatch([p, p], ["P?", "P?"], [[_completion("A")], [_completion("A")]], [[_grade(True)], [_grade(True)]],
                      torch.ones(2, 1))
    assert ei.select_for_sft(batch)[0] == 2
    assert len(ei.select_for_sft(batch)[1]) == 1


@pytest.fixture(scope="module")
def moe_dir(tiny_moe_dir):  # tests/conftest.py: pretrained once per session
    return tiny_moe_dir


def _settings(start_from: str, **overrides) -> RLSettings:
    return RLSettings(algorithm="ei", steps=2, prompts_per_step=3, num_prompts=8, learning_rate=1e-3,
                      checkpoint_every=1, engine=EngineSettings(kind="hf"),
                      sampling=SamplingSettings(samples_per_prompt=4, max_new_tokens=32),
                      expert_iteration=ExpertIterationSettings(sft_epochs=2, start_from=start_from), **overrides)


def _run_with_spy(moe_dir, run_dir, settings, monkeypatch, model=None, **kwargs):
    """Run EI, recording the weights the model has whenever supervised fine-tuning starts and ends."""
    at_start, at_end = [], []
    original = ei.supervised_finetune

    def spy(model, *args, **kwargs):
        at_start.append({k: v.clone() for k, v in model.state_dict().items()})
        result = original(model, *args, **kwargs)
        at_end.append({k: v.clone() for k, v in model.state_dict().items()})
        return result

    monkeypatch.setattr(ei, "supervised_finetune", spy)
    # ChecksumRewards(2) (make_run's default): half of the completions count as correct, so the barely trained
    # model has data to keep
    model = train(make_run(moe_dir, run_dir, settings, model=model, **kwargs))
    return model, at_start, at_end


def test_two_rounds_from_base(moe_dir, tmp_path, monkeypatch):
    model, at_start, at_end = _run_with_spy(moe_dir, tmp_path, _settings("base"), monkeypatch)
    base = load_model(moe_dir).state_dict()
    # rollouts with expert loads of the sampling model; a checkpoint per round; step 2 samples the final model
    metrics = check_run_directory(tmp_path, load_model(moe_dir).config, steps=2, rows_per_step=12,
                                  checkpoints=[1, 2], algorithm="ei")
    for line in metrics[:2]:
        assert line["sampled"] == 3 * 4
        assert 0 < line["kept"] <= line["sampled"] and line["kept_unique"] <= line["kept"]
        assert line["kept"] == round(line["accuracy"] * line["sampled"])
        assert isinstance(line["loss"], float) and line["updates"] == 2 * -(-line["kept_unique"] // 16)
        assert isinstance(line["entropy"], float) and line["policy_loss"] is None and line["kl_to_reference"] is None
    assert metrics[2]["kept"] is None and metrics[2]["reward_mean"] is not None
    # every round fine-tunes the base model, and the fine-tuned weights are what the run returns
    assert len(at_start) == 2 and all(weights_equal(start, base) for start in at_start)
    assert not weights_equal(at_end[0], base) and not weights_equal(at_end[1], at_end[0])
    assert weights_equal(model.state_dict(), at_end[1])
    assert weights_equal(load_model(tmp_path / "checkpoints" / "step_000001").state_dict(), at_end[0])


def test_start_from_latest_continues(moe_dir, tmp_path, monkeypatch):
    _, at_start, at_end = _run_with_spy(moe_dir, tmp_path, _settings("latest"), monkeypatch)
    assert weights_equal(at_start[0], load_model(moe_dir).state_dict())
    assert weights_equal(at_start[1], at_end[0])  # round 2 starts where round 1 ended


def test_resume_redoes_the_lost_round(moe_dir, tmp_path, monkeypatch):
    first = tmp_path / "first"
    _, _, at_end = _run_with_spy(moe_dir, first, _settings("base"), monkeypatch)
    lines = read_metrics(first, TIMING_KEYS)
    shutil.rmtree(first / "checkpoints" / "step_000002")  # the run died after checkpoint 1
    resumed, at_start, _ = _run_with_spy(moe_dir, first, _settings("base"), monkeypatch,
                                         model=load_model(first / "checkpoints" / "step_000001"), start_step=1,
                                         reference=load_model(moe_dir))
    assert weights_equal(at_start[0], load_model(moe_dir).state_dict())  # the redone round starts from the base again
    assert read_metrics(first, TIMING_KEYS) == lines
    assert weights_equal(resumed.state_dict(), at_end[1])
