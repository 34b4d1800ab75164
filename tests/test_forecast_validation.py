"""The forecast in `echolab analyze`'s summary and report, and the study's validation script, on small
synthetic run directories whose format shares follow replicator dynamics (or stay flat)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from analysis.forecast import ReplicatorFit
from analysis.report import write_report
from analysis.summary import analyze
from rl.recorder import Recorder, Rollout
from specialists.formats import FORMAT_SETS, OTHER
from specialists.grading import answer_text
from specialists.tasks import generate_problems, prompt_text

FORMATS = FORMAT_SETS["synthetic"]
NAMES = [f.name for f in FORMATS] + [OTHER]
STEPS, PROMPTS, SAMPLES = 30, 8, 8
STUDY = Path(__file__).parents[1] / "experiments" / "studies" / "echo_chamber"


def write_run(run_dir: Path, eta: float, accuracy: list[float], seed: int) -> None:
    """A run directory whose step-t formats are drawn from the replicator shares at t (start: equal shares of the
    three formats, 2% other), rendered on real problems, `correct` drawn from the format's accuracy."""
    start = np.array([0.33, 0.33, 0.32, 0.02])
    shares = ReplicatorFit(tuple(NAMES), np.array(accuracy), np.log(start), eta, 0).shares(np.arange(STEPS))
    rng = np.random.default_rng(seed)
    recorder = Recorder(run_dir)
    recorder.write_config({"formats": "synthetic", "seed": seed, "eta": eta})
    for step in range(STEPS):
        rows = []
        for problem in generate_problems(PROMPTS, seed=1000 * seed + step, split="train"):
            for index, choice in enumerate(rng.choice(len(NAMES), size=SAMPLES, p=shares[step])):
                text = "no idea" if choice == 3 else FORMATS[choice].render(problem, "easy")
                correct = bool(rng.random() < accuracy[choice])
                rows.append(Rollout(step=step, epoch=step / STEPS, prompt_id=problem.id, sample_index=index,
                                    prompt=prompt_text(problem), completion=text, answer=answer_text(problem.answer),
                                    reward=float(correct), correct=correct, format=None, reason="",
                                    num_tokens=len(text.split()), logprob=None))
        recorder.write_rollouts(step, rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("forecast-runs")
    collapsing = [0.82, 0.12, 0.07, 0.0]  # the study's base accuracies on an AVX-512 CPU
    write_run(root / "grpo-seed=0", 0.25, collapsing, seed=0)
    write_run(root / "grpo-seed=1", 0.25, collapsing, seed=1)
    write_run(root / "flat-seed=0", 0.25, [0.5, 0.5, 0.5, 0.0], seed=2)  # equally accurate formats: no winner
    return [root / "grpo-seed=0", root / "grpo-seed=1", root / "flat-seed=0"]


def load_script(name: str = "forecast_validation"):
    spec = importlib.util.spec_from_file_location(name, STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_analyze_forecasts_from_the_first_ten_steps_and_the_report_shows_it(runs, tmp_path):
    summary = analyze(runs[0], progress=False)
    forecast = summary["collapse_forecast"]
    assert forecast["fitted_steps"] == list(range(10)) and forecast["horizon"] == STEPS - 1
    assert forecast["winner"] == "python_function"
    assert summary["collapse_step"] is not None  # eta 0.25 crosses 0.9 at step 16 in expectation
    assert forecast["low"] <= summary["collapse_step"] <= (forecast["high"] or STEPS)
    assert set(forecast["shares"]) == {str(step) for step in range(STEPS)}
    flat = analyze(runs[2], progress=False)
    assert flat["collapse_step"] is None and flat["collapse_forecast"]["collapse_step"] is None
    html = write_report(runs, tmp_path / "report.html", progress=False).read_text()
    assert all(f"<figcaption>{run.name}: replicator forecast from steps 0–9" in html for run in runs)
    assert "collapse onto python_function at step" in html and "no collapse by step 29" in html


def test_validation_script_tabulates_forecast_against_outcome(runs, capsys):
    lines = load_script().main([str(run) for run in runs] + ["--steps", "5", "10"])
    printed = capsys.readouterr().out
    assert printed.strip() == "\n".join(lines).strip()
    rows = [line for line in lines if line.startswith("| grpo") or line.startswith("| flat")]
    assert len(rows) == 6  # 3 runs x 2 windows
    # The K = 10 rows agree with the forecast `analyze` stored (same window, threshold and seed).
    for run in runs:
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else analyze(run, progress=False)
        forecast = summary["collapse_forecast"]
        row = next(line for line in rows if line.startswith(f"| {run.name} | 10 |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2].startswith(forecast["winner"])
        assert cells[3].split(" ")[0] == str(forecast["collapse_step"]).replace("None", "none")
        assert cells[5] == str(summary["collapse_step"]).replace("None", "none")
    totals = next(line for line in lines if line.startswith("| 10 |"))
    assert totals.split("|")[3].strip() == "2/2"  # the two runs that collapsed, both onto python_function


def test_simulation_script_prints_its_table(capsys):
    load_script("forecast_simulation").main(["--runs", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 0.12 | 27 | 3/3 |") and lines[3].startswith("| 0.19 | 17 | 3/3 |")
