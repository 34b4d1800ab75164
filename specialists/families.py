"""The architectures echolab takes as an RL base from a local Hugging Face checkpoint (`[model] path`), and the
checks a checkpoint must pass before any work: it reads two small files and imports neither torch nor
transformers, so a bad path costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from specialists.config import VLLM_HEAD_DIMS
from specialists.errors import UserError


@dataclass(frozen=True)
class Family:
    """An architecture echolab supports as an RL base: tested with vLLM rollouts, weight sync into the live
    engine and (for mixtures of experts) expert load per layer (tests/test_model_families.py)."""

    name: str  # as users know it
    mixture_of_experts: bool


# transformers' config.model_type -> family. What each needed is noted where it is handled: the vLLM module
# names and transformers-backend classes in rl/weight_sync.py, the routers in rl/routing.py.
FAMILIES = {
    "llama": Family("Llama", False),
    "qwen2": Family("Qwen2", False),
    "qwen3": Family("Qwen3", False),
    "olmo2": Family("OLMo2", False),
    "qwen3_moe": Family("Qwen3-MoE", True),
    "olmoe": Family("OLMoE", True),
    "mixtral": Family("Mixtral", True),
}


def checkpoint_family(directory: str | Path, source: str = "model.path") -> tuple[Family, dict]:
    """The family and config (config.json as a dict) of a local Hugging Face causal-LM checkpoint with its
    tokenizer; a UserError naming `source` when it is missing, incomplete or of an unsupported architecture.
    Reads two small JSON files only, so it can run before any work."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{source}: {directory} is no Hugging Face checkpoint (no config.json)")
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{source}: {directory / 'config.json'} is not valid JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(family.name for family in FAMILIES.values())
        raise UserError(f"{source}: architecture {model_type!r} ({', '.join(config.get('architectures') or [])}) "
                        f"is not supported; supported: {supported}")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{source}: {directory} has no tokenizer (save one there with tokenizer.save_pretrained)")
    family = FAMILIES[model_type]
    problem = _vllm_problem(config, family)
    if problem:
        raise UserError(f"{source}: {directory}: {problem}")
    return family, config


def _vllm_problem(config: dict, family: Family) -> str | None:
    """What keeps vLLM 0.32 on CPU from serving this checkpoint exactly as transformers computes it, or None."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim not in VLLM_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {VLLM_HEAD_DIMS} (vLLM attention)"
    if family.mixture_of_experts and config["hidden_size"] % 32:
        return f"hidden_size {config['hidden_size']} is not a multiple of 32 (vLLM's CPU MoE kernel)"
    if config["model_type"] == "olmoe" and config.get("norm_topk_prob"):
        return "norm_topk_prob = true, which vLLM's OLMoE ignores (it never renormalises the top-k weights)"
    return None


def has_chat_template(directory: str | Path) -> bool:
    """Whether the tokenizer saved in `directory` carries a chat template (transformers 5 writes it to
    chat_template.jinja, earlier versions into tokenizer_config.json)."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return True
    config = directory / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
