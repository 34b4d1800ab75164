"""Trackers (experiments.trackers): the step observer fed recorder rows directly, its TensorBoard event files
read back and compared with what `echolab analyze` computes from the same rows; wandb (offline) and MLflow
(local SQLite store)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.classify import format_names
from analysis.live import CollapseWatch
from analysis.summary import analyze
from experiments.trackers import TrackerObserver, algorithm_metrics, open_trackers
from rl.recorder import Recorder, Rollout
from specialists.formats import FORMAT_SETS
from specialists.grading import answer_text
from specialists.tasks import generate_problems, prompt_text

FORMATS = FORMAT_SETS["synthetic"]
NAMES = format_names(FORMATS, pd.Series([], dtype=object))
PROMPTS, SAMPLES, STEPS, LAYERS, EXPERTS, TOP_K = 4, 4, 4, 2, 4, 2


def step_rows(step: int, rng: np.random.Generator) -> list[Rollout]:
    """One step's recorder rows as an echolab run writes them: completions rendered in the synthetic formats
    (python_function growing from a third to most of the step, the way a collapse goes), `other` text now and
    then, correctness per format, routed-token counts that sum to num_tokens x top-k per layer."""
    problems = generate_problems(PROMPTS, seed=step, split="train")
    python_share = min(0.3 + 0.2 * step, 0.95)
    shares = [python_share, (1 - python_share) * 0.45, (1 - python_share) * 0.45, (1 - python_share) * 0.1]
    rows = []
    for problem in problems:
        for index in range(SAMPLES):
            choice = rng.choice(4, p=shares)
            completion = "I am not sure." if choice == 3 else FORMATS[choice].render(problem, "easy")
            correct = choice != 3 and rng.random() < (0.8, 0.3, 0.2)[min(choice, 2)]
            tokens = len(completion.split()) + 1
            load = [rng.multinomial(tokens * TOP_K, np.ones(EXPERTS) / EXPERTS).tolist() for _ in range(LAYERS)]
            rows.append(Rollout(step=step, epoch=step / 10, prompt_id=problem.id, sample_index=index,
                                prompt=prompt_text(problem), completion=completion, answer=answer_text(problem.answer),
                                reward=float(correct), correct=bool(correct), format=NAMES[choice],
                                reason="correct" if correct else "wrong", num_tokens=tokens,
                                logprob=-0.7 * tokens, expert_load=load))
    return rows


def metrics_line(step: int) -> dict:
    return {"step": step, "epoch": step / 10, "update": True, "loss": 0.5 - 0.1 * step, "kl_to_reference": 0.01 * step,
            "reward_mean": 0.4, "policy_loss": None, "sample_time_s": 1.5, "step_time_s": 2.0,
            "rollout_tokens_per_s": 100.0}


def event_scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def feed(observer: TrackerObserver, recorder: Recorder | None, steps: range, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for step in range(steps.stop):
        rows = step_rows(step, rng)
        if step in steps:
            if recorder is not None:
                recorder.write_rollouts(step, rows)
            observer.on_step(step, rows, metrics_line(step))


def test_heldout_evaluations_reach_tensorboard_as_analyze_computes_them(tmp_path):
    """on_heldout (rl.recipe.HeldoutObserver) at the evaluated steps 0 and 2: heldout/pass_at_k/K,
    accuracy/mean, format_share/NAME and format_accuracy/NAME equal summary.json's `heldout` block of the same rows
    written to heldout/; nothing is logged under heldout/ at the other steps."""
    run = tmp_path / "run"
    recorder = Recorder(run)
    observer = TrackerObserver(open_trackers(["tensorboard"], run, "echolab", {}),
                               CollapseWatch(NAMES, last_step=STEPS - 1, threshold=0.9))
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        if step in (0, 2):
            evaluation = [dataclasses.replace(row, logprob=None, expert_load=None) for row in step_rows(step, rng)]
            recorder.write_heldout(step, evaluation)
            observer.on_heldout(step, evaluation)
        rows = step_rows(step, rng)
        recorder.write_rollouts(step, rows)
        observer.on_step(step, rows, metrics_line(step))
    observer.close()
    heldout = analyze(run, formats="synthetic", progress=False)["heldout"]
    logged = event_scalars(run / "tensorboard")
    assert heldout["steps"] == [0, 2] and heldout["budgets"] == [1, 2, 4]
    for k in heldout["budgets"]:
        assert logged[f"heldout/pass_at_k/{k}"] == pytest.approx(
            {int(step): by_k[str(k)] for step, by_k in heldout["pass_at_k"].items()}, abs=1e-6), k
    assert logged["heldout/accuracy/mean"] == pytest.approx({int(s): v for s, v in heldout["accuracy"].items()}, abs=1e-6)
    for name in NAMES:
        assert logged[f"heldout/format_share/{name}"] == pytest.approx(
            {int(step): shares[name] for step, shares in heldout["format_share"].items()}, abs=1e-6), name
        accuracy = {int(step): by_format[name] for step, by_format in heldout["format_accuracy"].items()
                    if by_format[name] is not None}
        assert logged.get(f"heldout/format_accuracy/{name}", {}) == pytest.approx(accuracy, abs=1e-6), name
    assert sorted(logged["accuracy/mean"]) == list(range(STEPS))  # the training batches' metrics, every step


def test_tensorboard_holds_the_grouped_metrics_analyze_computes(tmp_path):
    run = tmp_path / "run"
    observer = TrackerObserver(open_trackers(["tensorboard"], run, "echolab", {}),
                               CollapseWatch(NAMES, last_step=STEPS - 1, threshold=0.9))
    feed(observer, Recorder(run), range(STEPS))
    observer.close()
    summary = analyze(run, formats="synthetic", progress=False)
    logged = event_scalars(run / "tensorboard")
    for step in range(STEPS):
        key = str(step)
        for name in NAMES:
            assert logged[f"format_share/{name}"][step] == pytest.approx(summary["format_share"][key][name], abs=1e-6)
        assert logged["diversity/format_entropy"][step] == pytest.approx(summary["format_entropy"][key], abs=1e-6)
        assert logged["diversity/max_format_share"][step] == pytest.approx(summary["max_format_share"][key], abs=1e-6)
        assert logged["diversity/token_entropy"][step] == pytest.approx(summary["token_entropy"][key], abs=1e-6)
        assert logged["accuracy/mean"][step] == pytest.approx(summary["accuracy"][key], abs=1e-6)
        assert logged["accuracy/coverage"][step] == pytest.approx(summary["coverage"][key], abs=1e-6)
        for k in summary["budgets"]:
            assert logged[f"pass_at_k/{k}"][step] == pytest.approx(summary["pass_at_k"][key][str(k)], abs=1e-6)
        for layer in range(LAYERS):
            assert logged[f"expert_entropy/layer_{layer}"][step] == pytest.approx(
                summary["expert_entropy"][str(layer)][key], abs=1e-6)
            assert logged[f"expert_max_violation/layer_{layer}"][step] == pytest.approx(
                summary["expert_max_violation"][str(layer)][key], abs=1e-6)
            for expert in range(EXPERTS):
                assert logged[f"expert_share/layer_{layer}/expert_{expert}"][step] == pytest.approx(
                    summary["expert_share"][str(layer)][key][expert], abs=1e-6)
        assert logged["train/loss"][step] == pytest.approx(0.5 - 0.1 * step)
        assert logged["time/step_time_s"][step] == 2.0
    # python_function reaches 0.9 of a step by construction at the last steps: the collapse step is logged
    if summary["collapse_step"] is not None:
        assert logged["collapse/step"][STEPS - 1] == summary["collapse_step"]
    assert "train/update" not in logged and "train/policy_loss" not in logged


def test_a_resumed_run_continues_its_tensorboard_curves(tmp_path):
    watch = lambda: CollapseWatch(NAMES, last_step=STEPS - 1)  # noqa: E731
    first = TrackerObserver(open_trackers(["tensorboard"], tmp_path, "echolab", {}), watch())
    feed(first, None, range(0, 3))  # killed after step 2; its checkpoint was taken after step 1
    first.close()
    resumed = TrackerObserver(open_trackers(["tensorboard"], tmp_path, "echolab", {}, start_step=2), watch())
    feed(resumed, None, range(2, STEPS), seed=1)  # steps 2, 3 redone (other rollouts: another seed here)
    resumed.close()
    loss = event_scalars(tmp_path / "tensorboard")["train/loss"]
    assert sorted(loss) == list(range(STEPS))  # each step once: the first run's step 2 was purged


def test_algorithm_metrics_are_grouped():
    assert algorithm_metrics(metrics_line(3)) == {
        "train/epoch": 0.3, "train/loss": pytest.approx(0.2), "train/kl_to_reference": 0.03, "train/reward_mean": 0.4,
        "time/sample_time_s": 1.5, "time/step_time_s": 2.0, "time/rollout_tokens_per_s": 100.0}
    assert algorithm_metrics({"step": 1, "loss": math.nan, "note": "x"}) == {}


@pytest.mark.integration
def test_wandb_offline_run_in_the_run_directory(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    observer = TrackerObserver(open_trackers(["wandb"], tmp_path, "echolab", {"seed": 0}),
                               CollapseWatch(NAMES, last_step=STEPS - 1))
    feed(observer, None, range(2))
    run = observer.trackers[0].run
    summary = dict(run.summary)
    observer.close()
    wandb.teardown()  # the run's log is written by wandb's service process: stopping it flushes the file
    assert summary["train/loss"] == pytest.approx(0.4)  # the last logged step, 1
    assert set(summary) >= {f"format_share/{name}" for name in NAMES} | {"expert_entropy/layer_1", "pass_at_k/4"}
    logs = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "wandb") for name in names
            if name.endswith(".wandb")]
    assert len(logs) == 1 and b"format_share/python_function" in open(logs[0], "rb").read()


@pytest.mark.integration
def test_mlflow_run_in_a_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    observer = TrackerObserver(open_trackers(["mlflow"], tmp_path, "echolab", {"seed": 0}),
                               CollapseWatch(NAMES, last_step=STEPS - 1))
    feed(observer, None, range(2))
    tracker = observer.trackers[0]
    observer.close()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.4)]
    assert len(client.get_metric_history(tracker.run_id, "format_share/python_function")) == 2
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert (tmp_path / "mlflow-artifacts").is_dir() and not (Path.cwd() / "mlruns").exists()
