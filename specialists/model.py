"""Models: built from config (a Qwen3-MoE causal LM whose experts are the specialists, or a dense Qwen3
baseline with the same active parameters per token), or brought by the user as a local Hugging Face
checkpoint (`[model] path`) of one of the supported `FAMILIES`. All load in transformers and vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config, Qwen3MoeConfig

from specialists.config import VLLM_HEAD_DIMS, ModelSettings
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

# grouped_mm is the fast expert kernel on CPU (batched_mm measured ~50x slower here).
EXPERTS_IMPLEMENTATION = "grouped_mm"


def model_config(settings: ModelSettings, vocab_size: int, eos_token_id: int, pad_token_id: int) -> Qwen3Config | Qwen3MoeConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.head_dim,
        max_position_embeddings=settings.max_length,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype="float32",
    )
    if settings.kind == "dense":
        return Qwen3Config(intermediate_size=settings.expert_size * settings.experts_per_token, **common)
    return Qwen3MoeConfig(
        intermediate_size=settings.expert_size * settings.experts_per_token,  # unused: every layer is MoE
        moe_intermediate_size=settings.expert_size,
        num_experts=settings.num_experts,
        num_experts_per_tok=settings.experts_per_token,
        norm_topk_prob=True,
        router_aux_loss_coef=settings.router_aux_loss_coef,
        # Off in the config: cached decoding crashes with it on. Forward passes that need router
        # logits (pretraining's aux loss, expert statistics) ask for them explicitly.
        output_router_logits=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        experts_implementation=EXPERTS_IMPLEMENTATION,
        **common,
    )


def build_model(settings: ModelSettings, vocab_size: int, eos_token_id: int, pad_token_id: int, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = model_config(settings, vocab_size, eos_token_id, pad_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_model(directory: str | Path) -> PreTrainedModel:
    """A checkpoint (built-in or of a supported family) in float32, the precision echolab trains in."""
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    if is_moe(model):
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        model.config.output_router_logits = False  # see model_config; some published checkpoints switch it on
    return model


def is_moe(model: PreTrainedModel) -> bool:
    return getattr(model.config, "num_experts", None) is not None


def count_parameters(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters, and active per token (an MoE token uses experts_per_token of num_experts experts)."""
    total = sum(p.numel() for p in model.parameters())
    if not is_moe(model):
        return {"total": total, "active": total}
    expert = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    config = model.config
    active = total - expert + expert * config.num_experts_per_tok // config.num_experts
    return {"total": total, "active": active}
