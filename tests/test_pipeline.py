"""`echolab run` end to end on the smoke config: the run directory, determinism, and resume after a kill."""

import json
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from experiments.config import load_experiment_config
from experiments.pipeline import _prepare_run_dir, run_experiment
from processes import echolab_command, kill_when_written, on_a_small_disk, pinned_environment
from rl.recorder import Recorder
from specialists.errors import UserError
from specialists.model import load_model

SMOKE = "experiments/configs/smoke.toml"
SMOKE_TEXT = Path(SMOKE).read_text()
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


def smoke_variant(tmp_path, engine="vllm", algorithm="grpo"):
    """The smoke config with another rollout engine or algorithm (same base model)."""
    path = tmp_path / f"smoke-{engine}-{algorithm}.toml"
    path.write_text(SMOKE_TEXT.replace('kind = "vllm"', f'kind = "{engine}"')
                    .replace('algorithm = "grpo"', f'algorithm = "{algorithm}"'))
    return load_experiment_config(path)


def flat(tree, prefix=""):
    """A nested JSON object as {"a/b/c": leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {key: leaf for name, child in tree.items() for key, leaf in flat(child, f"{prefix}{name}/").items()}


def metrics_without_timing(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not any(t in k for t in TIMING)} for line in lines]


def rollouts(run_dir):
    import pandas as pd

    table = pd.concat(pd.read_parquet(path) for path in sorted((run_dir / "rollouts").glob("*.parquet")))
    return table[["step", "prompt_id", "sample_index", "completion", "reward", "format"]].reset_index(drop=True)


def test_run_directory_follows_the_spec(smoke_run):
    names = {p.name for p in smoke_run.iterdir()}
    assert {"config.json", "rollouts", "metrics.jsonl", "checkpoints", "summary.json", "report.html"} <= names
    # 3 update steps, then the final model's step 3 (checkpoint 3 holds that model)
    assert sorted(p.name for p in (smoke_run / "rollouts").iterdir()) == [f"step_00000{i}.parquet" for i in range(4)]
    assert [line["update"] for line in metrics_without_timing(smoke_run)] == [True, True, True, False]
    assert sorted(p.name for p in (smoke_run / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert SPEC_SUMMARY_KEYS <= set(summary)
    assert list(summary["format_share"]) == ["0", "1", "2", "3"]
    assert (smoke_run / "report.html").read_text().lstrip().lower().startswith("<!doctype html")


def tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    """RUN/tensorboard's scalars as {tag: {step: value}} (the last value of a step, as TensorBoard shows it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def test_each_step_is_logged_to_tensorboard_as_analyze_computes_it(smoke_run):
    """[logging] report_to defaults to tensorboard: the driver's tracker observer logs every step live."""
    logged = tensorboard_scalars(smoke_run)
    summary = json.loads((smoke_run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    for line in metrics:
        step = line["step"]
        for name, share in summary["format_share"][str(step)].items():
            assert logged[f"format_share/{name}"][step] == pytest.approx(share, abs=1e-6), (step, name)
        assert logged["accuracy/mean"][step] == pytest.approx(summary["accuracy"][str(step)], abs=1e-6)
        assert logged["train/reward_mean"][step] == pytest.approx(line["reward_mean"], abs=1e-6)
        assert logged["time/step_time_s"][step] == pytest.approx(line["step_time_s"], rel=1e-6)
    assert sorted(logged["train/reward_mean"]) == [0, 1, 2, 3]
    assert sorted(logged["train/loss"]) == [0, 1, 2]  # the final model's step has no update


def test_same_config_and_seed_give_the_same_metrics(smoke_run, tmp_path):
    again = tmp_path / "again"
    run_experiment(load_experiment_config(SMOKE), again, progress=False)
    assert metrics_without_timing(again) == metrics_without_timing(smoke_run)
    assert json.loads((again / "summary.json").read_text()) == json.loads((smoke_run / "summary.json").read_text())


def start_run(run_dir, *flags, config=SMOKE):
    """`echolab run` in its own process group (its vLLM and sandbox workers included), as a user starts it."""
    return subprocess.Popen(echolab_command("run", str(config), "--out", str(run_dir), "--quiet", *flags),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=pinned_environment())


def test_a_run_killed_twice_and_resumed_equals_the_uninterrupted_one(smoke_run, tmp_path):
    """Real SIGKILLs of a real run: once mid-run before any checkpoint (resume restarts at step 0 over the
    records already written), once right after the checkpoint of step 2 (resume starts there)."""
    killed = tmp_path / "killed"
    # step 0's records appear a whole step before the first checkpoint (after step 1): the kill lands between
    kill_when_written(start_run(killed), killed / "rollouts" / "step_000000.parquet")
    assert not (killed / "checkpoints" / "step_000002").exists()
    second = start_run(killed, "--resume")
    kill_when_written(second, killed / "checkpoints" / "step_000002")
    assert f"resuming {killed} at step 0 from the base model" in second.stderr.read()
    # What the resume from checkpoint 2 must leave alone: steps 0-1's records and checkpoint 2 itself (a restart
    # from scratch would rewrite them, by rename: new inodes).
    kept = [killed / "rollouts" / "step_000000.parquet", killed / "rollouts" / "step_000001.parquet",
            *sorted((killed / "checkpoints" / "step_000002").iterdir())]
    before = [(path.stat().st_ino, path.stat().st_mtime_ns) for path in kept]
    finished = start_run(killed, "--resume")
    assert finished.wait(timeout=600) == 0, finished.stderr.read()
    assert f"resuming {killed} at step 2 from {killed / 'checkpoints' / 'step_000002'}" in finished.stderr.read()
    assert [(path.stat().st_ino, path.stat().st_mtime_ns) for path in kept] == before

    # The final model and optimiser state are the uninterrupted run's (to float32 rounding; Adam's step exactly).
    resumed_model, whole_model = (load_model(run / "checkpoints" / "step_000003") for run in (killed, smoke_run))
    for (name, resumed), whole in zip(resumed_model.state_dict().items(), whole_model.state_dict().values(), strict=True):
        assert torch.allclose(resumed, whole, rtol=1e-4, atol=1e-6), name
    resumed_state, whole_state = (torch.load(run / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=True)
                                  ["optimizer"]["state"] for run in (killed, smoke_run))
    assert resumed_state.keys() == whole_state.keys()
    for key, moments in whole_state.items():
        assert torch.equal(resumed_state[key]["step"], moments["step"]) and moments["step"].item() == 3
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(resumed_state[key][name], moments[name], rtol=1e-4, atol=1e-9), (key, name)

    # Every step exactly once, with the same completions; losses equal up to float32 rounding (a model
    # reloaded from disk can sum in another order than the one kept in memory).
    assert rollouts(killed).equals(rollouts(smoke_run))
    resumed_metrics = metrics_without_timing(killed)
    assert [line["step"] for line in resumed_metrics] == [0, 1, 2, 3]
    for resumed, uninterrupted in zip(resumed_metrics, metrics_without_timing(smoke_run), strict=True):
        assert resumed.keys() == uninterrupted.keys()
        for key, value in uninterrupted.items():  # null where a metric does not apply, in both
            expected = pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value
            assert resumed[key] == expected, (resumed["step"], key)
    # Counted from the completions: exact. Token entropy sums vLLM's sampling log-probs, which can differ in the
    # last digits between processes with other thread counts (tests/processes.py pins them for every process).
    resumed, uninterrupted = (flat(json.loads((run / "summary.json").read_text())) for run in (killed, smoke_run))
    assert resumed.keys() == uninterrupted.keys()
    for key, value in resumed.items():
        assert value == (pytest.approx(uninterrupted[key], rel=1e-6) if key.startswith("token_entropy") else
                         uninterrupted[key]), key
    assert not list(killed.rglob("*.tmp")) and not (killed / "heldout").exists()  # no [rl.evaluation]: no heldout/
    # TensorBoard: each step once (the resumed run purged the redone steps' earlier events), with its final value
    assert tensorboard_scalars(killed)["accuracy/mean"] == tensorboard_scalars(smoke_run)["accuracy/mean"]


def disk_usage(paths) -> int:
    """Bytes the files under `paths` take on disk, in whole 4 KiB pages (as a tmpfs counts them)."""
    files = [path for root in paths for path in ([root] if root.is_file() else root.rglob("*")) if path.is_file()]
    return sum(-(-path.stat().st_size // 4096) * 4096 for path in files)


def test_a_full_disk_ends_run_with_one_line_and_keeps_the_earlier_steps(smoke_run, tmp_path):
    """`echolab run` into a real small file system (a tmpfs; processes.on_a_small_disk) with room for steps 0-2
    and checkpoint 2 but only half of checkpoint 3 (written after step 2's update): exit code 1, one line with
    the system's words and the file, and what was written before is whole: steps 0-2's rollouts (the
    uninterrupted run's), their metrics lines, checkpoint 2 (loadable, the last checkpoint), no partial file."""
    from test_cli_errors import assert_one_line_error

    checkpoint_3 = disk_usage([smoke_run / "checkpoints" / "step_000003"])
    before_it = disk_usage([smoke_run / "config.json", smoke_run / "metrics.jsonl", smoke_run / "tensorboard",
                            smoke_run / "checkpoints" / "step_000002",
                            *(smoke_run / "rollouts" / f"step_00000{step}.parquet" for step in range(3))])
    size = before_it + checkpoint_3 // 2
    script = " ".join(echolab_command("run", str(Path(SMOKE).resolve()), "--out", "$DISK/run", "--quiet"))
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    result = on_a_small_disk(script, disk, str(size), kept)
    assert_one_line_error(result, "echolab run: error: No space left on device: ",
                          str(disk / "run" / "checkpoints" / "step_000003"))
    run = kept / "run"
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert Recorder(run).last_checkpoint() == (2, run / "checkpoints" / "step_000002")
    model = load_model(run / "checkpoints" / "step_000002")
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    torch.load(run / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=True)
    assert [line["step"] for line in metrics_without_timing(run)] == [0, 1, 2]
    uninterrupted = rollouts(smoke_run)
    assert rollouts(run).equals(uninterrupted[uninterrupted["step"] < 3].reset_index(drop=True))
    assert not list(run.rglob("*.tmp"))


def test_an_existing_run_is_kept_unless_resumed_or_overwritten(smoke_run, tmp_path):
    with pytest.raises(UserError, match="--resume .* --overwrite"):
        run_experiment(load_experiment_config(SMOKE), smoke_run, progress=False)
    other = tmp_path / "other.toml"
    other.write_text(SMOKE_TEXT.replace("steps = 3", "steps = 4"))
    with pytest.raises(UserError, match="different config"):
        run_experiment(load_experiment_config(other), smoke_run, resume=True, progress=False)
    assert len(metrics_without_timing(smoke_run)) == 4  # untouched


def test_a_run_started_before_a_setting_existed_resumes(tiny_moe_dir, tmp_path):
    """config.json without a key echolab gained later (at its default) is the same config; a changed value, a key
    echolab does not know and a missing key set away from its default are not. Both kinds of base: the built-in
    one, and a `model.path` checkpoint (whose config refuses the pretraining keys its dump holds at their
    defaults, so the saved dump cannot simply be validated again)."""
    with_path = tmp_path / "with-path.toml"
    with_path.write_text(f'name = "p"\n[model]\npath = "{tiny_moe_dir}"\n[rl]\nsteps = 3\n')
    for config_path in (Path(SMOKE), with_path):
        resolved = load_experiment_config(config_path).model_dump(mode="json")
        older = tmp_path / f"older-{config_path.stem}"
        older.mkdir()

        def resumes(saved: dict) -> bool:
            (older / "config.json").write_text(json.dumps(saved))
            try:
                _prepare_run_dir(older, resolved, resume=True, overwrite=False)
            except UserError as error:
                assert "different config" in str(error)
                return False
            return True

        saved = json.loads(json.dumps(resolved))
        assert resumes(saved)
        del saved["rl"]["mitigations"]["format_kl_coef"]
        assert resumes(saved)
        saved["rl"]["mitigations"]["format_kl_coef"] = 0.5
        assert not resumes(saved)
        assert not resumes({**resolved, "unknown": 1})
        assert not resumes({**resolved, "rl": {key: value for key, value in resolved["rl"].items() if key != "steps"}})


def test_the_hf_engine_gives_the_same_metrics_for_the_same_config_and_seed(tmp_path):
    config = smoke_variant(tmp_path, engine="hf")
    run_experiment(config, tmp_path / "first", progress=False)
    run_experiment(config, tmp_path / "second", progress=False)
    assert metrics_without_timing(tmp_path / "first") == metrics_without_timing(tmp_path / "second")
    assert (json.loads((tmp_path / "first" / "summary.json").read_text())
            == json.loads((tmp_path / "second" / "summary.json").read_text()))


def test_heldout_evaluation_runs_through_the_pipeline_into_the_report(tmp_path):
    """`[rl.evaluation]` in a config: the pipeline hands the driver the task's held-out problems (drawn with the
    experiment's seed), the run directory gets heldout/ files at the evaluated steps, and the analysis and the
    report read them."""
    from rl.rollouts import load_heldout_problems

    path = tmp_path / "smoke-heldout.toml"
    path.write_text(SMOKE_TEXT.replace('kind = "vllm"', 'kind = "hf"')
                    + "\n[rl.evaluation]\nevery = 2\nnum_problems = 4\nsamples_per_problem = 2\n")
    config = load_experiment_config(path)
    report = run_experiment(config, tmp_path / "run", progress=False)
    heldout = sorted(path.name for path in (tmp_path / "run" / "heldout").iterdir())
    assert heldout == ["step_000000.parquet", "step_000002.parquet", "step_000003.parquet"]
    problems = {problem.id for problem in load_heldout_problems(config.rl, config.seed, config.task)}
    for name in heldout:
        table = pq.read_table(tmp_path / "run" / "heldout" / name).to_pandas()
        assert set(table["prompt_id"]) == problems and len(table) == 4 * 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["heldout"]["steps"] == [0, 2, 3] and summary["heldout"]["budgets"] == [1, 2]
    assert "Held-out pass@k" in report.read_text()

    # The trackers got the held-out metrics live, at the evaluated steps only, as `analyze` computes them.
    logged, heldout = tensorboard_scalars(tmp_path / "run"), summary["heldout"]
    for k in ("1", "2"):
        expected = {int(step): by_k[k] for step, by_k in heldout["pass_at_k"].items()}
        assert logged[f"heldout/pass_at_k/{k}"] == pytest.approx(expected, abs=1e-6), k
    assert logged["heldout/accuracy/mean"] == pytest.approx({int(s): v for s, v in heldout["accuracy"].items()}, abs=1e-6)
    for name in heldout["formats"]:
        assert logged[f"heldout/format_share/{name}"] == pytest.approx(
            {int(step): shares[name] for step, shares in heldout["format_share"].items()}, abs=1e-6), name


def nan_from_the_third_call(original):
    calls = []

    def poisoned(*args, **kwargs):
        rewards, grades = original(*args, **kwargs)
        calls.append(1)
        return (rewards * float("nan") if len(calls) >= 3 else rewards), grades

    return poisoned


def test_a_nan_reward_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from rl.rollouts import Rewards

    monkeypatch.setattr(Rewards, "__call__", nan_from_the_third_call(Rewards.__call__))
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"step 2: the reward is nan .*last good checkpoint is .*step_000002") as raised:
        run_experiment(smoke_variant(tmp_path, engine="hf"), run_dir, progress=False)
    assert "\n" not in str(raised.value)
    assert [line["step"] for line in metrics_without_timing(run_dir)] == [0, 1]
    assert Recorder(run_dir).last_checkpoint() == (2, run_dir / "checkpoints" / "step_000002")
    assert torch.isfinite(torch.stack([p.sum() for p in load_model(run_dir / "checkpoints" / "step_000002").parameters()])).all()
    assert not (run_dir / "summary.json").exists()


def poison_grpo_loss(monkeypatch):
    import rl.grpo

    clipped = rl.grpo.clipped_policy_loss

    def infinite(*args):
        loss, clip_fraction = clipped(*args)
        return loss * float("inf"), clip_fraction

    monkeypatch.setattr(rl.grpo, "clipped_policy_loss", infinite)


def poison_ppo_loss(monkeypatch):
    import rl.ppo

    monkeypatch.setattr(rl.ppo, "clipped_value_loss", lambda values, *args: values.sum() * float("nan"))


@pytest.mark.parametrize("algorithm, poison", [("grpo", poison_grpo_loss), ("ppo", poison_ppo_loss)])
def test_a_non_finite_loss_stops_the_run_before_the_update(tmp_path, monkeypatch, algorithm, poison):
    poison(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"step 0: the loss is (nan|inf|-inf) .*no checkpoint was written"):
        run_experiment(smoke_variant(tmp_path, engine="hf", algorithm=algorithm), run_dir, progress=False)
    assert not list((run_dir / "checkpoints").iterdir())


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a gradient that turns NaN while the loss stays finite (as sqrt or
    a norm at zero do)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@contextmanager
def nan_gradients_in_training():
    """Every embedding's output, in a training forward with gradients, passes through NaNGradient. A global
    module hook (torch's public API), so it reaches the model whatever algorithm builds and trains it;
    rollouts (no grad) and the loss values are untouched."""
    def poison(module, inputs, output):
        if isinstance(module, torch.nn.Embedding) and module.training and torch.is_grad_enabled() and output.requires_grad:
            return NaNGradient.apply(output)
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


# not EI: the smoke model's rounds have no correct sample to fine-tune on
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_nan_gradient_norm_stops_the_run_with_one_line(tmp_path, capsys, algorithm):
    """Through the CLI's entry point (in this process, so that the poison reaches the model): exit code 1 and
    one line naming the step, before the update (no checkpoint, no analysis)."""
    from experiments.cli import main
    from experiments.pipeline import base_model

    config = tmp_path / "config.toml"
    config.write_text(SMOKE_TEXT.replace('kind = "vllm"', 'kind = "hf"').replace('algorithm = "grpo"', f'algorithm = "{algorithm}"'))
    base_model(load_experiment_config(config), progress=False)  # pretrained before the poison: RL's gradients only
    run_dir = tmp_path / "run"
    with nan_gradients_in_training():
        assert main(["run", str(config), "--out", str(run_dir), "--quiet"]) == 1
    # the last line (transformers' own "Loading weights" bars come before it, --quiet or not)
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and err.count("echolab run: error") == 1
    assert re.fullmatch(r"echolab run: error: step 0: the gradient norm is nan \(.*\); the run stopped and no "
                        r"checkpoint was written .*", line), line
    assert not list((run_dir / "checkpoints").iterdir()) and not (run_dir / "summary.json").exists()


def test_an_unwritable_run_directory_is_named_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run(echolab_command("run", SMOKE, "--out", str(blocker / "run")),
                            capture_output=True, text=True, timeout=120, env=pinned_environment())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"echolab run: error: Not a directory: {blocker / 'run'}")


def test_analyze_gives_the_same_summary_for_the_recorder_files_and_an_external_jsonl(smoke_run, tmp_path):
    from analysis.summary import analyze

    import pyarrow.parquet as pq

    rows = [row for path in sorted((smoke_run / "rollouts").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    external = tmp_path / "rollouts.jsonl"
    external.write_text("".join(json.dumps(row) + "\n" for row in rows))  # json writes floats exactly
    from_run = analyze(smoke_run, formats="synthetic", out_dir=tmp_path / "from_run", progress=False)
    from_file = analyze(external, formats="synthetic", out_dir=tmp_path / "from_file", progress=False)
    assert from_file == from_run


def test_the_report_measures_where_the_policy_left_its_base(smoke_run):
    """The report of a real run computes the per-token KL to the base (found in the pretraining cache) on a sample
    of each measured step's completions and keeps it in the run directory: 0 at step 0, where the model is the
    base; positive once GRPO has updated it; each value the exact KL of the checkpoint to the base at that position."""
    import pandas as pd

    from experiments.pipeline import base_model
    from specialists.tokenizer import load_tokenizer

    tokens = pd.read_parquet(smoke_run / "base_divergence.parquet")
    assert sorted(tokens["step"].unique()) == [0, 2, 3]  # step 0 and the checkpointed steps
    by_step = tokens.groupby("step")["kl"]
    assert by_step.max()[0] == 0 and by_step.mean()[3] > 0 and (tokens["entropy"] > 0).all()
    assert tokens.groupby("step")[["prompt_id", "sample_index"]].apply(lambda r: len(r.drop_duplicates())).tolist() == [16] * 3
    # by hand: the longest sampled completion of step 3, one sequence through the final checkpoint and the base
    final = tokens[tokens["step"] == 3]
    prompt_id, sample_index = final.groupby(["prompt_id", "sample_index"]).size().idxmax()
    rows = pq.read_table(smoke_run / "rollouts" / "step_000003.parquet").to_pandas()
    row = rows[(rows["prompt_id"] == prompt_id) & (rows["sample_index"] == sample_index)].iloc[0]
    base = base_model(load_experiment_config(SMOKE), progress=False)
    tokenizer = load_tokenizer(base)
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    span = slice(len(prompt_ids) - 1, len(ids[0]) - 1)
    with torch.no_grad():
        log_p = torch.log_softmax(load_model(smoke_run / "checkpoints" / "step_000003")(ids).logits[0, span], -1)
        log_q = torch.log_softmax(load_model(base)(ids).logits[0, span], -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)
    measured = final[(final["prompt_id"] == prompt_id) & (final["sample_index"] == sample_index)]["kl"].to_numpy()
    assert len(measured) == len(completion_ids)
    torch.testing.assert_close(torch.tensor(measured), expected.double(), rtol=1e-3, atol=1e-6)
    text = (smoke_run / "report.html").read_text()
    assert "KL to the base at step 3 (exact, 16 sampled completions)" in text
