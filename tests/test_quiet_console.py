"""`echolab run` on the smoke config as a user runs it: `--quiet` prints the final summary lines only; without it,
our progress bars and one line per step, and nothing of vLLM's, TRL's or torch's logging."""

import subprocess

import pytest

from processes import echolab_command, pinned_environment

SMOKE = "experiments/configs/smoke.toml"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def echolab_run(cache, out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run(echolab_command("run", SMOKE, "--out", str(out), *flags), capture_output=True, text=True,
                          env=pinned_environment(ECHOLAB_CACHE=str(cache)), timeout=1800)


@pytest.fixture(scope="module")
def quiet_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("quiet") / "run"
    return out, echolab_run(cache, out, "--quiet")


def test_quiet_prints_only_the_final_summary(quiet_run):
    out, result = quiet_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"run directory: {out}" and lines[-1] == f"report: {out / 'report.html'}"
    assert lines[1].startswith("formats at step 3: ")
    assert lines[2].startswith(("collapse: onto ", "no collapse"))
    assert len(lines) <= 5  # plus at most the step-0 warning


def test_without_quiet_our_bars_and_step_lines_only(cache, quiet_run, tmp_path):
    result = echolab_run(cache, tmp_path / "run")  # the base is pretrained (and cached) by the quiet run
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in ("INFO", "WARNING", "Warning", "[W", "Loading safetensors", "Loading weights", "Writing model shards"):
        assert noise not in output, noise
    step_lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in step_lines] == ["step 0/3", "step 1/3", "step 2/3", "step 3/3"]
