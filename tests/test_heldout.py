"""Held-out evaluation during RL (`[rl.evaluation]`, issue 13.3): the driver samples held-out problems at the chosen
steps into heldout/ (rl.training), a resumed run neither loses nor doubles them, they leave the RL steps as they
were, and `analyze` turns them into held-out pass@k and format shares (summary.json's `heldout`, metrics.parquet's
heldout_* rows) that the report draws. The config rules are in tests/test_config_rules.py."""

from __future__ import annotations

import json
import shutil
from math import comb

import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis.report import load_run, write_report
from analysis.summary import analyze
from rl.config import HeldoutEvaluationSettings, RLSettings, SamplingSettings
from rl.engines import HFEngine
from rl.recorder import Recorder, Rollout
from rl.rollouts import load_heldout_problems
from rl.seeds import step_seed
from rl.training import evaluates, heldout_sampling, train
from specialists.config import SpecialistsConfig
from specialists.formats import FORMAT_SETS
from specialists.grading import answer_text
from specialists.model import load_model
from specialists.run_directory import METRICS_TABLE_FILE, ROLLOUT_SCHEMA, heldout_file, heldout_files, step_of
from specialists.tasks import generate_problems
from rl_helpers import Crash, CrashAt, make_run, read_metrics, rollout_rows, untimed
from test_analysis_summary import synthetic_rollouts, write_run_dir

PROBLEMS, SAMPLES = 3, 2


def settings(every: int = 2, steps: int = 3) -> RLSettings:
    return RLSettings(steps=steps, prompts_per_step=2, num_prompts=8, learning_rate=1e-3, checkpoint_every=2,
                      sampling=SamplingSettings(samples_per_prompt=4, max_new_tokens=24),
                      evaluation=HeldoutEvaluationSettings(every=every, num_problems=PROBLEMS,
                                                           samples_per_problem=SAMPLES, temperature=1.0))


def heldout_problems(rl_settings: RLSettings):
    return load_heldout_problems(rl_settings, 0, SpecialistsConfig().task)


def run(model_dir, run_dir, rl_settings, observers=(), **kwargs):
    """rl.training.train on a Run as the pipeline builds it, with the held-out problems when evaluation is on."""
    built = make_run(model_dir, run_dir, rl_settings, **kwargs)
    if rl_settings.evaluation.every > 0:
        built.heldout = heldout_problems(rl_settings)
    train(built, observers)
    return built


def heldout_rows(run_dir, step: int) -> list[dict]:
    return pq.read_table(heldout_file(run_dir, step)).to_pylist()


@pytest.fixture(scope="module")
def whole(tiny_moe_dir, tmp_path_factory):
    """A 3-step GRPO run with evaluation every 2 steps: (run directory, its Run)."""
    run_dir = tmp_path_factory.mktemp("heldout-whole")
    return run_dir, run(tiny_moe_dir, run_dir, settings())


# ----- the driver ---------------------------------------------------------------------------------


def test_evaluated_steps_are_every_nth_and_the_last():
    assert [s for s in range(8) if evaluates(settings(every=3, steps=7), s)] == [0, 3, 6, 7]
    assert [s for s in range(4) if evaluates(settings(every=1), s)] == [0, 1, 2, 3]
    assert not any(evaluates(settings(every=0), s) for s in range(4))


@pytest.mark.integration
def test_the_evaluated_steps_write_heldout_rollouts_of_held_out_problems(whole, tiny_moe_dir):
    run_dir, built = whole
    assert [step_of(path) for path in heldout_files(run_dir)] == [0, 2, 3]  # every 2nd step and the last (3)
    problems = {problem.id: problem for problem in built.heldout}
    rl_questions = {problem.question for problem in built.prompt_set.problems}
    assert len(problems) == PROBLEMS and rl_questions.isdisjoint(p.question for p in problems.values())
    for step in (0, 2, 3):
        table = pq.read_table(heldout_file(run_dir, step))
        assert table.schema.equals(ROLLOUT_SCHEMA)
        rows = table.to_pylist()
        assert len(rows) == PROBLEMS * SAMPLES and {row["step"] for row in rows} == {step}
        assert sorted((row["prompt_id"], row["sample_index"]) for row in rows) == sorted(
            (pid, index) for pid in problems for index in range(SAMPLES))
        for row in rows:
            problem = problems[row["prompt_id"]]
            assert row["prompt"] == built.prompt_set.prompter.text(problem)
            assert row["answer"] == answer_text(problem.answer)
            assert row["reward"] == float(row["correct"])  # graded and rewarded as RL's rollouts (ChecksumRewards)
            assert row["logprob"] is None and row["expert_load"] is None  # sampled, not scored
            assert row["epoch"] == built.prompt_set.epoch(step)
    # step s's samples are the model of step s's: the base model at 0, the trained (final) model at the last step
    for step, model in ((0, load_model(tiny_moe_dir)), (3, built.model)):
        groups = HFEngine(model, built.tokenizer).generate([built.prompt_set.prompter.text(p) for p in built.heldout],
                                                           heldout_sampling(built.settings), step_seed(0, step, "heldout"))
        assert [row["completion"] for row in heldout_rows(run_dir, step)] == [c.text for g in groups for c in g]
    # the RL steps' records are all there, and never held-out problems
    assert [line["step"] for line in read_metrics(run_dir)] == [0, 1, 2, 3]
    assert all(row["prompt_id"] not in problems for step in range(4) for row in rollout_rows(run_dir, step))


@pytest.mark.integration
def test_evaluation_leaves_the_rl_steps_as_they_were(whole, tiny_moe_dir, tmp_path):
    """The same run with evaluation off: the same RL rollouts and metrics, and no heldout/ folder."""
    run_dir, _ = whole
    run(tiny_moe_dir, tmp_path, settings(every=0))
    assert not (tmp_path / "heldout").exists()
    assert untimed(read_metrics(tmp_path)) == untimed(read_metrics(run_dir))
    for step in range(4):
        assert rollout_rows(tmp_path, step) == rollout_rows(run_dir, step)


@pytest.mark.integration
def test_resume_neither_loses_nor_doubles_heldout_steps(whole, tiny_moe_dir, tmp_path):
    """Killed after step 2 was recorded (its held-out file too), before checkpoint 2 was used: the resumed run
    starts from checkpoint 2, rewrites step 2's held-out file and writes step 3's; the files are those of the
    uninterrupted run, step 0's kept as it was. Same config and seed: the same held-out samples."""
    run_dir, _ = whole
    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(tiny_moe_dir, crashed, settings(), observers=[CrashAt(2)])
    assert [step_of(path) for path in heldout_files(crashed)] == [0, 2]
    step_0 = heldout_file(crashed, 0).stat().st_mtime_ns
    run(tiny_moe_dir, crashed, settings(), start_step=2, model=load_model(crashed / "checkpoints" / "step_000002"))
    assert [step_of(path) for path in heldout_files(crashed)] == [0, 2, 3]
    assert heldout_file(crashed, 0).stat().st_mtime_ns == step_0  # kept, not redone
    for step in (0, 2, 3):
        assert heldout_rows(crashed, step) == heldout_rows(run_dir, step)
    assert untimed(read_metrics(crashed)) == untimed(read_metrics(run_dir))


@pytest.mark.integration
def test_analyze_reads_the_runs_heldout_evaluations(whole, tmp_path):
    """pass@k of the driver's held-out files, recomputed here from their rows with the unbiased estimator."""
    run_dir = shutil.copytree(whole[0], tmp_path / "run")
    summary = analyze(run_dir, progress=False)
    heldout = summary["heldout"]
    assert heldout["steps"] == [0, 2, 3] and heldout["problems"] == PROBLEMS and heldout["budgets"] == [1, 2]
    for step in (0, 2, 3):
        counts = pd.DataFrame(heldout_rows(run_dir, step)).groupby("prompt_id")["correct"].agg(["size", "sum"])
        for k in (1, 2):
            expected = sum(1 - comb(n - c, k) / comb(n, k) for n, c in zip(counts["size"], counts["sum"], strict=True)) / PROBLEMS
            assert heldout["pass_at_k"][str(step)][str(k)] == pytest.approx(expected)
        assert sum(heldout["format_share"][str(step)].values()) == pytest.approx(1.0)


def test_a_resume_forgets_the_heldout_files_of_the_redone_steps(tmp_path):
    """What a killed run left at the checkpoint's step or later (whole files, and a partial one) is dropped."""
    recorder = Recorder(tmp_path)
    problem = generate_problems(1, 0, "eval")[0]
    natural = FORMAT_SETS["synthetic"][2]
    for step in (0, 2, 3):
        recorder.write_heldout(step, [rollout(step, problem, 0, natural, natural.render(problem, "easy"), True)])
    (tmp_path / "heldout" / "step_000004.parquet.tmp").write_bytes(b"cut")
    recorder.forget_from(2)
    assert sorted(path.name for path in (tmp_path / "heldout").iterdir()) == ["step_000000.parquet"]


# ----- the analysis of a hand-made run directory --------------------------------------------------


def rollout(step: int, problem, sample: int, fmt, text: str, correct: bool) -> Rollout:
    return Rollout(step=step, epoch=0.0, prompt_id=problem.id, sample_index=sample, prompt=problem.question,
                   completion=text, answer=answer_text(problem.answer), reward=float(correct), correct=correct,
                   format=fmt.name, reason="correct" if correct else "wrong", num_tokens=len(text.split()), logprob=None)


def write_heldout(run_dir) -> None:
    """Two problems A, B, four samples each; a correct sample solves its problem, a wrong one gives the other
    problem's solution.
    step 0: A one natural-language solution right (sample 0) and three wrong; B four wrong python functions.
    step 2: A four right; B two right (samples 0, 1) and two wrong, all natural language."""
    python, _, natural = FORMAT_SETS["synthetic"]
    a, b = generate_problems(2, 0, "eval")
    other = {a.id: b, b.id: a}

    def samples(step, problem, fmt, right):
        return [rollout(step, problem, index, fmt, fmt.render(problem if ok else other[problem.id], "easy"), ok)
                for index, ok in enumerate(right)]

    recorder = Recorder(run_dir)
    recorder.write_heldout(0, samples(0, a, natural, [True, False, False, False])
                           + samples(0, b, python, [False] * 4))
    recorder.write_heldout(2, samples(2, a, natural, [True] * 4) + samples(2, b, natural, [True, True, False, False]))


def test_heldout_pass_at_k_and_format_shares_hand_computed(tmp_path):
    run_dir = write_run_dir(synthetic_rollouts(steps=3), tmp_path / "run", {})
    without = analyze(run_dir, progress=False)
    assert "heldout" not in without and not (run_dir / "heldout").exists()
    metrics_without = pq.read_table(run_dir / METRICS_TABLE_FILE).to_pandas()
    write_heldout(run_dir)

    summary = analyze(run_dir, progress=False)
    heldout = summary.pop("heldout")
    assert summary == without  # the training rollouts' analysis is untouched
    assert heldout["steps"] == [0, 2] and heldout["problems"] == 2 and heldout["budgets"] == [1, 2, 4]
    # pass@k = mean over problems of 1 - C(n - c, k) / C(n, k), n = 4
    # step 0: A c = 1: 1/4, 1 - 3/6, 1; B c = 0: 0 -> 1/8, 1/4, 1/2
    # step 2: A c = 4: 1; B c = 2: 2/4, 1 - 1/6, 1 -> 3/4, 11/12, 1
    assert heldout["pass_at_k"] == {"0": {"1": 0.125, "2": 0.25, "4": 0.5},
                                    "2": {"1": 0.75, "2": pytest.approx(11 / 12), "4": 1.0}}
    # maj@4: step 0 both problems' plurality answer is wrong; step 2 B ties 2-2, the first answer seen (right) wins
    assert heldout["maj_at_k"]["0"]["4"] == 0.0 and heldout["maj_at_k"]["2"]["4"] == 1.0
    assert heldout["accuracy"] == {"0": 0.125, "2": 0.75}
    assert heldout["format_share"] == {
        "0": {"python_function": 0.5, "llm_code": 0.0, "natural_language": 0.5, "other": 0.0},
        "2": {"python_function": 0.0, "llm_code": 0.0, "natural_language": 1.0, "other": 0.0}}
    assert heldout["format_accuracy"]["0"]["natural_language"] == 0.25
    assert heldout["format_accuracy"]["2"]["natural_language"] == 0.75

    metrics = pq.read_table(run_dir / METRICS_TABLE_FILE).to_pandas()
    added = metrics[metrics["metric"].str.startswith("heldout_")]
    assert set(added["metric"]) == {"heldout_pass_at_k", "heldout_maj_at_k", "heldout_accuracy",
                                    "heldout_format_share", "heldout_format_accuracy"}
    pass_at_k = added[added["metric"] == "heldout_pass_at_k"].set_index(["step", "k"])["value"]
    assert pass_at_k.to_dict() == {(0, 1): 0.125, (0, 2): 0.25, (0, 4): 0.5,
                                   (2, 1): 0.75, (2, 2): pytest.approx(11 / 12), (2, 4): 1.0}
    shares = added[added["metric"] == "heldout_format_share"].set_index(["step", "format"])["value"]
    assert shares[(0, "python_function")] == 0.5 and shares[(2, "natural_language")] == 1.0
    pd.testing.assert_frame_equal(metrics[~metrics["metric"].str.startswith("heldout_")].reset_index(drop=True),
                                  metrics_without)


def test_the_report_reanalyses_a_run_given_heldout_files_and_draws_them(tmp_path):
    run_dir = write_run_dir(synthetic_rollouts(steps=3), tmp_path / "run", {})
    analyze(run_dir, progress=False)
    write_heldout(run_dir)  # after the analysis: its summary.json lacks them
    loaded = load_run(run_dir, progress=False)
    assert loaded.summary["heldout"]["steps"] == [0, 2]
    assert loaded.series("heldout_pass_at_k", k=4).to_dict() == {0: 0.5, 2: 1.0}
    page = write_report([run_dir], tmp_path / "report.html", progress=False).read_text()
    assert "Held-out pass@k (unbiased estimator) at the evaluated RL steps" in page
    assert json.loads((run_dir / "summary.json").read_text())["heldout"]["budgets"] == [1, 2, 4]
