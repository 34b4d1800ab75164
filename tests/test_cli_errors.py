"""Bad input: a one-line error naming the problem, a non-zero exit, no traceback."""

import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_works_for_every_command():
    result = run_cli("--help")
    assert result.returncode == 0 and "pretrain" in result.stdout
    for command in ("pretrain", "evaluate"):
        assert run_cli(command, "--help").returncode == 0


@pytest.mark.parametrize("toml, fragments", [
    ('[model]\nkind = "transformer"\n', ["model.kind", "'moe' or 'dense'"]),
    ('[mixture.formats.python_function]\nweight = -1\n', ["weight", "greater than 0"]),
    ('[mixture.formats.latex]\nweight = 1\n', ["unknown formats", "latex"]),
    ('[model]\nhidden_size = 100\n', ["multiple of 32"]),
    ('[model]\nhead_dim = 48\n', ["head_dim"]),
    ('[pretrain]\nlearning_rte = 0.1\n', ["unknown key pretrain.learning_rte", "learning_rate"]),
    ('seed = 0\nsede = 1\n', ["unknown key sede", "allowed"]),
    ('[model\n', ["not valid TOML"]),
])
def test_bad_configs_are_named(tmp_path, toml, fragments):
    config = tmp_path / "config.toml"
    config.write_text(toml)
    assert_one_line_error(run_cli("pretrain", str(config), "--out", str(tmp_path / "out")), *fragments)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_missing_files_are_named(tmp_path):
    assert_one_line_error(run_cli("pretrain", str(tmp_path / "nope.toml"), "--out", str(tmp_path)), "config file not found")
    config = tmp_path / "config.toml"
    config.write_text("seed = 1\n")
    assert_one_line_error(run_cli("evaluate", str(config), str(tmp_path / "no-model")), "not a model checkpoint")


def test_run_names_a_missing_data_file_before_any_work(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[rl]\nprompts = "no/such/gsm8k.jsonl"\n')
    assert_one_line_error(run_cli("run", str(config), "--out", str(tmp_path / "run")), "rl.prompts", "not found")
    config.write_text('[analysis]\nformats = "no-such-formats.toml"\n')
    assert_one_line_error(run_cli("run", str(config), "--out", str(tmp_path / "run")), "unknown format set")
    assert not (tmp_path / "run").exists()


def test_analyze_and_report_name_bad_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(run_cli("analyze", str(empty)), "empty")
    assert_one_line_error(run_cli("report", str(tmp_path)), "not a run")
