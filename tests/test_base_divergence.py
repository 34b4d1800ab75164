"""Where the policy leaves its base: the per-token KL / entropy forward on a real tiny model, the position metrics on a
hand-computed table, and the run directory's cache. The whole path on a real run: tests/test_pipeline.py."""

import copy
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from analysis import base_divergence
from analysis.base_divergence import DivergenceSample, measured_steps, read_base_divergence, token_divergence
from analysis.position_metrics import TOKEN_COLUMNS, kl_concentration, position_profile
from specialists.config import SpecialistsConfig
from specialists.model import load_model
from specialists.run_directory import (BASE_DIVERGENCE_FILE, CONFIG_FILE, ROLLOUT_SCHEMA, checkpoint_dir,
                                       rollout_file)
from specialists.tokenizer import load_tokenizer


def tokens_table(rows: list[tuple]) -> pd.DataFrame:
    """(step, prompt_id, sample_index, format, kl values, entropy values) per completion -> the per-token table."""
    records = [(step, prompt, index, name, position, kl, entropy)
               for step, prompt, index, name, kls, entropies in rows
               for position, (kl, entropy) in enumerate(zip(kls, entropies))]
    return pd.DataFrame(records, columns=TOKEN_COLUMNS)


HAND = tokens_table([
    (1, "p0", 0, "code", [0.6, 0.3, 0.1, 0.0], [1.0, 0.5, 0.5, 0.2]),
    (1, "p0", 1, "code", [0.2, 0.2], [2.0, 1.5]),
    (1, "p1", 0, "prose", [1.0], [0.4]),
    (0, "p0", 0, "code", [0.0, 0.0], [3.0, 2.0]),
])


def test_position_profile_averages_each_position_over_the_completions_that_reach_it():
    profile = position_profile(HAND).set_index(["step", "format", "position"])
    # step 1, code, position 0: (0.6 + 0.2) / 2 = 0.4 over 2 completions; entropy (1.0 + 2.0) / 2 = 1.5
    assert profile.loc[(1, "code", 0)].to_dict() == pytest.approx({"completions": 2, "kl": 0.4, "entropy": 1.5})
    # position 2 only the longer completion reaches: 0.1, entropy 0.5
    assert profile.loc[(1, "code", 2)].to_dict() == pytest.approx({"completions": 1, "kl": 0.1, "entropy": 0.5})
    assert profile.loc[(1, "prose", 0)].to_dict() == pytest.approx({"completions": 1, "kl": 1.0, "entropy": 0.4})
    assert len(profile) == 4 + 1 + 2  # code at step 1: 4 positions; prose: 1; code at step 0: 2


def test_kl_concentration_splits_the_sequence_kl_by_the_first_tokens():
    by_format = kl_concentration(HAND, first=1).set_index(["step", "format"])
    code = by_format.loc[(1, "code")]
    # sums: 1.0 and 0.4 over 6 tokens; first token: 0.6 + 0.2 = 0.8 of 1.4
    assert code.to_dict() == pytest.approx({"completions": 2, "kl_per_token": 1.4 / 6, "kl_per_sequence": 0.7,
                                            "share_first": 0.8 / 1.4, "mean_tokens": 3.0})
    assert np.isnan(by_format.loc[(0, "code"), "share_first"])  # no KL at all: no share
    pooled = kl_concentration(HAND, first=1, by=("step",)).set_index("step").loc[1]
    # adds prose's one token of 1.0: 2.4 over 7 tokens and 3 completions, first tokens 0.8 + 1.0
    assert pooled.to_dict() == pytest.approx({"completions": 3, "kl_per_token": 2.4 / 7, "kl_per_sequence": 0.8,
                                              "share_first": 1.8 / 2.4, "mean_tokens": 7 / 3})
    # first = 2 takes the second tokens too: (0.6 + 0.3 + 0.2 + 0.2) / 1.4
    assert kl_concentration(HAND, first=2).set_index(["step", "format"]).loc[(1, "code"), "share_first"] == pytest.approx(1.3 / 1.4)


PROMPTS = ["Mia has 7 apples. Mia buys 5 more. How many apples does Mia have now?\n", "Tom has 3 pens.\n"]
COMPLETIONS = [" She buys 5 more.", "def simple_math_problem():\n    return 8", ""]


def test_token_divergence_is_zero_against_itself_and_the_exact_kl_otherwise(tiny_moe_dir):
    model, tokenizer = load_model(tiny_moe_dir).eval(), load_tokenizer(tiny_moe_dir)
    prompts, completions = [PROMPTS[0], PROMPTS[1], PROMPTS[1]], COMPLETIONS
    same = token_divergence(model, model, tokenizer, prompts, completions)
    assert all(np.array_equal(kl, np.zeros_like(kl)) for kl, _ in same)
    assert len(same[2][0]) == 0  # an empty completion has no positions

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # sharper next-token distributions everywhere
    batched = token_divergence(model, other, tokenizer, prompts, completions, batch_size=3)
    one_by_one = token_divergence(model, other, tokenizer, prompts, completions, batch_size=1)
    for (kl, entropy), (kl_alone, entropy_alone) in zip(batched, one_by_one):  # right padding changes nothing
        np.testing.assert_allclose(kl, kl_alone, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(entropy, entropy_alone, rtol=1e-4, atol=1e-7)
    kl, entropy = batched[1]
    completion_ids = tokenizer(completions[1], add_special_tokens=False)["input_ids"]
    assert kl.shape == entropy.shape == (len(completion_ids),) and (kl > 0).all()
    # the first completion token is predicted from the prompt alone: KL and entropy of that distribution
    ids = torch.tensor([tokenizer(prompts[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids).logits[0, -1], -1)
        log_q = torch.log_softmax(other(ids).logits[0, -1], -1)
    expected = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum")
    assert kl[0] == pytest.approx(float(expected), rel=1e-4)
    assert entropy[0] == pytest.approx(float(torch.distributions.Categorical(logits=log_p).entropy()), rel=1e-4)


def write_run(run_dir, base, checkpoints: dict[int, object], tokenizer) -> None:
    """A run directory with a model.path base: rollouts of steps 0-3 (prompts and completions in the task's
    shapes), checkpoints of the given steps holding the given models and `tokenizer`."""
    config = {"model": {"path": str(base)}, "seed": 0, "rl": {"seed": 0}}
    (run_dir / "rollouts").mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    for step in range(4):
        rows = [{"step": step, "prompt_id": str(index // 2), "sample_index": index % 2, "prompt": PROMPTS[index % 2],
                 "completion": COMPLETIONS[index % 2], "format": None} for index in range(6)]
        pq.write_table(pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA), rollout_file(run_dir, step))
    for step, model in checkpoints.items():
        model.save_pretrained(checkpoint_dir(run_dir, step))
        tokenizer.save_pretrained(checkpoint_dir(run_dir, step))


def test_the_table_is_cached_in_the_run_directory_and_recomputed_when_stale(tiny_moe_dir, tmp_path, monkeypatch):
    model = load_model(tiny_moe_dir)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    run_dir = tmp_path / "run"
    write_run(run_dir, tiny_moe_dir, {2: model, 3: other}, load_tokenizer(tiny_moe_dir))
    assert measured_steps(run_dir, 4) == [0, 2, 3] and measured_steps(run_dir, 2) == [0, 3]
    sample = DivergenceSample(completions=4)
    tokens = read_base_divergence(run_dir, "synthetic", sample, progress=False)
    assert (run_dir / BASE_DIVERGENCE_FILE).is_file()
    per_step = tokens.groupby("step")["kl"]
    assert per_step.max()[0] == 0 and per_step.max()[2] == pytest.approx(0, abs=1e-6) and per_step.min()[3] > 0
    assert tokens.groupby("step")[["prompt_id", "sample_index"]].apply(lambda rows: len(rows.drop_duplicates())).tolist() == [4, 4, 4]
    assert set(tokens["format"]) <= {"python_function", "natural_language", "other"}

    def no_forward(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(base_divergence, "divergence_tokens", no_forward)
    pd.testing.assert_frame_equal(read_base_divergence(run_dir, "synthetic", sample, progress=False), tokens)
    with pytest.raises(AssertionError, match="computed again"):  # another sample
        read_base_divergence(run_dir, "synthetic", DivergenceSample(completions=5), progress=False)
    later = (run_dir / BASE_DIVERGENCE_FILE).stat().st_mtime + 10
    os.utime(rollout_file(run_dir, 3), (later, later))
    with pytest.raises(AssertionError, match="computed again"):  # rollouts newer than the cache
        read_base_divergence(run_dir, "synthetic", sample, progress=False)


def test_no_table_without_a_base_or_a_checkpoint(tiny_moe_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_run(run_dir, tiny_moe_dir, {}, load_tokenizer(tiny_moe_dir))
    assert read_base_divergence(run_dir, "synthetic", progress=False) is None  # only step 0 has a model
    shutil.rmtree(run_dir)
    write_run(run_dir, tmp_path / "gone", {3: load_model(tiny_moe_dir)}, load_tokenizer(tiny_moe_dir))
    assert read_base_divergence(run_dir, "synthetic", progress=False) is None  # model.path is not there
    # a built-in base is found in the pretraining cache only once it is there
    monkeypatch.setenv("ECHOLAB_CACHE", str(tmp_path / "cache"))
    config = {"seed": 0, "model": {"kind": "moe", "hidden_size": 64}}
    assert base_divergence.base_model_of(config) is None
    cached = SpecialistsConfig.model_validate(config).cache_dir()
    shutil.copytree(tiny_moe_dir, cached / "model")
    (cached / "evaluation.json").write_text("{}")
    assert base_divergence.base_model_of({**config, "rl": {"seed": 1}, "name": "x"}) == cached / "model"
