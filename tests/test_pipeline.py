"""`echolab run` end to end on the smoke config: the run directory, determinism, and resume after a kill."""

import json

import pytest

from experiments.config import load_experiment_config
from experiments.pipeline import run_experiment
from rl.recorder import Recorder

SMOKE = "experiments/configs/smoke.toml"
SPEC_SUMMARY_KEYS = {"formats", "format_share", "dominant_format", "collapse_step", "format_entropy", "accuracy",
                     "format_accuracy", "collapse_epoch", "expert_share", "expert_entropy", "dominant_expert"}
TIMING = ("step_time_s", "rollout_tokens_per_s", "time")


@pytest.fixture(scope="module", autouse=True)
def pretrain_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ECHOLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    run_experiment(load_experiment_config(SMOKE), run_dir, progress=False)
    return run_dir


def metrics_without_timing(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not any(t in k for t in TIMING)} for line in lines]


def rollouts(run_dir):
    import pandas as pd

    table = pd.concat(pd.read_parquet(path) for path in sorted((run_dir / "rollouts").glob("*.parquet")))
    return table[["step", "prompt_id", "sample_index", "completion", "reward", "format"]].reset_index(drop=True)


def test_run_directory_follows_the_spec(smoke_run):
    names = {p.name for p in smoke_run.iterdir()}
    assert {"config.json", "rollouts", "metrics.jsonl", "router", "checkpoints", "summary.json", "report.html"} <= names
    assert sorted(p.name for p in (smoke_run / "rollouts").iterdir()) == [f"step_00000{i}.parquet" for i in range(3)]
    assert len(metrics_without_timing(smoke_run)) == 3
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert SPEC_SUMMARY_KEYS <= set(summary)
    assert list(summary["format_share"]) == ["0", "1", "2"]
    assert (smoke_run / "report.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_same_config_and_seed_give_the_same_metrics(smoke_run, tmp_path):
    again = tmp_path / "again"
    run_experiment(load_experiment_config(SMOKE), again, progress=False)
    assert metrics_without_timing(again) == metrics_without_timing(smoke_run)
    assert json.loads((again / "summary.json").read_text()) == json.loads((smoke_run / "summary.json").read_text())


def test_resume_after_a_kill_loses_no_step(smoke_run, tmp_path, monkeypatch):
    killed = tmp_path / "killed"
    save = Recorder.save_checkpoint

    def save_then_die(self, step, *args, **kwargs):
        path = save(self, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt  # killed right after the first checkpoint
        return path

    monkeypatch.setattr(Recorder, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment_config(SMOKE), killed, progress=False)
    monkeypatch.setattr(Recorder, "save_checkpoint", save)
    run_experiment(load_experiment_config(SMOKE), killed, resume=True, progress=False)
    # The same completions at every step; losses equal up to float32 rounding (a model reloaded from disk
    # can sum in another order than the one kept in memory).
    assert rollouts(killed).equals(rollouts(smoke_run))
    for resumed, uninterrupted in zip(metrics_without_timing(killed), metrics_without_timing(smoke_run), strict=True):
        assert resumed == pytest.approx(uninterrupted, rel=1e-5, abs=1e-7)


def test_an_existing_run_is_not_overwritten_without_resume(smoke_run):
    from specialists.errors import UserError

    with pytest.raises(UserError, match="--resume"):
        run_experiment(load_experiment_config(SMOKE), smoke_run, progress=False)


def test_analyze_gives_the_same_summary_for_the_recorder_files_and_an_external_jsonl(smoke_run, tmp_path):
    from analysis.summary import analyze

    import pyarrow.parquet as pq

    rows = [row for path in sorted((smoke_run / "rollouts").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    external = tmp_path / "rollouts.jsonl"
    external.write_text("".join(json.dumps(row) + "\n" for row in rows))  # json writes floats exactly
    from_run = analyze(smoke_run, formats="synthetic", out_dir=tmp_path / "from_run", progress=False)
    from_file = analyze(external, formats="synthetic", out_dir=tmp_path / "from_file", progress=False)
    assert from_file == from_run
