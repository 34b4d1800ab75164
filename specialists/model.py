"""Models: built from config (a Qwen3-MoE causal LM whose experts are the specialists, or a dense Qwen3
baseline with the same active parameters per token), or brought by the user as a local Hugging Face
checkpoint (`[model] path`) of a supported family (specialists.families). All load in transformers and vLLM.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config, Qwen3MoeConfig

from specialists.config import ModelSettings

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
