"""`[model] path`: a local checkpoint as the RL base. The config rules (refused when loaded), the checks of the
checkpoint itself before any work (one line from `echolab run`), and the Prompter that turns problems into
the prompt text and token ids every part of a run uses."""

from __future__ import annotations

import pytest

from experiments.config import ExperimentConfig, validate
from specialists.errors import UserError
from specialists.prompting import Prompter
from specialists.tasks import PROMPT_TEMPLATE, generate_problems, prompt_text
from specialists.tokenizer import load_tokenizer

from model_families import build_checkpoint, family_tokenizer
from test_cli_errors import assert_one_line_error, run_cli

PROBLEM = generate_problems(1, seed=4, split="eval")[0]


def load(document: dict) -> ExperimentConfig:
    return validate(document, ExperimentConfig, "config.toml")


@pytest.mark.parametrize("document, message", [
    ({"model": {"path": "base", "num_layers": 4}}, "these pretraining settings do not apply: model.num_layers"),
    ({"model": {"path": "base", "kind": "dense", "head_dim": 64}}, "model.head_dim, model.kind"),
    ({"model": {"path": "base"}, "pretrain": {"batch_size": 48}}, "pretrain.batch_size"),  # a default value, written
    ({"model": {"path": "base"}, "mixture": {"formats": {"llm_code": {"weight": 1}}}}, "mixture.formats"),
    ({"model": {"path": "base"}, "evaluation": {"num_problems": 8}}, "evaluation.num_problems"),
    ({"model": {"path": "base"}, "rl": {"mitigations": {"pretrain_replay_coef": 0.5}}}, "pretrain_replay_coef replays"),
    ({"rl": {"chat_template": True}}, "rl.chat_template needs a model.path base"),
    ({"rl": {"prompt_template": "Solve: {question} = {answer}"}}, "unknown fields ['answer']"),
    ({"rl": {"prompt_template": "Solve it."}}, "it must contain {question}"),
    ({"rl": {"prompt_template": "Solve {question"}}, "not a valid format string"),
    ({"rl": {"engine": {"kind": "hf", "dtype": "bfloat16"}}}, "dtype bfloat16 needs kind 'vllm'"),
])
def test_config_rules_are_refused_when_loaded(document, message):
    with pytest.raises(UserError) as error:
        load(document)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_path_keeps_the_rl_settings_and_max_length():
    config = load({"model": {"path": "base", "max_length": 512}, "seed": 3, "task": {"max_value": 50},
                   "rl": {"prompt_template": "Q: {question} ({name})\nA:", "chat_template": True,
                          "engine": {"dtype": "bfloat16"}}})
    assert (config.model.path, config.model.max_length, config.rl.engine.dtype) == ("base", 512, "bfloat16")


@pytest.mark.parametrize("setup, fragments", [
    ("gpt2", ["model.path: architecture 'gpt2'", "supported: Llama, Qwen2, Qwen3, OLMo2, Qwen3-MoE, OLMoE, Mixtral"]),
    ("empty", ["model.path:", "no config.json"]),
    ("no chat template", ["rl.chat_template: the tokenizer in", "has no chat template"]),
])
def test_echolab_run_refuses_a_bad_base_in_one_line_before_any_work(setup, fragments, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    chat = ""
    if setup == "gpt2":
        from transformers import GPT2Config

        GPT2Config(n_embd=64, n_layer=1, n_head=2).save_pretrained(base)
        family_tokenizer("llama").save_pretrained(base)
    elif setup == "no chat template":
        build_checkpoint("olmo2", base)
        chat = "chat_template = true\n"
    (tmp_path / "config.toml").write_text(f'[model]\npath = "{base}"\n[rl]\n{chat}')
    result = run_cli("run", str(tmp_path / "config.toml"), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_the_built_in_template_is_unchanged_for_the_built_in_tokenizer():
    """Our tokenizers add no special tokens: the prompt is exactly the text the base was pretrained on."""
    tokenizer = family_tokenizer("olmo2")
    prompter = Prompter(tokenizer)
    assert prompter.text(PROBLEM) == prompt_text(PROBLEM) == PROMPT_TEMPLATE.format(question=PROBLEM.question)
    assert prompter.token_ids(PROBLEM) == tokenizer(prompt_text(PROBLEM))["input_ids"]


def test_a_tokenizer_that_starts_sequences_with_bos_gets_it_once(tmp_path):
    tokenizer = load_tokenizer(build_checkpoint("llama", tmp_path))
    prompter = Prompter(tokenizer, template="Q: {question}\nA:")
    ids = prompter.token_ids(PROBLEM)
    assert prompter.text(PROBLEM) == tokenizer.bos_token + f"Q: {PROBLEM.question}\nA:"
    assert ids == tokenizer(f"Q: {PROBLEM.question}\nA:", add_special_tokens=True)["input_ids"]  # as the model expects
    assert ids.count(tokenizer.bos_token_id) == 1


def test_the_chat_template_wraps_the_prompt_as_the_user_turn(tmp_path):
    tokenizer = load_tokenizer(build_checkpoint("qwen3", tmp_path))
    prompter = Prompter(tokenizer, template="{question}", chat=True)
    text = prompter.text(PROBLEM)
    assert text == f"<|im_start|>user\n{PROBLEM.question}<|im_end|>\n<|im_start|>assistant\n"
    ids = prompter.token_ids(PROBLEM)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 2  # the special tokens are single ids, not spelled out
    assert tokenizer.decode(ids) == text


def test_echolab_pretrain_refuses_a_path_config(tmp_path):
    (tmp_path / "config.toml").write_text('[model]\npath = "base"\n')
    result = run_cli("pretrain", str(tmp_path / "config.toml"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "model.path names a base that is not pretrained here")
    assert not (tmp_path / "out").exists()
