import json

import pytest
import torch

from specialists.config import MixtureSettings, FormatShare
from specialists.errors import UserError
from specialists.evaluate import evaluate
from specialists.model import count_parameters, is_moe, load_model
from specialists.pretrain import build_corpus, pretrain
from specialists.tokenizer import load_tokenizer
from tests.conftest import tiny_config


def test_corpus_follows_the_mixture_weights_and_repetition():
    config = tiny_config().model_copy(update={"mixture": MixtureSettings(formats={
        "python_function": FormatShare(weight=3.0, repeat=3), "natural_language": FormatShare(weight=1.0)})})
    examples = build_corpus(config)
    code = [e for e in examples if e.format == "python_function"]
    prose = [e for e in examples if e.format == "natural_language"]
    assert (len(code), len(prose)) == (450, 150)
    assert len({e.text for e in code}) == 150  # each distinct problem seen 3 times
    assert len({e.text for e in prose}) == 150
    assert build_corpus(config) == examples  # seeded


def test_checkpoint_loads_in_transformers_with_its_tokenizer(tiny_moe_dir):
    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    assert is_moe(model) and model.config.output_router_logits is False
    text = "Question: Mia has 12 apples.\nAnswer:\n12 + 5 = 17."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert [tokenizer.decode([i]) for i in tokenizer("1234", add_special_tokens=False)["input_ids"]] == ["1", "2", "3", "4"]
    with torch.no_grad():
        output = model(torch.tensor([ids]), output_router_logits=True)
    assert output.logits.shape == (1, len(ids), len(tokenizer))
    assert len(output.router_logits) == model.config.num_hidden_layers
    log = [json.loads(line) for line in (tiny_moe_dir.parent / "pretrain_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]  # it learned something
    assert "aux_loss" in log[0]


def test_dense_baseline_matches_active_parameters(tiny_moe_dir, tiny_dense_dir):
    moe_model = load_model(tiny_moe_dir)
    moe, dense = count_parameters(moe_model), count_parameters(load_model(tiny_dense_dir))
    config = moe_model.config
    router = config.num_hidden_layers * config.num_experts * config.hidden_size  # the only extra active weights
    assert moe["active"] - router == dense["active"] and moe["total"] > dense["total"]


def test_pretraining_is_deterministic(tmp_path, tiny_moe_dir):
    pretrain(tiny_config("moe"), tmp_path, progress=False)
    first = (tiny_moe_dir.parent / "pretrain_log.jsonl").read_text().splitlines()
    second = (tmp_path / "pretrain_log.jsonl").read_text().splitlines()
    assert [json.loads(a)["loss"] for a in first] == [json.loads(b)["loss"] for b in second]


def test_evaluation_reports_shares_and_accuracy_per_format(tiny_moe_dir, tmp_path):
    result = evaluate(tiny_moe_dir, tiny_config(), tmp_path / "evaluation.json", progress=False)
    assert json.loads((tmp_path / "evaluation.json").read_text()) == result
    assert set(result["format_share"]) == {"python_function", "llm_code", "natural_language", "other"}
    assert abs(sum(result["format_share"].values()) - 1) < 1e-9
    assert result["num_samples"] == 16 and 0 <= result["accuracy"] <= 1


def test_a_non_finite_gradient_stops_pretraining_at_its_step(tmp_path):
    """Learning rate 1e30, no warmup: step 1's gradients are finite and its update sends the weights to ~1e30,
    so step 2's loss is no longer finite. Pretraining stops there with one line and saves no model."""
    config = tiny_config()
    config = config.model_copy(update={"pretrain": config.pretrain.model_copy(
        update={"num_examples": 96, "learning_rate": 1e30, "warmup_fraction": 0.0})})
    with pytest.raises(UserError, match=r"^pretraining phase 'joint', step 2: the (loss|gradient norm) is (nan|inf|-inf);"
                                        r" no model was saved") as raised:
        pretrain(config, tmp_path, progress=False)
    assert "\n" not in str(raised.value)
    assert list((tmp_path / "model").iterdir()) == []  # nothing for `evaluate` to load
