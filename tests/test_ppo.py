"""PPO (rl/ppo.py) through the training driver (rl/training.py) on tiny pretrained models with the
transformers engine.

Most runs use a stand-in reward (a fixed, checksum-based third of the completions is "correct") so
that the barely trained test models still see a reward signal; one run grades for real in the sandbox.
"""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rl.config import EngineSettings, MitigationSettings, RLSettings, SamplingSettings
from rl.rollouts import Rewards
from rl.training import train
from specialists.formats import FORMAT_SETS
from specialists.model import load_model
from specialists.sandbox import Sandbox

from rl_helpers import TIMING_KEYS, ChecksumRewards, check_run_directory, make_run, read_metrics

pytestmark = pytest.mark.integration

FORMATS = FORMAT_SETS["synthetic"]
DIAGNOSTICS = {"loss", "policy_loss", "value_loss", "approx_kl", "clip_fraction", "explained_variance", "entropy",
               "kl_to_reference", "aux_loss", "reward_mean", "reward_std", "accuracy", "step_time_s",
               "rollout_tokens_per_s", "truncated_fraction", "sampler_kl", "sampler_ratio_max"}


@pytest.fixture(scope="module")
def moe_dir(tiny_moe_dir):  # tests/conftest.py: pretrained once per session
    return tiny_moe_dir


@pytest.fixture(scope="module")
def dense_dir(tiny_dense_dir):
    return tiny_dense_dir


def _settings(**overrides) -> RLSettings:
    values = dict(algorithm="ppo", steps=3, prompts_per_step=2, num_prompts=8, beta=0.05, kl_estimator="k3",
                  checkpoint_every=2, learning_rate=1e-3, engine=EngineSettings(kind="hf"),
                  sampling=SamplingSettings(samples_per_prompt=4, max_new_tokens=32))
    values.update(overrides)
    return RLSettings(**values)


def _run(model_dir, run_dir, settings, rewards=None, seed=0, **kwargs):
    return train(make_run(model_dir, run_dir, settings, rewards=rewards or ChecksumRewards(3), seed=seed, **kwargs))


def _metrics(run_dir, drop=TIMING_KEYS):
    return read_metrics(run_dir, drop)


def _weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def moe_run(moe_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ppo_moe")
    model = _run(moe_dir, run_dir, _settings())
    return run_dir, model


def test_run_directory_is_complete(moe_dir, moe_run):
    run_dir, model = moe_run
    config = load_model(moe_dir).config
    # rollouts with routed-token counts, three metrics lines; checkpoint "step s" = the
    # model after s updates: after 2 (checkpoint_every) and after the last
    metrics = check_run_directory(run_dir, config, steps=3, rows_per_step=2 * 4, checkpoints=[2, 3], algorithm="ppo")
    for line in metrics[:3]:
        assert DIAGNOSTICS <= line.keys()
        for key in ("loss", "policy_loss", "value_loss", "approx_kl", "clip_fraction", "entropy", "aux_loss",
                    "kl_to_reference", "step_time_s", "rollout_tokens_per_s"):
            assert isinstance(line[key], float) and np.isfinite(line[key]), key
        assert line["updates"] == 2 * 2  # epochs x minibatches
    assert metrics[0]["kl_to_reference"] == 0.0  # step 0 samples from the reference itself
    assert metrics[2]["kl_to_reference"] > 0.0 and metrics[3]["kl_to_reference"] > 0.0  # the final model's too
    assert metrics[3]["value_loss"] is None and metrics[3]["explained_variance"] is None  # no update at the last step
    # the last checkpoint carries the value head and equals the returned model
    state = torch.load(run_dir / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=True)
    assert {"optimizer", "value_head", "rng"} <= state.keys()
    assert _weights_equal(load_model(run_dir / "checkpoints" / "step_000003"), model)


def test_weights_change(moe_dir, moe_run):
    _, model = moe_run
    base = load_model(moe_dir)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, base.get_parameter(name))]
    assert any(".mlp.experts." in name for name in changed)
    assert any(".self_attn." in name for name in changed)
    assert "model.layers.0.mlp.gate.weight" in changed


def test_same_seed_same_metrics_and_rollouts(moe_dir, moe_run, tmp_path):
    run_dir, model = moe_run
    again = _run(moe_dir, tmp_path, _settings())
    assert _metrics(tmp_path) == _metrics(run_dir)
    for step in range(4):
        name = f"rollouts/step_{step:06d}.parquet"
        assert pq.read_table(tmp_path / name).equals(pq.read_table(run_dir / name))
    assert _weights_equal(again, model)


def test_resume_from_checkpoint_loses_no_step(moe_dir, moe_run, tmp_path):
    run_dir, model = moe_run
    resumed_dir = tmp_path / "run"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_000003")
    checkpoint = load_model(resumed_dir / "checkpoints" / "step_000002")
    with pytest.raises(ValueError, match="reference"):  # beta > 0: the reference must be the base model
        _run(moe_dir, resumed_dir, _settings(), model=checkpoint, start_step=2)
    # the run "died" after checkpoint 2; resuming there forgets steps 2-3 and redoes them
    resumed = _run(moe_dir, resumed_dir, _settings(), model=checkpoint, start_step=2, reference=load_model(moe_dir))
    assert _metrics(resumed_dir) == _metrics(run_dir)
    for step in range(4):
        name = f"rollouts/step_{step:06d}.parquet"
        assert pq.read_table(resumed_dir / name).equals(pq.read_table(run_dir / name))
    assert _weights_equal(resumed, model)
    # and the optimiser state and value head of the last checkpoint equal the uninterrupted run's
    states = [torch.load(d / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=True)
              for d in (resumed_dir, run_dir)]
    for name, value in states[1]["value_head"].items():
        assert torch.equal(states[0]["value_head"][name], value)
    for key, moments in states[1]["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(states[0]["optimizer"]["state"][key][name], value), (key, name)


def test_kl_in_the_reward_k1(moe_dir, tmp_path):
    _run(moe_dir, tmp_path, _settings(steps=2, kl_estimator="k1", beta=0.5))
    metrics = _metrics(tmp_path)
    assert len(metrics) == 3 and metrics[1]["kl_to_reference"] > 0
    assert all(np.isfinite(m["policy_loss"]) for m in metrics[:2])


@pytest.mark.parametrize("covariance", ["clip_cov", "kl_cov"])  # alternatives (Cui et al. 2025)
def test_mitigations_and_frozen_router(covariance, moe_dir, tmp_path):
    mitigations = MitigationSettings(entropy_coef=0.01, cov_ratio=0.05, freeze_router=True, **{covariance: True})
    model = _run(moe_dir, tmp_path, _settings(steps=2, beta=0.0, mitigations=mitigations, router_aux_loss_coef=0.0))
    base = load_model(moe_dir)
    for name, parameter in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            assert torch.equal(parameter, base.get_parameter(name)), name
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    metrics = _metrics(tmp_path)
    assert all(m["aux_loss"] is None and m["kl_to_reference"] is None for m in metrics)
    # the mitigation acted: tokens detached, or a penalty once the second update has moved off pi_old
    metric = {"clip_cov": "clip_cov_fraction", "kl_cov": "kl_cov_penalty"}[covariance]
    assert all(m[metric] > 0 for m in metrics[:2])


def test_dense_model_with_real_grading(dense_dir, tmp_path):
    settings = _settings(steps=2, kl_estimator="k1")
    with Sandbox(workers=1) as sandbox:
        _run(dense_dir, tmp_path, settings, rewards=Rewards(FORMATS, sandbox, settings.reward_scale, 0.0))
    rows = pq.read_table(tmp_path / "rollouts" / "step_000001.parquet").to_pylist()
    assert len(rows) == 8 and all(r["expert_load"] is None for r in rows)
    assert all(r["reason"] in {"correct", "wrong", "no_answer", "timeout", "forbidden", "error"} for r in rows)
    metrics = _metrics(tmp_path)
    assert len(metrics) == 3 and all(m["aux_loss"] is None for m in metrics)
