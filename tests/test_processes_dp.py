"""One RL run across processes (rl.distributed, `echolab run --processes N`): the ranks' shares add up to the
one-process run, on the maths (the router loss's shares), on the driver with a reward signal (GRPO and PPO in two
real gloo processes against one), and end to end through `echolab run`, killed and resumed."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from experiments.config import load_experiment_config
from experiments.pipeline import run_experiment
from processes import TEST_THREADS, echolab_command, kill_when_written, pinned_environment
from rl.config import (MITIGATION_SWITCHES, GRPOSettings, MitigationSettings, PPOSettings, RLSettings, SamplingSettings,
                       split_problem)
from rl.distributed import Shard
from rl.losses import load_balancing_share
from rl_helpers import TIMING_KEYS, make_run, read_metrics, rollout_rows
from rl.training import train
from specialists.model import load_model

TESTS = Path(__file__).parent


# ---------------------------------------------------------------------------------------------
# The router loss: a product of two batch means, so not a mean the ranks could weight
# ---------------------------------------------------------------------------------------------


def test_router_loss_shares_add_up_to_the_whole_batch_loss_and_gradient():
    generator = torch.Generator().manual_seed(0)
    layers, tokens, experts, top_k = 3, 10, 4, 2
    logits = torch.randn(layers, tokens, experts, generator=generator, requires_grad=True)
    real = (torch.rand(tokens, generator=generator) > 0.2).long()  # padding excluded, as packed rows' `real`
    whole = load_balancing_loss_func(tuple(logits), experts, top_k, real)
    whole_grad, = torch.autograd.grad(whole, logits)

    # One rank: the identity as the sum over ranks gives transformers' value.
    alone = load_balancing_share(tuple(logits), experts, top_k, real, lambda counts: counts)
    torch.testing.assert_close(alone, whole)

    # Two ranks holding tokens [0, 6) and [6, 10): each sums the other's routed-token counts into its own.
    halves = [slice(0, 6), slice(6, tokens)]
    counts = []
    for part in halves:
        load_balancing_share(tuple(logits[:, part]), experts, top_k, real[part], lambda c: counts.append(c) or c)
    total = counts[0] + counts[1]
    shares = [load_balancing_share(tuple(logits[:, part]), experts, top_k, real[part], lambda c: total)
              for part in halves]
    torch.testing.assert_close(shares[0] + shares[1], whole)
    share_grad, = torch.autograd.grad(shares[0] + shares[1], logits)
    torch.testing.assert_close(share_grad, whole_grad)
    # A rank without tokens adds nothing and still asks for the sum.
    asked = []
    assert load_balancing_share(None, experts, top_k, None, lambda c: asked.append(c) or total).item() == 0
    assert asked and asked[0].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# What cannot be split is refused before any work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(prompts_per_step=6), "does not split evenly into 4 processes"),
    (dict(algorithm="ei"), "support rl.algorithm grpo and ppo, not 'ei'"),
    (dict(grpo=GRPOSettings(dynamic_sampling=True)), "rl.grpo.dynamic_sampling is not supported"),
    (dict(grpo=GRPOSettings(scale_rewards="batch")), "rl.grpo.scale_rewards = 'batch' is not supported"),
    (dict(mitigations=MitigationSettings(clip_cov=True)), "rl.mitigations.clip_cov is not supported"),
    (dict(mitigations=MitigationSettings(outcome_exploration_coef=0.1)), "outcome_exploration_coef is not supported"),
    (dict(engine={"kind": "hf"}), "hf engine samples 8 prompts per generate call"),
])
def test_settings_that_cannot_be_split_are_named(change, message):
    settings = RLSettings(**{"prompts_per_step": 8, **change})
    assert message in split_problem(settings, 4)
    assert split_problem(RLSettings(prompts_per_step=8), 4) is None
    assert split_problem(RLSettings(prompts_per_step=32, engine={"kind": "hf"}), 4) is None  # one call per process


SWITCHED_ON = {bool: True, int: 2, float: 0.1}  # a value away from each switch's default (False, 0, 0.0)


@pytest.mark.parametrize("name", MITIGATION_SWITCHES)
def test_each_mitigation_switch_is_split_or_refused_as_its_switch_says(name):
    on = SWITCHED_ON[type(getattr(MitigationSettings(), name))]
    settings = RLSettings(prompts_per_step=8, grpo=GRPOSettings(num_iterations=2),  # KL-Cov needs a second pass
                          mitigations=MitigationSettings(**{name: on}))
    problem = split_problem(settings, 2)
    if MITIGATION_SWITCHES[name].data_parallel:
        assert problem is None
    else:
        assert problem == (f"rl.mitigations.{name} is not supported in data-parallel runs (it needs the whole batch "
                           "in one process)")


def test_the_switches_a_data_parallel_run_refuses():  # each needs the whole batch (or a prompt's history) in one place
    assert {name for name, switch in MITIGATION_SWITCHES.items() if not switch.data_parallel} == \
        {"clip_cov", "kl_cov", "pretrain_replay_coef", "format_kl_coef", "outcome_exploration_coef"}


def test_the_cli_refuses_an_uneven_split_in_one_line_before_any_work(tmp_path):
    config = tmp_path / "uneven.toml"
    config.write_text('[rl]\nprompts_per_step = 3\n')
    out = tmp_path / "run"
    result = subprocess.run(echolab_command("run", str(config), "--out", str(out), "--processes", "2"),
                            capture_output=True, text=True, env=pinned_environment(), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == ("echolab run: error: --processes 2: rl.prompts_per_step = 3 does not split "
                                     "evenly into 2 processes")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The driver with a reward signal: two gloo processes against one
# ---------------------------------------------------------------------------------------------

# 8 prompts x 16 samples: the hf engine samples 4 prompts per call, so each of 2 ranks holds whole calls.
SAMPLING = SamplingSettings(samples_per_prompt=16, max_new_tokens=16)
SETTINGS = {
    # grpo's mean of sequence means (sequence shares), two passes (ratio != 1), KL and entropy (token shares)
    "grpo": RLSettings(algorithm="grpo", steps=2, prompts_per_step=8, num_prompts=32, learning_rate=1e-3, beta=0.05,
                       sampling=SAMPLING, grpo=GRPOSettings(num_iterations=2),
                       mitigations=MitigationSettings(entropy_coef=0.01)),
    # 8 minibatches of 16 from one permutation of 128: ranks often hold unequal parts of one, sometimes none
    "ppo": RLSettings(algorithm="ppo", steps=2, prompts_per_step=8, num_prompts=32, learning_rate=1e-3, beta=0.05,
                      sampling=SAMPLING, ppo=PPOSettings(minibatches=8), tis_cap=2.0,
                      mitigations=MitigationSettings(entropy_coef=0.01)),
}


def _train_rank(rank: int, model_dir: Path, run_dir: Path, settings: RLSettings, port: int) -> None:
    torch.set_num_threads(TEST_THREADS)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    train(dataclasses.replace(make_run(model_dir, run_dir, settings), shard=Shard.from_environment()))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_run(one: Path, two: Path, steps: int) -> None:
    """The same samples at every step, the same metrics to float rounding, the final weights close."""
    for step in range(steps + 1):
        a, b = rollout_rows(one, step), rollout_rows(two, step)
        assert [(r["prompt_id"], r["completion"], r["reward"]) for r in a] == \
               [(r["prompt_id"], r["completion"], r["reward"]) for r in b]
        torch.testing.assert_close(torch.tensor([r["logprob"] for r in b]), torch.tensor([r["logprob"] for r in a]),
                                   rtol=1e-4, atol=1e-4)
        assert [r["expert_load"] for r in a] == [r["expert_load"] for r in b]
    metrics_one, metrics_two = read_metrics(one, TIMING_KEYS), read_metrics(two, TIMING_KEYS)
    assert len(metrics_one) == len(metrics_two) == steps + 1
    for line_one, line_two in zip(metrics_one, metrics_two):
        assert line_one.keys() == line_two.keys()
        for key, value in line_one.items():
            if isinstance(value, float):
                assert line_two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (line_one["step"], key)
            else:
                assert line_two[key] == value, (line_one["step"], key)
    # Adam divides each gradient entry by its own running scale, so an entry near zero turns rounding into up to a
    # few percent of one step (lr = 1e-3 per entry): close means within a tenth of one step.
    final = f"checkpoints/step_{steps:06d}"
    weights_one, weights_two = load_model(one / final).state_dict(), load_model(two / final).state_dict()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", SETTINGS)
def test_two_processes_train_what_one_process_trains(name, tiny_moe_dir, tmp_path, monkeypatch):
    settings = SETTINGS[name]
    one, two = tmp_path / "one", tmp_path / "two"
    train(make_run(tiny_moe_dir, one, settings))
    # the signal is real: rewards vary within groups and the first update moved the policy
    first = read_metrics(one)[0]
    assert 0 < first["reward_mean"] < 1 and first["frac_reward_zero_std"] < 1 and first["grad_norm"] > 0

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    mp.start_processes(_train_rank, args=(tiny_moe_dir, two, settings, free_port()), nprocs=2, start_method="spawn")
    assert_same_run(one, two, settings.steps)


# ---------------------------------------------------------------------------------------------
# End to end: `echolab run --processes 2`, uninterrupted and killed
# ---------------------------------------------------------------------------------------------

RUN_CONFIG = """
name = "two-processes"
seed = 0

[model]
path = "{model}"
max_length = 256

[rl]
algorithm = "grpo"
steps = 3
prompts_per_step = 8
num_prompts = 32
learning_rate = 1e-3
beta = 0.05
checkpoint_every = 1

[rl.mitigations]
entropy_coef = 0.01

[rl.sampling]
samples_per_prompt = 16
max_new_tokens = 16

[rl.engine]
kind = "hf"

[rl.evaluation]
every = 2
num_problems = 4
samples_per_problem = 4
"""


@pytest.fixture(scope="module")
def run_config(tiny_moe_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "two-processes.toml"
    path.write_text(RUN_CONFIG.format(model=tiny_moe_dir))
    return path


@pytest.fixture(scope="module")
def one_process_run(run_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run_experiment(load_experiment_config(run_config), run_dir, progress=False)
    return run_dir


def start_run(config: Path, run_dir: Path, *flags: str) -> subprocess.Popen:
    """`echolab run --processes 2` in its own process group, as a user starts it."""
    return subprocess.Popen(echolab_command("run", str(config), "--out", str(run_dir), "--quiet", "--processes", "2",
                                            *flags),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=pinned_environment())


def assert_same_directory(one: Path, two: Path) -> None:
    assert_same_run(one, two, steps=3)
    assert sorted(p.name for p in (two / "heldout").iterdir()) == sorted(p.name for p in (one / "heldout").iterdir())
    for path in (one / "heldout").iterdir():  # rank 0 evaluates, with the run's own seeds
        assert (pd.read_parquet(two / "heldout" / path.name)["completion"].tolist()
                == pd.read_parquet(path)["completion"].tolist())
    summary_one, summary_two = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert summary_two["format_share"] == summary_one["format_share"]
    assert summary_two["accuracy"] == summary_one["accuracy"]
    assert (two / "report.html").is_file() and (two / "tensorboard").is_dir()
    assert not list(two.rglob("*.tmp"))


@pytest.fixture(scope="module")
def two_process_run(run_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two") / "run"
    finished = start_run(run_config, run_dir)
    assert finished.wait(timeout=900) == 0, finished.stderr.read()
    return run_dir


# Imported at the start of every Python process on PYTHONPATH (the site module): from then on, a training forward
# (a module in training mode, gradients on) sends NaN back through every embedding, so the step's gradient norm is
# NaN (rl.recipe.require_finite). Only the ranks train here (the launcher's base is a model.path, not pretrained).
NAN_GRADIENTS = """
import torch


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(module, inputs, output):
    if isinstance(module, torch.nn.Embedding) and module.training and torch.is_grad_enabled() and output.requires_grad:
        return NaNGradient.apply(output)
    return None


torch.nn.modules.module.register_module_forward_hook(poison)
"""


def test_a_ranks_user_error_is_the_launchers_one_line(run_config, tmp_path):
    """A rank whose step turns NaN raises a UserError there (rl.recipe.NonFiniteError); the launcher raises it
    again, so `echolab run --processes 2` prints that one line, as one process would, and exits 1."""
    poison = tmp_path / "poison"
    poison.mkdir()
    (poison / "sitecustomize.py").write_text(NAN_GRADIENTS)
    config = tmp_path / "nan.toml"
    config.write_text(run_config.read_text().replace("steps = 3", "steps = 1").replace("every = 2", "every = 0"))
    run_dir = tmp_path / "run"
    environment = pinned_environment(PYTHONPATH=os.pathsep.join([str(poison), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(echolab_command("run", str(config), "--out", str(run_dir), "--quiet", "--processes", "2"),
                            capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("echolab run: error") == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"echolab run: error: step 0: the gradient norm is nan \(.*\); the run stopped and no "
                        r"checkpoint was written .*", line), line
    assert not list((run_dir / "checkpoints").iterdir()) and not (run_dir / "summary.json").exists()


def test_echolab_run_in_two_processes_records_what_one_process_records(one_process_run, two_process_run):
    assert_same_directory(one_process_run, two_process_run)


def test_a_two_process_run_killed_and_resumed_equals_the_uninterrupted_one(run_config, one_process_run, tmp_path):
    """A real SIGKILL of `echolab run --processes 2` (its process group: launcher and both ranks) right after the
    checkpoint of step 1; `--resume --processes 2` redoes the rest. Compared with the uninterrupted one-process run
    (which the uninterrupted two-process run equals, above)."""
    killed = tmp_path / "killed"
    kill_when_written(start_run(run_config, killed), killed / "checkpoints" / "step_000001")
    assert not (killed / "summary.json").exists()
    finished = start_run(run_config, killed, "--resume")
    assert finished.wait(timeout=900) == 0, finished.stderr.read()
    assert_same_directory(one_process_run, killed)
