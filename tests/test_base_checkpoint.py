"""`[model] path`: a local checkpoint as the RL base. The config rules (refused when loaded), the checks of the
checkpoint itself before any work (one line from `echolab run`), and the Prompter that turns problems into
the prompt text and token ids every part of a run uses."""

from __future__ import annotations

import pytest

from experiments.config import ExperimentConfig, load_experiment_config, validate
from specialists.errors import UserError
from specialists.prompting import Prompter
from specialists.tasks import PROMPT_TEMPLATE, generate_problems, prompt_text
from specialists.tokenizer import load_tokenizer

from model_families import build_checkpoint, family_tokenizer
from test_cli_errors import assert_one_line_error, run_cli

PROBLEM = generate_problems(1, seed=4, split="eval")[0]


def load(document: dict) -> ExperimentConfig:
    return validate(document, ExperimentConfig, lambda keys: "config.toml")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Tiny checkpoints: a Qwen3 (a chat template), an OLMo2 (none) and an OLMoE (a router)."""
    root = tmp_path_factory.mktemp("bases")
    return {family: str(build_checkpoint(family, root / family)) for family in ("qwen3", "olmo2", "olmoe")}


@pytest.mark.parametrize("document, message", [
    ({"model": {"path": "base", "num_layers": 4}}, "these pretraining settings do not apply: model.num_layers"),
    ({"model": {"path": "base", "kind": "dense", "head_dim": 64}}, "model.head_dim, model.kind"),
    ({"model": {"path": "base"}, "pretrain": {"batch_size": 48}}, "pretrain.batch_size"),  # a default value, written
    ({"model": {"path": "base"}, "mixture": {"formats": {"llm_code": {"weight": 1}}}}, "mixture.formats"),
    ({"model": {"path": "base"}, "evaluation": {"num_problems": 8}}, "evaluation.num_problems"),
    ({"model": {"path": "base"}, "rl": {"mitigations": {"pretrain_replay_coef": 0.5}}}, "pretrain_replay_coef replays"),
    ({"model": {"path": "base"}}, "model.path: base is no Hugging Face checkpoint (no config.json)"),
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


def test_a_path_keeps_the_rl_settings_and_max_length(checkpoints):
    base = checkpoints["qwen3"]
    config = load({"model": {"path": base, "max_length": 128}, "seed": 3, "task": {"max_value": 50},
                   "rl": {"prompt_template": "Q: {question} ({name})\nA:", "chat_template": True,
                          "engine": {"dtype": "bfloat16"}}})
    assert (config.model.path, config.model.max_length, config.rl.engine.dtype) == (base, 128, "bfloat16")


@pytest.mark.parametrize("family, rl, message", [
    ("olmo2", {"chat_template": True}, "rl.chat_template: the tokenizer in {base} has no chat template"),
    ("olmo2", {"mitigations": {"freeze_router": True}},
     "rl.mitigations.freeze_router needs a model with a router (model.path is a dense OLMo2)"),
    ("qwen3", {"router_aux_loss_coef": 0.01}, "rl.router_aux_loss_coef needs a model with a router (model.path is a dense Qwen3)"),
    ("olmoe", {"max_length": 512}, "model.max_length (512) exceeds the 256 positions of the checkpoint at model.path"),
])
def test_rules_that_read_the_checkpoint_are_refused_when_loaded(checkpoints, family, rl, message):
    base = checkpoints[family]
    model = {"max_length": rl.pop("max_length")} if "max_length" in rl else {}
    with pytest.raises(UserError) as error:
        load({"model": {"path": base, **model}, "rl": rl})
    assert message.format(base=base) in str(error.value) and "\n" not in str(error.value)


def test_a_router_setting_is_kept_with_a_mixture_of_experts_base(checkpoints):
    config = load({"model": {"path": checkpoints["olmoe"]}, "rl": {"router_aux_loss_coef": 0.01,
                                                                   "mitigations": {"freeze_router": True}}})
    assert config.rl.mitigations.freeze_router and config.rl.router_aux_loss_coef == 0.01


def test_a_bad_base_is_named_at_its_toml_line(tmp_path):
    (tmp_path / "config.toml").write_text(f'name = "x"\n[rl]\nsteps = 2\n[model]\npath = "{tmp_path}"\n')
    with pytest.raises(UserError) as error:
        load_experiment_config(tmp_path / "config.toml")
    assert str(error.value) == (f"{tmp_path / 'config.toml'} line 5: model.path: {tmp_path} is no Hugging Face "
                                "checkpoint (no config.json)")


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


@pytest.mark.parametrize("command", ["pretrain", "evaluate"])
def test_echolab_pretrain_and_evaluate_refuse_a_path_config(command, checkpoints, tmp_path):
    (tmp_path / "config.toml").write_text(f'[model]\npath = "{checkpoints["olmo2"]}"\n')
    arguments = [checkpoints["olmo2"]] if command == "evaluate" else []
    result = run_cli(command, str(tmp_path / "config.toml"), *arguments, "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "model.path names a base that is not pretrained here", f"`echolab {command}`")
    assert not (tmp_path / "out").exists()
