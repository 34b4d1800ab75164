"""`analyze` and `report` on runs as other trainers write them: a verl rollout dump, a TRL completions folder and
a plain rollout file, each holding completions in the real datasets' shapes plus garbage (tests/real_runs.py).
Every figure is checked against the plan the run was written from."""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from pathlib import Path

import pandas as pd
import pytest

from analysis.load import InputWarning
from analysis.report import write_report
from analysis.sources import ReadOptions, first_and_last_steps, open_input, prompt_id, read_rollouts
from analysis.summary import analyze
from processes import echolab_command, pinned_environment
from real_runs import (PLAN, PROMPTS, SAMPLES, chat_prompt_as_decoded, expected, problems, write_rollout_file,
                       write_trl_output, write_verl_dump)
from specialists.errors import UserError
from test_report import CHROMIUM, PROBE, _chromium

ECHO = "echo-chamber"
ROWS = len(PLAN) * PROMPTS * SAMPLES


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, ReadOptions, int]]:
    """kind -> (input path, how to read it, first step)."""
    root = tmp_path_factory.mktemp("real")
    return {
        "verl": (write_verl_dump(root / "verl_dump"), ReadOptions(), 1),
        "trl": (write_trl_output(root / "grpo_output") / "completions", ReadOptions(correct_from="accuracy_reward"), 1),
        "file": (write_rollout_file(root / "rollouts.jsonl"), ReadOptions(), 0),
    }


def assert_matches_plan(summary: dict, first_step: int) -> None:
    plan = expected(first_step)
    assert summary["steps"] == plan["steps"]
    assert summary["formats"] == ["python_function", "llm_code", "gsm8k", "natural_language", "other"]
    assert summary["rows"] == ROWS and summary["prompts"] == PROMPTS
    for step in map(str, plan["steps"]):
        assert summary["format_share"][step] == pytest.approx(plan["format_share"][step], abs=1e-12)
        assert summary["accuracy"][step] == pytest.approx(plan["accuracy"][step], abs=1e-12)
        for name, value in plan["format_accuracy"][step].items():
            assert summary["format_accuracy"][step][name] == (None if value is None else pytest.approx(value, abs=1e-12))
    assert summary["collapse_step"] == plan["collapse_step"]
    assert summary["dominant_format"] == "python_function"


@pytest.mark.parametrize("kind", ["verl", "trl", "file"])
def test_analyze_recovers_the_plan(runs, kind, tmp_path):
    path, reading, first_step = runs[kind]
    summary = analyze(path, formats=ECHO, out_dir=tmp_path / "out", progress=False, reading=reading)
    assert_matches_plan(summary, first_step)
    assert summary["analysis"]["source"] == {"file": "echolab"}.get(kind, kind)
    # verl and the file carry gold answers (`gts`, `answer`): graded; TRL's log has none: its reward column decides
    graded = {"trl": "column"}.get(kind, "gold")
    assert summary["correctness"][graded] == ROWS
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    share = metrics[(metrics["metric"] == "format_share") & (metrics["format"] == "python_function")]
    assert share.set_index("step")["value"].to_dict() == pytest.approx(
        {step: expected(first_step)["format_share"][str(step)]["python_function"] for step in share["step"]})


def test_verl_rows_map_to_records(runs):
    path, _, _ = runs["verl"]
    table = read_rollouts(path)
    first = table[table["step"] == 1]
    # prompt_id: the hash of the decoded prompt, role words and all; sample_index: order within (step, prompt)
    assert set(first["prompt_id"]) == {prompt_id(chat_prompt_as_decoded(problem)) for problem in problems()}
    assert first.groupby("prompt_id")["sample_index"].apply(list).map(lambda s: s == list(range(SAMPLES))).all()
    assert table["answer"].notna().all() and table["reward"].isin([0.0, 1.0]).all()


def test_verl_correctness_from_a_reward_key_when_there_are_no_gts(tmp_path):
    dump = write_verl_dump(tmp_path / "dump", with_gts=False)
    summary = analyze(dump, formats=ECHO, progress=False, reading=ReadOptions(correct_from="acc"))
    assert_matches_plan(summary, 1)
    assert summary["correctness"]["column"] == ROWS
    assert (tmp_path / "dump_analysis" / "summary.json").is_file()  # beside the dump, not inside it
    assert sorted(p.name for p in dump.iterdir()) == ["1.jsonl", "2.jsonl", "3.jsonl", "4.jsonl"]


def test_trl_output_directory_with_an_answer_column_and_repeated_batches(tmp_path):
    output = write_trl_output(tmp_path / "grpo", repeat_batches=True, answer_column=True)
    with pytest.warns(InputWarning, match=r"completions_00002\.parquet: repeats the previous file's completions"):
        summary = analyze(output, formats=ECHO, progress=False)
    assert summary["steps"] == [1, 3, 5, 7] and summary["rows"] == ROWS  # each batch counted once, at its first step
    assert summary["correctness"]["gold"] == ROWS
    assert [summary["accuracy"][str(step)] for step in (1, 3, 5, 7)] == pytest.approx(
        [expected(1)["accuracy"][str(step)] for step in (1, 2, 3, 4)])


@pytest.mark.parametrize("repeat_batches", [False, True])
def test_first_and_last_steps_of_a_trl_output_directory(tmp_path, repeat_batches):
    """Only the first and the last two step files are read; a last batch logged twice counts at its first step,
    as `analyze` counts it (batches at steps 1, 3, 5, 7 when repeated)."""
    output = write_trl_output(tmp_path / "grpo", repeat_batches=repeat_batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        whole = read_rollouts(output)
        first, last = first_and_last_steps(open_input(output))
    last_step = 7 if repeat_batches else 4
    assert set(first["step"]) == {1} and set(last["step"]) == {last_step}
    for table, step in ((first, 1), (last, last_step)):
        expected_rows = whole[whole["step"] == step].reset_index(drop=True)
        pd.testing.assert_frame_equal(table.reset_index(drop=True), expected_rows)


def test_without_gold_or_a_correct_column_accuracy_is_null_and_the_report_says_why(runs, tmp_path):
    path, _, _ = runs["trl"]
    summary = analyze(path, formats=ECHO, out_dir=tmp_path / "out", progress=False)
    assert set(summary["accuracy"].values()) == {None} and summary["correctness"]["unknown"] == ROWS
    assert summary["format_share"]["4"]["python_function"] == 30 / 32  # formats need no answers
    text = write_report([path], tmp_path / "r.html", formats=ECHO, progress=False).read_text(encoding="utf-8")
    assert "Accuracy unknown: the rollouts carry no gold answers (no `answer` column in the completion logs)" in text


def test_a_table_with_a_column_map(tmp_path):
    rows = pd.read_json(write_rollout_file(tmp_path / "r.jsonl"), lines=True)
    table = pd.DataFrame({"global_step": rows["step"], "query": rows["prompt_id"].map(lambda p: f"Question {p}"),
                          "response": rows["completion"], "gold": rows["answer"]})
    table.to_csv(tmp_path / "table.csv", index=False)
    reading = ReadOptions(columns={"completion": "response", "prompt": "query", "step": "global_step", "answer": "gold"})
    assert_matches_plan(analyze(tmp_path / "table.csv", formats=ECHO, progress=False, reading=reading), 0)


def test_a_file_whose_steps_interleave_is_sorted_with_a_warning(runs, tmp_path):
    path, _, _ = runs["file"]
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines[::2] + lines[1::2]) + "\n")
    with pytest.warns(InputWarning, match="not together; reading the whole input into memory"):
        summary = analyze(shuffled, formats=ECHO, progress=False)
    assert_matches_plan(summary, 0)


@pytest.mark.parametrize("kind", ["verl", "trl", "file"])
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(runs, kind, tmp_path):
    path, reading, first_step = runs[kind]
    out = write_report([path], tmp_path / f"{kind}.html", formats=ECHO, reading=reading, progress=False)
    text = out.read_text(encoding="utf-8")
    head = text.split("<h2>")[0]
    assert f"Collapsed onto python_function at step {first_step + 3}" in head
    accuracy = expected(first_step)["accuracy"]
    first, last = accuracy[str(first_step)], accuracy[str(first_step + 3)]
    assert f"Accuracy {first:.2f} → {last:.2f}" in head
    # no metrics.jsonl in another trainer's output: one line says so; its samples are still shown, escaped
    assert "<h2>Training</h2><p>No RL metrics for " in text and "RL metrics over steps" not in text
    assert f"<h4>First step ({first_step})</h4>" in text and f"<h4>Last step ({first_step + 3})</h4>" in text
    assert "&lt;llm-code&gt;" in text and "<llm-code>" not in text
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium("--dump-dom", probe.as_uri()).stdout
    widths = [int(width) for width in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert 'data-probed="yes"' in dom and len(widths) == text.count("<img ") >= 4
    assert all(width > 300 for width in widths)


def test_the_commands_on_a_verl_dump_and_a_rollout_file(runs, tmp_path):
    verl, _, _ = runs["verl"]
    plain, _, _ = runs["file"]
    analysed = subprocess.run(echolab_command("analyze", str(verl), "--formats", ECHO, "--out", str(tmp_path / "a")),
                              capture_output=True, text=True, timeout=300, env=pinned_environment())
    assert analysed.returncode == 0, analysed.stderr
    assert json.loads(analysed.stdout) == {"formats": ["python_function", "llm_code", "gsm8k", "natural_language", "other"],
                                           "dominant_format": "python_function", "collapse_step": 4}
    out = tmp_path / "both.html"
    reported = subprocess.run(echolab_command("report", str(plain), str(verl), "--formats", ECHO, "--baseline", "verl_dump",
                                              "--out", str(out), "--quiet"),
                              capture_output=True, text=True, timeout=300, env=pinned_environment())
    assert reported.returncode == 0, reported.stderr
    text = out.read_text(encoding="utf-8")
    assert "difference vs baseline (verl_dump) [95% CI]" in text
    assert text.index("<strong>verl_dump</strong>") < text.index("<strong>rollouts</strong>")  # the baseline first


# ---------------------------------------------------------------- bad input: one line naming file and line

def _analyze_fails(path: Path, message: str, reading: ReadOptions | None = None) -> None:
    with pytest.raises(UserError, match=message) as error:
        analyze(path, formats=ECHO, progress=False, reading=reading)
    assert "\n" not in str(error.value)
    assert not path.with_name(f"{path.stem}_analysis").exists()  # nothing written


def test_verl_mixed_schemas(tmp_path):
    dump = write_verl_dump(tmp_path / "dump")
    lines = (dump / "2.jsonl").read_text().splitlines()
    record = json.loads(lines[4])
    del record["gts"]
    lines[4] = json.dumps(record)
    (dump / "2.jsonl").write_text("\n".join(lines) + "\n")
    _analyze_fails(dump, r"2\.jsonl line 5: mixed schemas: its keys differ from .*1\.jsonl line 1's \(missing gts\)")


def test_verl_missing_output_key(tmp_path):
    dump = write_verl_dump(tmp_path / "dump")
    for path in dump.iterdir():
        path.write_text(path.read_text().replace('"output"', '"response"'))
    _analyze_fails(dump, r"1\.jsonl: missing column 'output' for source verl \(columns: input, response, gts")


def test_verl_empty_step_file(tmp_path):
    dump = write_verl_dump(tmp_path / "dump")
    (dump / "3.jsonl").write_text("")
    _analyze_fails(dump, r"3\.jsonl: empty step file \(no rollout rows\)")


def test_verl_non_utf8_text(tmp_path):
    dump = write_verl_dump(tmp_path / "dump")
    data = (dump / "2.jsonl").read_bytes().split(b"\n")
    data[6] = data[6].replace(b"\"output\": \"", b"\"output\": \"\xff")
    (dump / "2.jsonl").write_bytes(b"\n".join(data))
    _analyze_fails(dump, r"2\.jsonl line 7: not UTF-8 text")


def test_a_cut_last_line_of_the_newest_step_file_is_skipped_with_a_warning(tmp_path):
    dump = write_verl_dump(tmp_path / "dump")
    newest = dump / "4.jsonl"
    whole = newest.read_bytes()
    newest.write_bytes(whole + '{"prompt": "caf'.encode() + "\u00e9".encode()[:1])  # cut inside a character
    with pytest.warns(InputWarning, match=r"4\.jsonl line 33: skipped a cut last line"):
        assert analyze(dump, formats=ECHO, progress=False)["rows"] == ROWS
    newest.write_bytes(whole[:-40])  # the trainer is still writing it
    with pytest.warns(InputWarning, match=r"4\.jsonl line 32: skipped a cut last line"):
        summary = analyze(dump, formats=ECHO, progress=False)
    assert summary["rows"] == ROWS - 1
    older = dump / "2.jsonl"
    older.write_text(older.read_text()[:-40])  # a cut line anywhere else is damage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        with pytest.raises(UserError, match=r"2\.jsonl line 32: not valid JSON"):
            analyze(dump, formats=ECHO, out_dir=tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()


def test_trl_mixed_schemas_and_missing_columns(tmp_path):
    output = write_trl_output(tmp_path / "grpo")
    folder = output / "completions"
    pd.read_parquet(folder / "completions_00003.parquet").drop(columns=["format_reward"]).to_parquet(
        folder / "completions_00003.parquet")
    _analyze_fails(output, r"completions_00003\.parquet: mixed schemas: its columns differ from .*completions_00001"
                           r"\.parquet's \(missing format_reward\)")
    for path in folder.iterdir():
        pd.read_parquet(path).drop(columns=["completion"]).to_parquet(path)
    _analyze_fails(output, r"completions_00001\.parquet: missing column 'completion' for source trl")


@pytest.mark.parametrize("reading, message", [
    (ReadOptions(correct_from="reward_typo"), r"1\.jsonl: missing column 'reward_typo' for source verl"),
    (ReadOptions(source="trl"), r"not a TRL output directory \(no completions/completions_NNNNN\.parquet files"),
])
def test_bad_reading_options_are_named_before_any_work(tmp_path, reading, message):
    _analyze_fails(write_verl_dump(tmp_path / "dump"), message, reading)


@pytest.mark.parametrize("options, message", [
    ({"source": "verl", "columns": {"completion": "x"}}, "--columns maps a table's columns: it goes with --source table"),
    ({"columns": {"answers": "x"}}, "--columns: unknown field answers"),
    ({"columns": {"completion": "x", "prompt": "y"}}, "--columns must name the table's step, completion and prompt"),
    ({"source": "openrlhf"}, "unknown source 'openrlhf'"),
])
def test_bad_read_options(options, message):
    with pytest.raises(UserError, match=message):
        ReadOptions(**options)


def test_the_cli_prints_a_skipped_cut_line_as_one_warning_line(tmp_path):
    dump = write_verl_dump(tmp_path / "dump")
    newest = dump / "4.jsonl"
    newest.write_text(newest.read_text()[:-40])
    result = subprocess.run(echolab_command("analyze", str(dump), "--formats", ECHO),
                            capture_output=True, text=True, timeout=300, env=pinned_environment())
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("echolab analyze: warning: ") and "4.jsonl line 32: skipped a cut last line" in line
