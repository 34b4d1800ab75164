"""Sweeps: planning a grid, and the smoke sweep on a local Ray cluster (one failed run loses only itself)."""

import json
import subprocess
from pathlib import Path

import pytest

from experiments.sweep import plan, run_sweep, to_toml
from processes import echolab_command, kill_when_written, pinned_environment
from specialists.errors import UserError

SMOKE_SWEEP = Path("experiments/sweeps/smoke.toml")


def write_sweep(tmp_path, grid: str, base: str = str(Path("experiments/configs/smoke.toml").resolve())) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(f'base = "{base}"\nname = "t"\n[grid]\n{grid}')
    return path


def test_plan_is_the_product_of_the_grid(tmp_path):
    sweep_file = write_sweep(tmp_path, 'seed = [0, 1]\n"rl.mitigations.entropy_coef" = [0.0, 0.01]\n')
    _, runs = plan(sweep_file, tmp_path / "out")
    assert [r.name for r in runs] == ["seed=0-entropy_coef=0.0", "seed=0-entropy_coef=0.01",
                                      "seed=1-entropy_coef=0.0", "seed=1-entropy_coef=0.01"]
    from experiments.config import load_experiment_config

    config = load_experiment_config(runs[3].config_path)
    assert (config.seed, config.rl.mitigations.entropy_coef, config.rl.steps) == (1, 0.01, 3)


@pytest.mark.parametrize("grid, message", [
    ('"rl.mitigations.entropy_cof" = [0.1]\n', "unknown key rl.mitigations.entropy_cof"),
    ('"rl.algorithm" = ["dqn"]\n', "rl.algorithm"),
    ('seed = []\n', "at least one value"),
])
def test_bad_grids_fail_before_anything_runs(tmp_path, grid, message):
    with pytest.raises(UserError, match=message):
        plan(write_sweep(tmp_path, grid), tmp_path / "out")
    assert not (tmp_path / "out" / "runs").exists()


def test_toml_writer_round_trips():
    import tomllib

    document = {"seed": 1, "name": "a/b", "rl": {"beta": 0.001, "sampling": {"samples_per_prompt": 4}}, "flag": True}
    assert tomllib.loads(to_toml(document)) == document


@pytest.mark.integration
def test_smoke_sweep_on_a_local_ray_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOLAB_CACHE", str(tmp_path / "cache"))
    report = run_sweep(SMOKE_SWEEP, tmp_path / "sweep", backend="ray", progress=False)
    results = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in results] == ["ok", "ok"]
    for result in results:
        assert (Path(result["run_dir"]) / "summary.json").is_file()
    assert report.is_file() and "seed" in report.read_text()


def test_a_failed_run_is_reported_with_its_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOLAB_CACHE", str(tmp_path / "cache"))
    sweep_file = write_sweep(tmp_path, 'seed = [0]\n')  # a config problem would stop the sweep before it starts
    (tmp_path / "out" / "runs").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "seed=0").write_text("a file where the run directory goes")
    with pytest.raises(UserError, match="every run of the sweep failed"):
        run_sweep(sweep_file, tmp_path / "out", backend="local", progress=False)
    [result] = json.loads((tmp_path / "out" / "sweep.json").read_text())["runs"]
    assert result["status"] == "failed" and "is a file, not a run directory" in result["error"]


def test_a_config_problem_stops_the_sweep_before_any_run(tmp_path):
    missing = tmp_path / "no-such-gsm8k.jsonl"
    sweep_file = write_sweep(tmp_path, f'"rl.prompts" = ["{missing}"]\n')
    with pytest.raises(UserError, match=r"sweep\.toml line 4 \(run prompts=.*\): rl\.prompts: file not found"):
        run_sweep(sweep_file, tmp_path / "out", backend="local", progress=False)
    assert not (tmp_path / "out").exists()


def test_variants_cross_the_grid_and_every_shipped_sweep_validates(tmp_path):
    """Every sweep file shipped (experiments/sweeps, the studies' sweeps) plans: each run's config loads."""
    sweep_file = write_sweep(tmp_path, 'seed = [0, 1]\n[variants.baseline]\n[variants.kl]\n"rl.beta" = 0.01\n')
    _, runs = plan(sweep_file, tmp_path / "out")
    assert [r.name for r in runs] == ["baseline-seed=0", "baseline-seed=1", "kl-seed=0", "kl-seed=1"]
    shipped = [*Path("experiments/sweeps").glob("*.toml"), *Path("experiments/studies").glob("*/*.toml")]
    assert {path.name for path in shipped} >= {"smoke.toml", "mitigations.toml", "core.toml", "phase.toml", "btx.toml"}
    for path in shipped:
        assert plan(path, tmp_path / path.parent.name / path.stem)[1]


def test_resume_keeps_finished_runs_and_starts_the_others(tmp_path):
    from experiments.sweep import run_one

    finished, fresh = tmp_path / "finished", tmp_path / "fresh"
    finished.mkdir()
    (finished / "report.html").write_text("<!doctype html>")
    missing_config = str(tmp_path / "no-such-config.toml")  # any run actually started fails on it
    assert run_one(missing_config, str(finished), resume=True)["status"] == "ok"
    started = run_one(missing_config, str(fresh), resume=True)  # not begun: started without --resume
    assert started["status"] == "failed" and "config file not found" in started["error"]
    assert run_one(missing_config, str(finished), resume=False)["status"] == "failed"


def files_with_identity(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Each file under `directory` as (inode, mtime in ns, size): any rewrite, even with the same bytes, shows."""
    return {str(path.relative_to(directory)): (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            for path in sorted(directory.rglob("*")) if path.is_file() for stat in [path.stat()]}


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_resume_finishes_exactly_the_missing_runs_of_a_killed_sweep(tmp_path):
    """`echolab sweep` SIGKILLed while its second run is mid-way (right after that run's checkpoint of step 2):
    the first run finished, the second interrupted, the third never started. `--resume` finishes exactly those
    two: the first run's files untouched, the second resumed from its checkpoint (the files of the steps
    before it untouched, each step logged once), the third run from the start."""
    (tmp_path / "base.toml").write_text(Path("experiments/configs/smoke.toml").read_text().replace('kind = "vllm"', 'kind = "hf"'))
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('base = "base.toml"\nname = "mixed"\n[grid]\n"rl.seed" = [0, 1, 2]\n')
    out = tmp_path / "out"
    environment = pinned_environment(ECHOLAB_CACHE=str(tmp_path / "cache"))
    first, second, third = (out / "runs" / f"seed={seed}" for seed in range(3))

    killed = subprocess.Popen(echolab_command("sweep", str(sweep_file), "--out", str(out), "--quiet"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env=environment)
    kill_when_written(killed, second / "checkpoints" / "step_000002")
    assert (first / "report.html").is_file() and not (second / "report.html").exists() and not third.exists()
    first_before, second_before = files_with_identity(first), files_with_identity(second)
    kept = [name for name in second_before if name.startswith(("checkpoints/step_000002/", "rollouts/step_000000",
                                                                 "rollouts/step_000001"))]
    assert len(kept) > 3

    resumed = subprocess.run(echolab_command("sweep", str(sweep_file), "--out", str(out), "--resume", "--quiet"),
                             capture_output=True, text=True, timeout=1200, env=environment)
    assert resumed.returncode == 0, resumed.stderr
    assert files_with_identity(first) == first_before  # finished: not run again
    second_after = files_with_identity(second)
    assert {name: second_after.get(name) for name in kept} == {name: second_before[name] for name in kept}
    for run in (second, third):
        assert logged_steps(run) == [0, 1, 2, 3] and (run / "report.html").is_file()  # step 3: the final model
        assert sorted(path.name for path in (run / "rollouts").iterdir()) == [f"step_00000{i}.parquet" for i in range(4)]
    results = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(Path(r["run_dir"]).name, r["status"]) for r in results] == [("seed=0", "ok"), ("seed=1", "ok"), ("seed=2", "ok")]
    assert "3 seeds" in (out / "report.html").read_text()
