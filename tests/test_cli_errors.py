"""Bad input: a one-line error naming the problem, a non-zero exit, no traceback, and nothing already written lost.

Each command is run as the user runs it (a subprocess) where that is cheap; checks that live in a pure
function (the rollout loader, the atomic writer) are also tested in-process, which is fast.
"""

import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from processes import echolab_command, on_a_small_disk, pinned_environment
from specialists.errors import UserError

COMMANDS = ("pretrain", "evaluate", "run", "analyze", "report", "sweep")
ROLLOUT = {"step": 0, "prompt_id": 1, "completion": "The answer is 3."}


def run_cli(*args, cwd=None):
    return subprocess.run(echolab_command(*args), capture_output=True, text=True, cwd=cwd, timeout=120,
                          env=pinned_environment())


def assert_one_line_error(result, *fragments, exit_code=1):
    """README's promise ("Bad input"): one line on stderr, no traceback, exit code 1 (2 for bad arguments)."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_run_dir(path, rows=(ROLLOUT,)):
    """A minimal run directory: one step's rollouts."""
    (path / "rollouts").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path / "rollouts" / "step_000000.parquet")
    return path


def test_help_works_for_every_command():
    result = run_cli("--help")
    assert result.returncode == 0 and all(command in result.stdout for command in COMMANDS)
    for command in COMMANDS:
        assert run_cli(command, "--help").returncode == 0


@pytest.mark.parametrize("args, fragments", [
    (["nope"], ["invalid choice: 'nope'"]),
    (["analyze", "r.jsonl", "--threshold", "abc"], ["echolab analyze: error", "--threshold", "'abc'"]),
    (["sweep", "s.toml", "--backend", "slurm"], ["--backend", "'slurm'"]),
    (["run", "c.toml", "--resume", "--overwrite"], ["not allowed with"]),
    (["run"], ["echolab run: error: the following arguments are required: config"]),
])
def test_bad_arguments_are_one_line_too_with_exit_code_2(args, fragments):
    assert_one_line_error(run_cli(*args), *fragments, exit_code=2)


# ---------------------------------------------------------------- configs: pretrain, run, and a sweep's base

CONFIG_ERRORS = [  # every command that reads an experiment config gives these: file, line, key, what is wrong
    ('[model\n', ["config.toml: not valid TOML", "line 1"]),
    ('seed = 1\nseed = 2\n', ["config.toml: not valid TOML", "line 2"]),
    ('seed = 0\nsede = 1\n', ["config.toml line 2: unknown key sede (did you mean seed?); allowed in the top level:",
                               "seed"]),
    ('[pretrain]\nlearning_rte = 0.1\n', ["config.toml line 2: unknown key pretrain.learning_rte (did you mean "
                                          "pretrain.learning_rate?); allowed in pretrain:"]),
    ('seed = "x"\n', ["config.toml line 1: seed: ", "integer", "(got 'x')"]),
    ('[rl]\nsteps = -1\n', ["config.toml line 2: rl.steps: ", "greater than or equal to 1", "(got -1)"]),
    ('[rl]\nalgorithm = "gpro"\n', ["config.toml line 2: rl.algorithm: ", "'grpo', 'ppo' or 'ei'",
                                    "(got 'gpro'; did you mean 'grpo'?)"]),
    ('[logging]\nreport_to = ["trackio"]\n', ["config.toml line 2: logging.report_to", "'tensorboard', 'wandb' or "
                                             "'mlflow'", "got 'trackio'"]),
]
SPECIALISTS_CONFIG_ERRORS = [  # the model's own constraints (checked by the same validation, so pretrain only)
    ('[model]\nkind = "transformer"\n', ["line 2: model.kind", "'moe', 'dense' or 'btx'"]),
    ('[mixture.formats.python_function]\nweight = -1\n', ["line 2: mixture.formats.python_function.weight",
                                                          "greater than 0"]),
    ('[mixture.formats.latex]\nweight = 1\n', ["line 1: mixture: unknown format 'latex'; format set 'synthetic' has:"]),
    ('[mixture.formats.natural_langauge]\nweight = 1\n', ["(did you mean 'natural_language'?)"]),
    ('[model]\nhidden_size = 100\n', ["line 2: model: hidden_size must be a multiple of 32"]),
    ('[model]\nhead_dim = 48\n', ["line 2: model: head_dim"]),
]


def config_command(command, config, tmp_path):
    """The arguments that make `command` read `config`: pretrain and run take it directly, sweep as its base."""
    if command == "sweep":
        sweep = tmp_path / "sweep.toml"
        sweep.write_text(f'base = "{config.name}"\n[grid]\nseed = [0]\n')
        return ["sweep", str(sweep), "--out", str(tmp_path / "out")]
    return [command, str(config), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("command, toml, fragments", [
    *[(command, toml, fragments) for command in ("pretrain", "run", "sweep") for toml, fragments in CONFIG_ERRORS],
    *[("pretrain", toml, fragments) for toml, fragments in SPECIALISTS_CONFIG_ERRORS],
])
def test_bad_configs_are_named(tmp_path, command, toml, fragments):
    config = tmp_path / "config.toml"
    config.write_text(toml)
    assert_one_line_error(run_cli(*config_command(command, config, tmp_path)), *fragments)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def _not_utf8(path):
    path.write_bytes(b"seed = \xff\n")


@pytest.mark.parametrize("command", ["pretrain", "run", "sweep"])  # the file is the config, or the sweep file
@pytest.mark.parametrize("make, fragments", [
    (lambda path: None, ["config file not found", "config.toml"]),
    (lambda path: path.mkdir(), ["config.toml is a directory, not a config file"]),
    (_not_utf8, ["config.toml: not a text file"]),
], ids=["missing", "directory", "not-utf8"])
def test_config_files_that_cannot_be_read(tmp_path, command, make, fragments):
    config = tmp_path / "config.toml"
    make(config)
    args = [command, str(config), "--out", str(tmp_path / "out")]
    assert_one_line_error(run_cli(*args), *fragments)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- sweep files

@pytest.mark.parametrize("sweep, fragments", [
    ('base = "base.toml"\nfoo = 1\n', ["sweep.toml line 2: unknown key foo", "allowed in the top level: base, grid"]),
    ('name = "x"\n', ["sweep.toml: base: Field required"]),
    ('base = "base.toml"\n[grid]\n"rl.stepz" = [1]\n',
     ["sweep.toml line 3: grid: unknown key rl.stepz (did you mean rl.steps?)"]),
    ('base = "base.toml"\n[grid]\nseed = []\n', ["sweep.toml line 3: grid key 'seed' needs at least one value"]),
    ('base = "base.toml"\n[grid]\nseed = 3\n', ["sweep.toml line 3: grid.seed", "list", "got 3"]),
    ('base = "base.toml"\n[grid]\n"seed.x" = [1]\n', ["sweep.toml line 3: key 'seed.x': 'seed' is not a section"]),
    ('base = "base.toml"\n[variants.kl]\n"rl.betta" = 0.1\n',
     ["sweep.toml line 3: variants.kl: unknown key rl.betta (did you mean rl.beta?)"]),
    ('base = "base.toml"\nvariants = {}\n', ["sweep.toml line 2: [variants] needs at least one variant"]),
    # the first run is valid, the second is not: still no run config may be written
    ('base = "base.toml"\n[grid]\n"rl.steps" = [1, 0]\n', ["sweep.toml line 3 (run steps=0): rl.steps", "got 0"]),
    # a rule of two settings names the line of the one to change first: here set by the grid ...
    ('base = "base.toml"\n[grid]\n"rl.sampling.samples_per_prompt" = [4, 1]\n',
     ["sweep.toml line 3 (run samples_per_prompt=1): rl: GRPO needs sampling.samples_per_prompt >= 2"]),
    # ... and here by the base config (beta; the grid sets the algorithm)
    ('base = "base.toml"\n[grid]\n"rl.algorithm" = ["grpo", "ei"]\n',
     ["base.toml line 3 (run algorithm=ei of sweep.toml): rl: Expert Iteration has no KL term"]),
    ('base = "base.toml"\n[grid]\n"rl.grpo.num_iterations" = [2, 1]\n',
     ["base.toml line 4 (run num_iterations=1 of sweep.toml): rl: epsilon_high needs grpo.num_iterations > 1"]),
    ('base = "."\n', ["sweep.toml line 1: base '.': no config file at"]),
])
def test_bad_sweeps_fail_before_anything_is_written(tmp_path, sweep, fragments):
    (tmp_path / "base.toml").write_text("seed = 0\n[rl]\nbeta = 0.1\nepsilon_high = 0.28\n[rl.grpo]\nnum_iterations = 2\n")
    (tmp_path / "sweep.toml").write_text(sweep)
    assert_one_line_error(run_cli("sweep", "sweep.toml", "--out", "out", cwd=tmp_path), *fragments)
    assert not (tmp_path / "out").exists()


def test_a_relative_base_starts_from_the_sweep_files_folder(tmp_path):
    (tmp_path / "base.toml").write_text("seed = 0\n")  # where the command runs, not next to the sweep file
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "sweep.toml").write_text('base = "base.toml"\n')
    assert_one_line_error(run_cli("sweep", "sweeps/sweep.toml", "--out", "out", cwd=tmp_path),
                          f"sweeps/sweep.toml line 1: base 'base.toml': no config file at {tmp_path.resolve() / 'sweeps' / 'base.toml'}",
                          "a relative base starts from the sweep file's folder")


# ---------------------------------------------------------------- evaluate

def test_evaluate_names_a_missing_or_incomplete_checkpoint(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("seed = 1\n")
    assert_one_line_error(run_cli("evaluate", str(config), str(tmp_path / "no-model")), "no-model: no such model directory")
    (tmp_path / "model").mkdir()
    assert_one_line_error(run_cli("evaluate", str(config), str(tmp_path / "model")), "not a model checkpoint (no config.json)")
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / "no-dir" / "evaluation.json"
    assert_one_line_error(run_cli("evaluate", str(config), str(tmp_path / "model"), "--out", str(out)),
                          f"--out {out}: no such directory")


def test_run_names_a_missing_data_file_before_any_work(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[rl]\nprompts = "no/such/gsm8k.jsonl"\n')
    assert_one_line_error(run_cli("run", str(config), "--out", str(tmp_path / "run")), "rl.prompts", "not found")
    config.write_text('[analysis]\nformats = "no-such-formats.toml"\n')
    assert_one_line_error(run_cli("run", str(config), "--out", str(tmp_path / "run")), "unknown format set")
    (tmp_path / "formats.toml").write_text('[[format]\nname = "x"\n')
    config.write_text(f'[analysis]\nformats = "{tmp_path / "formats.toml"}"\n')
    assert_one_line_error(run_cli("run", str(config), "--out", str(tmp_path / "run")), "formats.toml: not valid TOML")
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_is_not_installed_is_refused_with_the_config(tmp_path, monkeypatch):
    from experiments import config as experiment_config

    monkeypatch.setitem(experiment_config.TRACKER_MODULES, "wandb", "echolab_no_such_tracker_module")
    config = tmp_path / "config.toml"
    config.write_text('[logging]\nreport_to = ["tensorboard", "wandb"]\n')
    with pytest.raises(UserError, match=r"config.toml line 2: logging.report_to: wandb is not installed"):
        experiment_config.load_experiment_config(config)


# ---------------------------------------------------------------- analyze: rollout files (in-process: the loader)

def _jsonl(*lines):
    return "".join(line + "\n" for line in lines)


GOOD = json.dumps(ROLLOUT)


@pytest.mark.parametrize("name, content, message", [
    ("r.jsonl", "", r"r\.jsonl: empty \(no rollout rows\)"),
    ("r.jsonl", "\n  \n", r"r\.jsonl: empty"),
    ("r.jsonl", _jsonl(GOOD, "", '{"step": 0, "prompt_id": 1 "completion": "x"}'),
     r"r\.jsonl line 3: not valid JSON \(Expecting ',' delimiter\)"),
    ("r.jsonl", _jsonl(GOOD, "[1, 2]"), r"r\.jsonl line 2: expected a JSON object"),
    ("r.jsonl", b'{"step": 0}\n\xff\xfe\n', r"r\.jsonl line 2: not UTF-8 text"),
    ("r.jsonl", _jsonl('{"step": 0, "prompt_id": 1}'), r"r\.jsonl: missing required column 'completion'"),
    ("r.jsonl", _jsonl("{}"), "missing required columns 'step', 'prompt_id', 'completion'"),
    ("r.jsonl", _jsonl(GOOD, '{"step": 1, "completion": "x"}'), r"r\.jsonl line 2: required column 'prompt_id' is missing"),
    ("r.jsonl", _jsonl('{"step": "abc", "prompt_id": 1, "completion": "x"}'),
     r"r\.jsonl line 1: column 'step' must hold integers, got 'abc'"),
    ("r.jsonl", _jsonl(GOOD, '{"step": 1.5, "prompt_id": 1, "completion": "x"}'), "line 2: column 'step' must hold integers"),
    ("r.jsonl", _jsonl('{"step": 0, "prompt_id": 1, "completion": 5}'), "line 1: column 'completion' must hold strings, got 5"),
    ("r.jsonl", _jsonl('{"step": 0, "prompt_id": 1, "completion": "x", "correct": "yes"}'),
     "line 1: column 'correct' must hold true/false, got 'yes'"),
    ("r.jsonl", _jsonl('{"step": 0, "prompt_id": 1, "completion": "x", "reward": "high"}'), "column 'reward' must hold numbers"),
    ("r.jsonl", _jsonl('{"step": 0, "prompt_id": 1, "completion": "x", "expert_load": "abc"}'),
     "line 1: column 'expert_load' must hold lists"),
    ("r.jsonl", _jsonl('{"step": 0, "prompt_id": 1, "completion": "x", "expert_load": [[1, 2]]}',
                       '{"step": 0, "prompt_id": 1, "completion": "x", "expert_load": [[1, 2], [3]]}'),
     "line 2: column 'expert_load' must have the same number of layers and experts"),
    ("r.jsonl", _jsonl('{"step": 0, "prompt_id": 1, "completion": "x", "expert_load": [[1, -2]]}'),
     "line 1: column 'expert_load' must hold non-negative token counts"),
    ("r.csv", "step,prompt_id,completion\n0,1,x\n", r"r\.csv: rollout files must end in \.jsonl or \.parquet"),
    ("r.parquet", b"PAR1 not really", r"r\.parquet: not a readable Parquet file"),
])
def test_bad_rollout_files_name_file_line_and_column(tmp_path, name, content, message):
    from analysis.sources import read_rollouts
    from specialists.errors import UserError

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=message) as error:
        read_rollouts(path)
    assert "\n" not in str(error.value)


def test_bad_parquet_rows_are_named_by_file_and_row(tmp_path):
    from analysis.sources import read_rollouts
    from specialists.errors import UserError

    run = write_run_dir(tmp_path / "run", [ROLLOUT, {**ROLLOUT, "step": None}])
    with pytest.raises(UserError, match=r"step_000000\.parquet row 2: required column 'step' is missing or null"):
        read_rollouts(run)
    pq.write_table(pa.Table.from_pylist([]), tmp_path / "empty.parquet")
    with pytest.raises(UserError, match=r"empty\.parquet: empty \(no rollout rows\)"):
        read_rollouts(tmp_path / "empty.parquet")


# ---------------------------------------------------------------- analyze: the command

@pytest.mark.parametrize("args, fragments", [
    (["rollouts.jsonl"], ["rollouts.jsonl line 3: not valid JSON (Expecting"]),
    (["rollouts.jsonl", "--threshold", "1.5"], ["collapse threshold must be in (0, 1], got 1.5"]),
    (["empty-run"], ["empty-run: not a run directory (no rollouts/*.parquet files)"]),
])
def test_analyze_names_bad_input(tmp_path, args, fragments):
    (tmp_path / "rollouts.jsonl").write_text(_jsonl(GOOD, GOOD, '{"step": 0,'))
    (tmp_path / "empty-run").mkdir()
    assert_one_line_error(run_cli("analyze", *args, cwd=tmp_path), *fragments)
    assert not (tmp_path / "rollouts_analysis").exists()


def test_analyze_with_bad_formats_keeps_the_old_summary(tmp_path):
    run = write_run_dir(tmp_path / "run")
    (run / "summary.json").write_text('{"old": true}\n')
    (tmp_path / "formats.yaml").write_text("format:\n  - name: x\n   detect: [\n")
    assert_one_line_error(run_cli("analyze", "run", "--formats", "formats.yaml", cwd=tmp_path),
                          "formats.yaml line 3: not valid YAML")
    assert (run / "summary.json").read_text() == '{"old": true}\n'


@pytest.mark.parametrize("formats, message", [
    ("nonsense", r"unknown format set 'nonsense': .*synthetic"),
    ("echo_chamber", r"unknown format set 'echo_chamber' \(did you mean 'echo-chamber'\?\): not a file"),
    ("keys.toml", r"keys\.toml: format #1 has unknown keys 'detcet' \(did you mean 'detect'\?\); allowed"),
    ("formats.txt", r"formats\.txt: format files must end in \.toml, \.yaml or \.yml"),
    ("formats.toml", r"formats\.toml: not valid TOML \(.*line 1"),
    ("formats.yaml", r"formats\.yaml line 3: not valid YAML"),
    ("entries.toml", r"entries\.toml: format #1 is not a table of keys"),
    ("detect.toml", r"detect\.toml: format 'x': "),
    # the format's own check names it once, not "format 'x': format 'x': ..."
    ("group.toml", r"group\.toml: format 'x': the answer pattern needs a named group \(\?P<answer>\.\.\.\)$"),
])
def test_bad_format_sets_are_named(tmp_path, formats, message):
    from analysis.summary import resolve_formats
    from specialists.errors import UserError

    (tmp_path / "formats.txt").write_text("")
    (tmp_path / "formats.toml").write_text('[[format]\nname = "x"\n')
    (tmp_path / "formats.yaml").write_text("format:\n  - name: x\n   detect: [\n")
    (tmp_path / "entries.toml").write_text("format = [1]\n")
    (tmp_path / "detect.toml").write_text('[[format]]\nname = "x"\ndetect = 5\n')
    (tmp_path / "keys.toml").write_text('[[format]]\nname = "x"\ndetcet = "x"\n')
    (tmp_path / "group.toml").write_text('[[format]]\nname = "x"\ndetect = "x"\nanswer = "[0-9]+"\n')
    name = formats if formats in ("nonsense", "echo_chamber") else str(tmp_path / formats)
    with pytest.raises(UserError, match=message) as error:
        resolve_formats(name, None)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("threshold", [0.0, 1.5, float("nan")])
def test_analyze_threshold_must_be_in_0_1(tmp_path, threshold):
    from analysis.summary import analyze
    from specialists.errors import UserError

    path = tmp_path / "r.jsonl"
    path.write_text(_jsonl(GOOD))
    with pytest.raises(UserError, match=r"collapse threshold must be in \(0, 1\]"):
        analyze(path, collapse_threshold=threshold, progress=False)
    assert not (tmp_path / "r_analysis").exists()


# ---------------------------------------------------------------- report

def test_report_names_bad_runs_and_keeps_an_existing_report(tmp_path):
    assert_one_line_error(run_cli("report", str(tmp_path)), "not a run directory")
    run = write_run_dir(tmp_path / "run")  # no summary.json: report analyses it, with the run config's formats
    (run / "config.json").write_text('{"analysis": {"formats": "no-such-formats.toml"}}')
    old = tmp_path / "report.html"
    old.write_text("the old report")
    assert_one_line_error(run_cli("report", str(run), "--out", str(old), "--quiet"),
                          "run: no up-to-date summary.json, and analysing it failed", "no-such-formats.toml")
    assert old.read_text() == "the old report"


def test_report_names_an_impossible_out_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    assert_one_line_error(run_cli("report", "no-run", "--out", "a-file/report.html", cwd=tmp_path),
                          "cannot write into a-file: a-file is a file, not a directory")


@pytest.mark.parametrize("out, message", [
    ("a-file/report.html", "a-file is a file, not a directory"),
    ("a-dir", "a-dir is a directory; give the path of a file"),
    ("/proc/echolab/report.html", "cannot write into /proc/echolab"),  # not writable, even for root
])
def test_impossible_output_paths_are_named(tmp_path, out, message):
    from analysis.output import check_output_file
    from specialists.errors import UserError

    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(UserError, match=message):
        check_output_file(tmp_path / out)
    check_output_file(tmp_path / "new" / "folder" / "report.html")  # missing folders are made when writing
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- writers are atomic

def test_replace_atomically_keeps_the_old_files_when_a_write_fails(tmp_path):
    from specialists.files import replace_atomically

    summary, metrics = tmp_path / "summary.json", tmp_path / "metrics.parquet"
    summary.write_text("old summary")
    metrics.write_text("old metrics")

    def fail(path):
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_atomically({summary: lambda path: path.write_text("new summary"), metrics: fail})
    assert (summary.read_text(), metrics.read_text()) == ("old summary", "old metrics")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet", "summary.json"]  # no temporary left
    replace_atomically({summary: lambda path: path.write_text("new summary")})
    assert summary.read_text() == "new summary"


def test_a_full_disk_ends_analyze_with_the_systems_message_and_keeps_the_earlier_results(tmp_path):
    """A real full file system (a small tmpfs; see processes.on_a_small_disk) under `analyze --out`: the
    earlier summary.json and metrics.parquet there stay whole, no partial file is left, and the command ends
    with exit code 1 and one line: the system's words and the file's name."""
    from analysis.summary import analyze
    from test_analysis_summary import synthetic_rollouts, write_run_dir

    run = write_run_dir(synthetic_rollouts(seed=0, steps=8), tmp_path / "run", {"formats": "synthetic", "seed": 0})
    earlier = tmp_path / "earlier"
    analyze(run, out_dir=earlier, collapse_threshold=0.8, progress=False)  # other results than the new ones
    # The earlier results, then the disk filled up but for room for the new summary.json (written first) and one
    # page: too little for the new metrics.parquet, so the new summary must not replace the earlier one either.
    page = 4096
    room = -(-(earlier / "summary.json").stat().st_size // page) * page + page
    script = ('cp -a "$EARLIER"/. "$DISK"/ && '
              f'head -c $(( $(df --output=avail -B1 "$DISK" | tail -1) - {room} )) /dev/zero > "$DISK/filler"; '
              f'{" ".join(echolab_command("analyze", str(run), "--out", "$DISK", "--quiet"))}; '
              'code=$?; rm "$DISK/filler"; exit $code')
    disk, after = tmp_path / "disk", tmp_path / "after"
    result = on_a_small_disk(script, disk, "512k", after, EARLIER=str(earlier))
    assert_one_line_error(result, "echolab analyze: error: No space left on device: ", str(disk / "metrics.parquet"))
    assert sorted(path.name for path in after.iterdir()) == ["metrics.parquet", "summary.json"]  # nothing partial
    for name in ("metrics.parquet", "summary.json"):
        assert (after / name).read_bytes() == (earlier / name).read_bytes()
