"""`write_report`: a self-contained HTML file that renders with its figures in headless Chromium, seeds pooled
into groups with confidence bands, the training story (settings, RL metrics, escaped sample completions),
summaries recomputed only when stale, and clear errors."""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import re
import subprocess
import tempfile
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from analysis import report
from analysis.load import read_run_config
from analysis.report import group_runs, load_run, write_report
from experiments.config import load_experiment_config
from model_families import build_checkpoint
from real_runs import PLAN, planned_rows
from specialists.formats import FORMAT_SETS, classify
from specialists.grading import answer_text
from specialists.run_directory import (CONFIG_FILE, METRICS_FILE, ROLLOUT_SCHEMA, SUMMARY_FILE, checkpoint_dir,
                                       rollout_file)
from specialists.errors import UserError
from test_analysis_summary import synthetic_rollouts, write_run_dir

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# Appended to a copy of the report: after load, record how each image decoded and what the reader sees: each
# figure's laid-out width and its share of drawn (not blank white) pixels, and the headings on the page.
PROBE = ('<script>window.addEventListener("load", () => { for (const image of document.images) { '
         'image.setAttribute("data-natural-width", image.naturalWidth); '
         'image.setAttribute("data-shown-width", image.getBoundingClientRect().width); '
         'let ink = 0, pixels = 0; if (image.naturalWidth > 0) { const canvas = document.createElement("canvas"); '
         'canvas.width = image.naturalWidth; canvas.height = image.naturalHeight; const context = canvas.getContext("2d"); '
         'context.drawImage(image, 0, 0); const data = context.getImageData(0, 0, canvas.width, canvas.height).data; '
         'pixels = data.length / 4; for (let i = 0; i < data.length; i += 4) { '
         'if (data[i + 3] > 0 && Math.min(data[i], data[i + 1], data[i + 2]) < 240) ink++; } } '
         'image.setAttribute("data-ink", pixels ? ink / pixels : 0); } '
         'const shown = (element) => element.getBoundingClientRect().height > 0; '
         'document.body.setAttribute("data-headings", [...document.querySelectorAll("h1, h2")].filter(shown)'
         '.map((heading) => heading.textContent).join("|")); '
         'document.body.setAttribute("data-findings", [...document.querySelectorAll(".findings")].filter(shown).length); '
         'document.body.setAttribute("data-probed", "yes"); });</script>')


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Three seeds of a collapsing baseline and two of a mitigation that keeps the formats mixed."""
    root = tmp_path_factory.mktemp("runs")
    baseline = [write_run_dir(synthetic_rollouts(seed=seed, steps=6), root / f"baseline-{seed}",
                              {"formats": "synthetic", "seed": seed, "rl": {"kl_coef": 0.0}}) for seed in range(3)]
    mitigation = [write_run_dir(synthetic_rollouts(seed=seed, steps=6, pull=0.3), root / f"kl-{seed}",
                                {"formats": "synthetic", "seed": seed, "rl": {"kl_coef": 0.1}}) for seed in range(2)]
    return baseline + mitigation


@pytest.fixture(scope="module")
def comparison_report(runs, tmp_path_factory) -> Path:
    return write_report(runs, tmp_path_factory.mktemp("out") / "report.html", progress=False)


def _chromium(*arguments: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments],
                              capture_output=True, text=True, timeout=180, check=True)


def test_report_is_self_contained(comparison_report):
    text = comparison_report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<script" not in text and "<link" not in text
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) >= 10
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_report_tells_the_findings_first(comparison_report):
    text = comparison_report.read_text(encoding="utf-8")
    head = text[: text.index("<h2>")]
    assert "rl.kl_coef=0.0 (3 seeds)" in head and "rl.kl_coef=0.1 (2 seeds)" in head
    assert re.search(r"3 of 3 runs collapsed \(one format &gt;= 90%\): onto python_function at steps", head)
    assert "No collapse" in head
    assert re.search(r"Expert 0 of layer \d carries \d+% of the routed tokens", head)
    assert "the specialists follow the formats" in head
    for section in ("Comparison", "Entropy and accuracy", "difference vs baseline (rl.kl_coef=0.0 (3 seeds)) [95% CI]"):
        assert section in text
    # the format shares of every group come first, before the findings
    assert text.index("<img ") < text.index('class="findings"')
    assert "Format shares over RL steps, one panel per group" in head


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)")
def test_report_renders_with_its_figures_in_headless_chromium(comparison_report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(comparison_report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium("--dump-dom", probe.as_uri()).stdout
    assert 'data-probed="yes"' in dom
    figures = comparison_report.read_text(encoding="utf-8").count("<img ")
    widths = [int(width) for width in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == figures
    assert all(width > 300 for width in widths)  # decoded figures, not broken-image placeholders
    # laid out on the page, and drawn: axes, lines and labels cover a part of each figure, never all of it
    assert [float(width) > 300 for width in re.findall(r'data-shown-width="([\d.]+)"', dom)] == [True] * figures
    ink = [float(share) for share in re.findall(r'data-ink="([\d.e-]+)"', dom)]
    assert len(ink) == figures and all(0.01 < share < 0.9 for share in ink), ink
    [headings] = re.findall(r'data-headings="([^"]*)"', dom)
    assert headings.split("|")[0] == "echolab report"
    assert {"Runs", "Comparison", "rl.kl_coef=0.0 (3 seeds)", "rl.kl_coef=0.1 (2 seeds)",
            "Entropy and accuracy"} <= set(headings.split("|"))
    assert re.findall(r'data-findings="(\d+)"', dom) == ["2"]  # one box of findings per group
    # what a reader's browser window shows of it: not a blank page (the size is the browser's to choose)
    screenshot = tmp_path / "report.png"
    _chromium(f"--screenshot={screenshot}", "--window-size=1200,2400", comparison_report.as_uri())
    pixels = matplotlib.image.imread(screenshot)
    assert min(pixels.shape[:2]) > 300 and pixels.std() > 0.05


def test_single_run_report(runs, tmp_path):
    out = write_report([runs[0]], tmp_path / "one.html", progress=False)
    head = out.read_text(encoding="utf-8").split("<h2>")[0]
    assert re.search(r"Collapsed onto python_function at step \d+ \(epoch [\d.]+\)", head)
    assert "Comparison" not in out.read_text(encoding="utf-8")


def test_seeds_are_pooled_and_other_differences_split_groups(runs):
    loaded = [report.Run(path, read_run_config(path), {}) for path in runs]
    groups = group_runs(loaded)
    assert [group.label for group in groups] == ["rl.kl_coef=0.0 (3 seeds)", "rl.kl_coef=0.1 (2 seeds)"]
    assert [len(group.runs) for group in groups] == [3, 2]
    assert [group.label for group in group_runs(loaded[:1])] == ["baseline-0"]


def test_summary_is_recomputed_only_when_stale(runs, monkeypatch):
    run = runs[1]
    load_run(run, progress=False)  # makes summary.json current
    calls = []
    monkeypatch.setattr(report, "analyze", lambda *args, **kwargs: calls.append(args) or {})
    load_run(run, progress=False)
    assert calls == []
    newer = (run / SUMMARY_FILE).stat().st_mtime + 10
    os.utime(run / "rollouts" / "step_000000.parquet", (newer, newer))
    load_run(run, progress=False)
    assert len(calls) == 1


def test_report_without_gold_answers_or_expert_data(tmp_path):
    table = synthetic_rollouts(steps=3).drop(columns=["answer", "expert_load", "logprob"])
    runs = [write_run_dir(table, tmp_path / name, {"seed": seed}) for seed, name in enumerate(["dense-0", "dense-1"])]
    text = write_report(runs, tmp_path / "r.html", progress=False).read_text(encoding="utf-8")
    assert "Accuracy unknown" in text and "Expert" not in text.split("<h2>")[0]
    assert text.count("<img ") >= 5


def test_bad_report_input(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        write_report([tmp_path], tmp_path / "r.html", progress=False)
    with pytest.raises(UserError, match="at least one input"):
        write_report([], tmp_path / "r.html", progress=False)


def test_an_unknown_baseline_is_named_before_any_analysis(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "analyze", lambda *args, **kwargs: pytest.fail("analysed before checking --baseline"))
    with pytest.raises(UserError, match=r"--baseline 'nope': no such group or input \(names: rl\.kl_coef=0\.0 \(3 seeds\), "
                                        r"rl\.kl_coef=0\.1 \(2 seeds\), baseline-0"):
        write_report(runs, tmp_path / "r.html", baseline="nope", progress=False)


def test_the_baseline_is_found_by_its_label_with_or_without_its_seed_count(tmp_path):
    configs = [{"seed": seed, "rl": {"kl_coef": coef}} for coef, seeds in ((0.0, 3), (0.1, 2)) for seed in range(seeds)]
    groups = group_runs([report.Run(tmp_path / str(index), config, {}) for index, config in enumerate(configs)])
    assert [group.label for group in groups] == ["rl.kl_coef=0.0 (3 seeds)", "rl.kl_coef=0.1 (2 seeds)"]
    assert report._baseline_index(groups, "rl.kl_coef=0.1") == report._baseline_index(groups, "rl.kl_coef=0.1 (2 seeds)") == 1
    with pytest.raises(UserError, match="no such group"):
        report._baseline_index(groups, "rl.kl_coef=0.1 (3 seeds)")


def test_sweep_runs_pool_across_rl_seeds_and_are_labelled_by_their_variants(tmp_path):
    def groups(configs):
        return [group.label for group in group_runs([report.Run(tmp_path / str(index), config, {})
                                                     for index, config in enumerate(configs)])]

    grpo = [{"name": f"core/grpo_kl1e-2-seed={seed}", "seed": 0, "rl": {"seed": seed, "beta": 0.01}} for seed in range(3)]
    kl = {"name": "core/kl-seed=0", "seed": 0, "rl": {"seed": 0, "beta": 0.1}}
    assert groups(grpo + [kl]) == ["grpo_kl1e-2 (3 seeds)", "kl"]
    # Variants that set keys the others leave at their defaults: the variant, not every key that differs somewhere
    dense = {"name": "btx/dense_grpo-seed=0", "seed": 0, "model": {"kind": "dense"}, "btx": {"mix_train": "router"}}
    btx = {"name": "btx/btx_grpo-seed=0", "seed": 0, "model": {"kind": "btx"}, "btx": {"mix_train": "all"}}
    assert groups([dense, btx]) == ["dense_grpo", "btx_grpo"]
    # Not one variant a group (runs of two sweeps, hand-named runs): the settings that tell the groups apart
    other_sweep = {**kl, "name": "mitigations/grpo_kl1e-2-seed=0", "rl": {"seed": 0, "beta": 0.2}}
    assert groups(grpo + [other_sweep]) == ["rl.beta=0.01 (3 seeds)", "rl.beta=0.2"]
    assert groups([{**kl, "name": "my run"}, {**kl, "name": "my run", "rl": {"beta": 0.2}}]) == ["rl.beta=0.1", "rl.beta=0.2"]


def test_btx_runs_get_the_specialist_dominance_finding_and_figure(tmp_path):
    """Two seeds of a BTX run (expert i = format i's specialist, 85% of each format routed there) collapsing onto
    python_function: its specialist takes over the routing, and the report says so and draws it."""
    config = {"model": {"kind": "btx", "num_experts": 3},
              "expert_specialists": ["python_function", "llm_code", "natural_language"]}
    runs = [write_run_dir(synthetic_rollouts(seed=seed, steps=4, experts=3), tmp_path / f"btx-{seed}",
                          {**config, "seed": seed}) for seed in range(2)]
    text = write_report(runs, tmp_path / "r.html", progress=False).read_text(encoding="utf-8")
    finding = re.search(r"Specialists trained apart \(means over layers\): at step 3 the python_function specialist "
                        r"carries (\d+)% of the routed tokens \(step 0: (\d+)%\)", text)
    assert finding and int(finding.group(1)) > int(finding.group(2)) + 30
    assert "alignment of each format with its own specialist: python_function 0." in text
    assert "Specialist dominance (experts trained apart)" in text
    without = write_report([write_run_dir(synthetic_rollouts(steps=4, experts=3), tmp_path / "moe", {"seed": 0})],
                           tmp_path / "moe.html", progress=False).read_text(encoding="utf-8")
    assert "Specialist" not in without
    # A BTX base that writes no known format yet (as barely trained ones do): no alignment to measure, no crash.
    unformatted = synthetic_rollouts(steps=2, experts=3).assign(completion="I do not know.")
    run = write_run_dir(unformatted, tmp_path / "btx-other", {**config, "seed": 0})
    text = write_report([run], tmp_path / "other.html", progress=False).read_text(encoding="utf-8")
    assert "alignment of each format with its own specialist: python_function n/a → n/a" in text


# ---------------------------------------------------------------- the training story, on realistic runs

SEEDS = (0, 1, 2)
SCRIPT = "I cannot solve this. <script>alert('pwned')</script>"  # no answer: format `other`
FINAL = len(PLAN) - 1  # steps 0..3; the last samples the final model without an update


def metrics_line(step: int, seed: int, rows: list[dict]) -> dict:
    """A metrics.jsonl line in the run directory's vocabulary (specialists.run_directory.METRICS, the keys and
    magnitudes of a real tiny GRPO run's line): reward from the step's rows, the update's statistics drifting
    with the step and differing by seed; the final step (no update) has nulls for them."""
    rewards = np.array([row["reward"] for row in rows])
    tokens = sum(row["num_tokens"] for row in rows)
    update = step < FINAL
    drift = (lambda value: value) if update else (lambda value: None)
    return {"step": step, "epoch": step / 4, "update": update, "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()), "accuracy": float(rewards.mean()), "frac_reward_zero_std": 0.25,
            "truncated_fraction": 0.0, "rollout_tokens": tokens, "loss": drift(-0.03 + 0.01 * step + 0.002 * seed),
            "policy_loss": drift(-0.05 + 0.01 * step), "kl_to_reference": 0.01 * step + 0.001 * seed,
            "entropy": 5.5 - 0.3 * step - 0.05 * seed, "clip_fraction": drift(0.2 - 0.04 * step + 0.01 * seed),
            "approx_kl": drift(0.03), "grad_norm": drift(1.3 - 0.2 * step + 0.1 * seed), "aux_loss": drift(2.0),
            "replay_loss": None, "updates": 2 if update else 0, "sample_time_s": 0.25, "score_time_s": 0.0003,
            "update_time_s": drift(0.22), "sync_time_s": drift(1e-5), "step_time_s": 1.0 + 0.1 * seed,
            "rollout_tokens_per_s": tokens / (0.25 + 0.01 * seed)}


def write_trained_run(run_dir: Path, seed: int, checkpoint: Path) -> Path:
    """An echolab run directory as `echolab run` writes it: the resolved config (the smoke preset with a KL
    penalty and KL-Cov, RL seed `seed`), rollouts in ROLLOUT_SCHEMA with the real datasets' shapes (OpenMath's
    <llm-code> cells among them; one completion holding a <script> tag), metrics.jsonl, a checkpoint."""
    config = load_experiment_config("experiments/configs/smoke.toml").model_dump(mode="json")
    config["rl"].update(seed=seed, beta=0.04)
    config["rl"]["mitigations"]["kl_cov"] = True
    config["analysis"]["formats"] = "echo-chamber"
    (run_dir / "rollouts").mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    formats = FORMAT_SETS["echo-chamber"]
    lines = []
    for step in range(len(PLAN)):
        planned = [row for row in planned_rows(first_step=0, seed=seed) if row["step"] == step]
        if step == FINAL:  # the last step's one prose completion becomes our script tag
            next(row for row in planned if row["shape"] == "prose")["completion"] = SCRIPT
        rows = [{"step": step, "epoch": step / 4, "prompt_id": str(row["problem"].id), "sample_index": index % 8,
                 "prompt": row["problem"].question, "completion": row["completion"],
                 "answer": answer_text(row["problem"].answer),
                 "reward": float(row["correct"]), "correct": row["correct"],
                 "format": classify(row["completion"], formats), "reason": "correct" if row["correct"] else "wrong",
                 "num_tokens": len(row["completion"].split()), "logprob": -0.5 * len(row["completion"]),
                 "expert_load": None} for index, row in enumerate(planned)]
        pq.write_table(pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA), rollout_file(run_dir, step))
        lines.append(json.dumps(metrics_line(step, seed, rows)))
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copytree(checkpoint, checkpoint_dir(run_dir, FINAL))
    return run_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt") / "qwen3_moe")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, checkpoint) -> tuple[list[Path], str]:
    root = tmp_path_factory.mktemp("trained")
    runs = [write_trained_run(root / f"grpo-{seed}", seed, checkpoint) for seed in SEEDS]
    out = write_report(runs, root / "report.html", progress=False)
    return runs, out.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(f"<h2>{heading}</h2>")
    return text[start: text.find("<h2>", start + 4)]


def test_report_tells_the_training_story_with_bands_across_seeds(trained):
    runs, text = trained
    section = _section(text, "Training")
    assert "RL metrics over steps from metrics.jsonl" in section and section.count("<img ") == 1
    assert "No RL metrics" not in section and "Not recorded" not in section  # all eight vocabulary metrics drawn
    group = group_runs([load_run(path, progress=False) for path in runs])[0]
    bands = report.training_bands([group])
    assert list(bands) == list(report.TRAINING_METRICS)
    loss = bands["loss"][group.label]
    # step 1: loss -0.03 + 0.01 + 0.002 * seed over seeds 0, 1, 2 -> mean -0.018, a band around it
    assert loss.loc[1, "mean"] == pytest.approx(-0.018) and loss.loc[1, "low"] < -0.018 < loss.loc[1, "high"]
    assert np.isnan(loss.loc[FINAL, "mean"])  # the final step made no update
    # reward_mean is the step's rollouts' mean reward: plan step 0 has 16 of 32 right
    assert bands["reward_mean"][group.label].loc[0, "mean"] == pytest.approx(16 / 32)


def test_settings_table_names_algorithm_hyperparameters_model_and_seeds(trained, checkpoint):
    _, text = trained
    section = _section(text, "Settings")
    parameters = AutoModelForCausalLM.from_pretrained(checkpoint).num_parameters()
    for setting, value in [("algorithm", "grpo (loss grpo)"), ("learning rate", "0.0001"),
                           ("KL coefficient (beta)", "0.04"), ("clip range (epsilon low / high)", "0.2"),
                           ("samples per prompt", "4"), ("steps", "3"), ("temperature", "1"),
                           ("max_new_tokens", "64"), ("mitigations on", "kl_cov (cov_ratio=0.002, kl_cov_coef=1)"),
                           ("model", "moe (built-in)"), ("engine", "vllm (float32)"),
                           ("model size", f"{parameters:,} parameters, 4 experts (2 per token), 2 layers (qwen3_moe)"),
                           ("seeds", "seed 0; rl.seed 0, 1, 2")]:
        assert f"<tr><td>{html.escape(setting)}</td><td>{html.escape(value)}</td></tr>" in section, setting
    runs_table = _section(text, "Runs")
    assert "seed=0, rl.seed=2" in runs_table and "None" not in runs_table


def test_samples_per_format_at_the_first_and_last_steps_are_escaped(trained):
    _, text = trained
    assert "<llm-code>" not in text and "&lt;llm-code&gt;" in text
    assert "<script" not in text and html.escape(SCRIPT) in text
    samples = text[text.index("<h3>Sample completions per format</h3>"):]
    first, last = samples.split("<h4>Last step")
    assert "<h4>First step (0)</h4>" in first and last.startswith(" (3)</h4>")
    # plan: at step 0, 8 of each run's 32 completions are TinyGSM functions; at step 3, 30 of 32
    assert "<details><summary>python_function: 24 of 96 completions (3 shown)</summary>" in first
    assert "<details><summary>python_function: 90 of 96 completions (3 shown)</summary>" in last
    assert "<details><summary>other: 3 of 96 completions (1 shown)</summary>" in last  # one script tag per run


def test_seeds_are_shown_by_name_and_a_seed_left_unset_is_not_one():
    # rl.seed None means "the top-level seed": the old label was "None, 0"
    unset, own = {"seed": 0, "rl": {"seed": None, "beta": 0.0}}, {"seed": 0, "rl": {"seed": 2, "beta": 0.0}}
    assert report.seed_labels(unset) == ["seed=0"]
    assert report.seed_labels(own) == ["seed=0", "rl.seed=2"]
    runs = [report.Run(Path(str(seed)), {"seed": seed, "rl": {"seed": None}}, {}) for seed in (3, 4)]
    assert report._group_seeds(report.Group("g", tuple(runs))) == "seed 3, 4"
    assert report._group_seeds(report.Group("g", (report.Run(Path("x"), own, {}),) * 2)) == "seed 0; rl.seed 2"


def test_mitigation_parameters_are_shown_beside_their_switch_only():
    """A switch's tuning parameter (MITIGATION_PARAMETERS) is never a mitigation of its own, whatever its default."""
    from rl.config import MITIGATION_PARAMETERS, MitigationSettings  # the tests may import rl; analysis may not

    assert report.MITIGATION_PARAMETERS == MITIGATION_PARAMETERS  # the report's copy of the typed config's `Tunes`

    defaults = {f"rl.mitigations.{name}": value for name, value in MitigationSettings().model_dump().items()}
    assert report._mitigations(defaults) == "none"  # e.g. prefix_kl_tokens = 3 and cov_ratio are on by default
    prefix = defaults | {"rl.mitigations.prefix_kl_coef": 0.1, "rl.mitigations.prefix_kl_tokens": 2}
    assert report._mitigations(prefix) == "prefix_kl_coef=0.1 (prefix_kl_tokens=2)"
    dynamic = prefix | {"rl.grpo.dynamic_sampling": True, "rl.grpo.dynamic_sampling_rounds": 3}
    assert report._mitigations(dynamic) == "prefix_kl_coef=0.1 (prefix_kl_tokens=2), dynamic sampling (dynamic_sampling_rounds=3)"
    outcome = defaults | {"rl.mitigations.outcome_exploration_coef": 0.5}  # mode "both" by default
    assert report._mitigations(outcome) == "outcome_exploration_coef=0.5 (outcome_exploration_mode=both)"


# ---------------------------------------------------------------- the phase diagram of a sweep over two keys

# (llm_code weight, difficulty) -> per RL seed: (the format the run drifts to, pull: 1 collapses, 0.3 does not)
PHASE_PLAN = {
    (0.1, "easy"): [("python_function", 1.0)] * 3,
    (0.1, "hard"): [("python_function", 1.0)] * 3,
    (1.0, "easy"): [("python_function", 1.0), ("llm_code", 1.0), ("natural_language", 1.0)],  # a three-way tie
    (1.0, "hard"): [("python_function", 1.0), ("llm_code", 1.0), ("python_function", 1.0)],
    (3.0, "easy"): [("llm_code", 1.0)] * 3,
    (3.0, "hard"): [("llm_code", 1.0), ("llm_code", 1.0), ("llm_code", 0.3)],  # one seed never collapses
}


@pytest.fixture(scope="module")
def phase_sweep(tmp_path_factory) -> tuple[list[Path], list[report.Run]]:
    """Part of the study's phase sweep (experiments/studies/echo_chamber/phase.toml) as `echolab sweep` lays it
    out: each run's config as the sweep planned it, its rollouts drifting towards the planned format and its
    analysis (made once per planned drift: analysing 18 runs would take minutes)."""
    from experiments.sweep import plan

    root = tmp_path_factory.mktemp("phase")
    analysed = {}
    for index, drift in enumerate(dict.fromkeys(drift for cell in PHASE_PLAN.values() for drift in cell)):
        winner, pull = drift
        config = {"seed": 0, "analysis": {"formats": "synthetic"}}
        analysed[drift] = write_run_dir(synthetic_rollouts(seed=index, steps=6, winner=winner, pull=pull),
                                        root / "analysed" / str(index), config)
        load_run(analysed[drift], progress=False)
    _, planned = plan("experiments/studies/echo_chamber/phase.toml", root / "sweep")
    runs = []
    for run in planned:
        config = load_experiment_config(run.config_path)
        cell = (config.mixture.formats["llm_code"].weight, config.mixture.formats["llm_code"].difficulty)
        if cell in PHASE_PLAN:
            shutil.copytree(analysed[PHASE_PLAN[cell][config.rl.seed]], run.run_dir)
            (run.run_dir / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json")), encoding="utf-8")
            for name in (SUMMARY_FILE, "metrics.parquet"):  # the analysis stays newer than the config
                os.utime(run.run_dir / name)
            runs.append(run.run_dir)
    assert len(runs) == 18
    return runs, [load_run(path, progress=False) for path in runs]


def test_a_sweep_over_two_keys_gets_a_phase_diagram(phase_sweep):
    """The report's phase-diagram section (render_html puts it after the comparison; the whole report of 18 runs
    in 6 groups takes minutes to draw on a loaded machine)."""
    runs, loaded = phase_sweep
    section = report.phase_section(group_runs(loaded))
    assert section.startswith("<h2>Phase diagram</h2>")
    assert section.count("<img ") == 1 and "winning format per cell (majority over seeds)" in section
    summaries = {path.name: json.loads((path / SUMMARY_FILE).read_text()) for path in runs}

    def collapse(cell: str) -> str:
        steps = [summaries[f"{cell}-seed={seed}"]["collapse_step"] for seed in (0, 1, 2)]
        collapsed = [step for step in steps if step is not None]
        return f"collapse {np.mean(collapsed):.1f} ({len(collapsed)}/3)"

    rows = {row[0]: row[1:] for row in re.findall(r"<tr>(.*?)</tr>", section)
            for row in [re.findall(r"<t[dh]>(.*?)</t[dh]>", row)]}
    header = rows.pop("mixture.formats.llm_code.difficulty / mixture.formats.llm_code.weight")
    assert header == [f"mixture.formats.llm_code.weight={weight}" for weight in ("0.1", "1", "3")]
    assert rows["mixture.formats.llm_code.difficulty=easy"] == [
        f"python_function (3/3) · {collapse('weight=0.1-difficulty=easy')}",
        f"tie: {' / '.join(sorted(['python_function', 'llm_code', 'natural_language']))} (1/3 each) · "
        f"{collapse('weight=1.0-difficulty=easy')}",
        f"llm_code (3/3) · {collapse('weight=3.0-difficulty=easy')}"]
    assert rows["mixture.formats.llm_code.difficulty=hard"] == [
        f"python_function (3/3) · {collapse('weight=0.1-difficulty=hard')}",
        f"python_function (2/3) · {collapse('weight=1.0-difficulty=hard')}",
        # the seed that drifted less ends on llm_code too but never collapsed: the mean is over the two that did
        f"llm_code (3/3) · {collapse('weight=3.0-difficulty=hard')}"]
    assert summaries["weight=3.0-difficulty=hard-seed=2"]["collapse_step"] is None


def test_only_a_sweep_over_exactly_two_crossed_keys_gets_a_phase_diagram(phase_sweep):
    _, loaded = phase_sweep
    x_key, xs, y_key, ys, cells = report.phase_grid(group_runs(loaded))
    assert (x_key, xs, y_key, ys) == ("mixture.formats.llm_code.weight", [0.1, 1.0, 3.0],
                                      "mixture.formats.llm_code.difficulty", ["easy", "hard"])
    assert cells[(1.0, "hard")].winners == {"python_function": 2, "llm_code": 1} and cells[(1.0, "easy")].winner is None
    one_weight = [run for run in loaded if run.config["mixture"]["formats"]["llm_code"]["weight"] == 0.1]
    assert report.phase_grid(group_runs(one_weight)) is None  # one key left
    diagonal = [run for run in loaded if (run.config["mixture"]["formats"]["llm_code"]["weight"],
                                          run.config["mixture"]["formats"]["llm_code"]["difficulty"])
                in ((0.1, "easy"), (1.0, "hard"), (3.0, "easy"))]
    assert report.phase_grid(group_runs(diagonal)) is None  # 2 keys, 3 cells, but never crossed
    assert report.phase_section(group_runs(one_weight)) == ""
