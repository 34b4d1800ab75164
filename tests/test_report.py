"""`write_report`: a self-contained HTML file that renders with its figures in headless Chromium, seeds pooled
into groups with confidence bands, summaries recomputed only when stale, and clear errors."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import tempfile
from pathlib import Path

import matplotlib.image
import pytest

from analysis import report
from analysis.load import read_run_config
from analysis.report import group_runs, load_run, write_report
from specialists.run_directory import SUMMARY_FILE
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
    assert headings.split("|")[:3] == ["echolab report", "Runs", "Comparison"]
    assert {"rl.kl_coef=0.0 (3 seeds)", "rl.kl_coef=0.1 (2 seeds)", "Entropy and accuracy"} <= set(headings.split("|"))
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


def test_sweep_runs_pool_across_rl_seeds_despite_their_names(tmp_path):
    configs = [{"name": f"core/grpo-seed={seed}", "seed": 0, "rl": {"seed": seed, "beta": 0.0}} for seed in range(3)]
    configs.append({"name": "core/kl-seed=0", "seed": 0, "rl": {"seed": 0, "beta": 0.01}})
    loaded = [report.Run(tmp_path / str(index), config, {}) for index, config in enumerate(configs)]
    assert [group.label for group in group_runs(loaded)] == ["rl.beta=0.0 (3 seeds)", "rl.beta=0.01"]
