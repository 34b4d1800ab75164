"""What `echolab` prints: the final lines of `run` (never a collapse onto `other`), the step-0 warning when RL has
no signal, the default output of `report` with several runs, and `evaluate`'s refusal of a foreign checkpoint."""

import json
from pathlib import Path

import pytest

from analysis.summary import analyze
from experiments.cli import main
from experiments.console import StepLine, StepZeroCheck, final_lines, step_zero_problem
from rl.recorder import Recorder, Rollout
from specialists.formats import FORMAT_SETS, OTHER
from specialists.grading import answer_text
from specialists.tasks import generate_problems, prompt_text

FORMATS = {f.name: f for f in FORMAT_SETS["synthetic"]}
PROBLEMS = generate_problems(4, seed=0, split="train")
GARBAGE = "i. M io = sllm-code gives withX +to Lar?ow = re many * with cards"  # what the smoke base wrote


def rollouts(step: int, formats: list[str], rewards: list[float]) -> list[Rollout]:
    """One step of 4 prompts x 4 samples as the recorder writes them; sample i of every prompt is in formats[i]."""
    rows = []
    for problem in PROBLEMS:
        for index, (name, reward) in enumerate(zip(formats, rewards, strict=True)):
            text = GARBAGE if name == OTHER else FORMATS[name].render(problem, "easy")
            rows.append(Rollout(step=step, epoch=step / 4, prompt_id=problem.id, sample_index=index,
                                prompt=prompt_text(problem), completion=text, answer=answer_text(problem.answer), reward=reward,
                                correct=reward > 0, format=name, reason="ok" if reward > 0 else "wrong",
                                num_tokens=len(text.split()), logprob=-10.0))
    return rows


def recorded_run(path: Path, steps: list[tuple[list[str], list[float]]]) -> Path:
    """A run directory written by the real recorder and analysed by the real analysis."""
    recorder = Recorder(path)
    recorder.write_config({"analysis": {"formats": "synthetic", "collapse_threshold": 0.9}})
    for step, (formats, rewards) in enumerate(steps):
        recorder.write_rollouts(step, rollouts(step, formats, rewards))
        recorder.write_metrics(step, {"reward_mean": sum(rewards) / len(rewards)})
    analyze(path, formats="synthetic", progress=False)
    return path


MIXED = ["python_function", "llm_code", "natural_language", "python_function"]
PY = ["python_function"] * 4


def test_a_base_that_fits_no_format_is_no_collapse_and_is_named(tmp_path):
    run = recorded_run(tmp_path / "run", [([OTHER] * 4, [0.0] * 4)] * 3)
    assert json.loads((run / "summary.json").read_text())["dominant_format"] == OTHER  # what the analysis says
    lines = final_lines(run)
    assert lines[0] == "formats at step 2: other 100%, python_function 0%, llm_code 0%, natural_language 0%"
    assert lines[1] == "no collapse onto a format: 100% of the last step's completions fit no format"
    assert lines[2].startswith("warning: the base model produces no recognised format: all 16 step-0 completions")
    assert "RL has no signal" in lines[2]
    assert not any("collapse: onto" in line for line in lines)


def test_a_collapse_onto_a_format_is_named_with_its_step(tmp_path):
    run = recorded_run(tmp_path / "run", [(MIXED, [1.0, 0.0, 0.0, 1.0]), (MIXED, [1.0, 0.0, 1.0, 1.0]),
                                          (PY, [1.0, 1.0, 0.0, 1.0])])
    lines = final_lines(run)
    assert lines == ["formats at step 2: python_function 100%, llm_code 0%, natural_language 0%, other 0%",
                     "collapse: onto python_function at step 2 (epoch 0.5), its share >= 0.9"]


def test_no_collapse_says_which_format_leads(tmp_path):
    run = recorded_run(tmp_path / "run", [(MIXED, [1.0, 0.0, 0.0, 1.0])] * 2)
    assert final_lines(run)[1] == "no collapse: no format reached a share of 0.9 (at the last step python_function leads with 50%)"


def test_a_mix_led_by_other_names_the_leading_format(tmp_path):
    run = recorded_run(tmp_path / "run", [([OTHER, OTHER, "llm_code", "python_function"], [0.0, 0.0, 1.0, 0.0])] * 2)
    # other 50%, llm_code and python_function 25% each: a tie goes to the format listed first in the set
    assert final_lines(run)[1:] == ["no collapse: no format reached a share of 0.9 (at the last step python_function "
                                    "leads with 25%)"]


@pytest.mark.parametrize("rewards, problem", [
    ([0.0] * 4, "every reward is 0"),
    ([1.0, 0.0, 1.0, 0.0], None),  # rewards differ within each prompt's samples: GRPO has a signal
])
def test_equal_rewards_in_every_group_are_named(rewards, problem):
    found = step_zero_problem(rollouts(0, MIXED, rewards))
    if problem is None:
        assert found is None
    else:
        assert f"every prompt's samples got the same reward ({problem})" in found and "RL has no signal" in found


def test_rewards_that_differ_only_between_prompts_are_no_signal_either():
    rows = [{"prompt_id": row.prompt_id, "format": row.format, "reward": float(row.prompt_id == PROBLEMS[0].id)}
            for row in rollouts(0, MIXED, [0.0] * 4)]
    assert "rewards differ only between prompts" in step_zero_problem(rows)


def test_the_step_zero_check_prints_once_at_step_zero(capsys):
    check = StepZeroCheck()
    check.on_step(0, rollouts(0, [OTHER] * 4, [0.0] * 4), {"step": 0})
    check.on_step(1, rollouts(1, [OTHER] * 4, [0.0] * 4), {"step": 1})
    check.on_step(0, rollouts(0, MIXED, [1.0, 0.0, 0.0, 1.0]), {"step": 0})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the base model produces no recognised format")


def test_the_step_line_names_reward_accuracy_and_the_format_mix(capsys):
    StepLine(steps=16).on_step(3, rollouts(3, MIXED, [1.0, 0.0, 0.0, 1.0]),
                               {"step": 3, "reward_mean": 0.5, "accuracy": 0.5, "step_time_s": 12.34})
    # 16 samples: python_function 8, llm_code 4, natural_language 4
    assert capsys.readouterr().err == ("step 3/16: reward 0.500, accuracy 0.500, formats python_function 50% "
                                       "llm_code 25% natural_language 25% (12.3 s)\n")


# ---------------------------------------------------------------- report A B

def test_report_of_several_runs_writes_a_new_file_and_keeps_the_runs_reports(tmp_path, monkeypatch, capsys):
    first = recorded_run(tmp_path / "a", [(MIXED, [1.0, 0.0, 0.0, 1.0]), (PY, [1.0, 1.0, 0.0, 1.0])])
    second = recorded_run(tmp_path / "b", [(MIXED, [1.0, 0.0, 0.0, 1.0])] * 2)
    (first / "report.html").write_text("A's own report")
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(first), str(second), "--quiet"]) == 0
    assert capsys.readouterr().out == "report: comparison.html\n"
    assert main(["report", str(first), str(second), "--quiet"]) == 0  # an earlier comparison is kept too
    assert capsys.readouterr().out == "report: comparison-2.html\n"
    assert (first / "report.html").read_text() == "A's own report"
    assert (tmp_path / "comparison.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert main(["report", str(first), "--quiet"]) == 0  # one run: its own report
    assert capsys.readouterr().out == f"report: {first / 'report.html'}\n"


# ---------------------------------------------------------------- evaluate CONFIG MODEL

def test_evaluate_refuses_a_checkpoint_built_from_other_model_settings(tmp_path, capsys):
    from specialists.config import ModelSettings
    from specialists.model import model_config

    model = tmp_path / "model"  # the config.json transformers writes for a checkpoint of the smoke model
    model_config(ModelSettings(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, expert_size=128),
                 vocab_size=384, eos_token_id=0, pad_token_id=1).save_pretrained(model)
    config = tmp_path / "config.toml"
    config.write_text("[model]\nhidden_size = 64\nnum_layers = 3\nnum_heads = 2\nnum_kv_heads = 1\nexpert_size = 128\n")
    assert main(["evaluate", str(config), str(model), "--quiet"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"echolab evaluate: error: {model} was not built from {config}: model.num_layers gives "
                     "num_hidden_layers = 3, the checkpoint has 2"]
    config.write_text('[model]\nkind = "dense"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 2\nnum_kv_heads = 1\n'
                      'expert_size = 128\n')
    assert main(["evaluate", str(config), str(model), "--quiet"]) == 1
    assert "model.kind gives model_type = 'qwen3', the checkpoint has 'qwen3_moe'" in capsys.readouterr().err


@pytest.mark.integration
def test_the_driver_runs_the_step_zero_check_on_what_it_recorded(tiny_moe_dir, tmp_path, capsys):
    """The tiny test base (19 pretraining steps) writes no format yet: the check warns once, at step 0."""
    from rl.config import RLSettings, SamplingSettings
    from rl.rollouts import Rewards
    from rl.training import train
    from specialists.sandbox import Sandbox

    from rl_helpers import make_run, rollout_rows

    settings = RLSettings(steps=1, prompts_per_step=2, num_prompts=4, checkpoint_every=10,
                          sampling=SamplingSettings(samples_per_prompt=2, max_new_tokens=16))
    with Sandbox(workers=1) as sandbox:
        train(make_run(tiny_moe_dir, tmp_path, settings, rewards=Rewards(FORMAT_SETS["synthetic"], sandbox, 1.0, 0.0)),
              [StepZeroCheck()])
    assert {row["format"] for step in (0, 1) for row in rollout_rows(tmp_path, step)} == {OTHER}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the base model produces no recognised format: all 4 step-0 completions fit no "
                        "format, so RL has no signal (pretrain longer: raise pretrain.num_examples)"]
