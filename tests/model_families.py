"""Tiny random-initialised checkpoints of every supported family (specialists.families.FAMILIES), built here:
a config of the family's own transformers class and a byte-level BPE tokenizer trained on word problems,
both saved with save_pretrained (no hub). Sizes are the smallest vLLM's CPU kernels take (head_dim 32,
hidden 64, a multiple of 32 for the MoE kernel); the MoE families have 4 experts, 2 per token.

Each family is set up the way its published checkpoints are where that matters to echolab: Qwen2 and Qwen3
tie the input and output embeddings, Qwen2 has attention biases, OLMo2 normalises after attention and MLP,
the Llama tokenizer puts a beginning-of-text token before every sequence, the Qwen tokenizers carry a ChatML
chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import processors
from transformers import AutoConfig, AutoModelForCausalLM

from specialists.tasks import generate_problems, prompt_text
from specialists.tokenizer import END_OF_TEXT, train_tokenizer

LAYERS, EXPERTS, EXPERTS_PER_TOKEN = 2, 4, 2
CHATML = ("{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def family_tokenizer(model_type: str):
    texts = [prompt_text(p) + f"The answer is {p.answer:g}." + END_OF_TEXT for p in generate_problems(400, 0, "train")]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
    if model_type == "llama":  # every sequence starts with the beginning-of-text token, as Llama's tokenizers do
        bos = tokenizer.bos_token
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    return tokenizer


def family_config(model_type: str, tokenizer):
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, intermediate_size=128, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=model_type in ("qwen2", "qwen3"))
    experts = dict(num_experts_per_tok=EXPERTS_PER_TOKEN, output_router_logits=False)
    extra = {
        "qwen3_moe": dict(num_experts=EXPERTS, moe_intermediate_size=64, norm_topk_prob=True, **experts),
        "olmoe": dict(num_experts=EXPERTS, intermediate_size=64, **experts),  # norm_topk_prob False, as OLMoE-1B-7B
        "mixtral": dict(num_local_experts=EXPERTS, intermediate_size=64, **experts),
    }.get(model_type, {})
    return AutoConfig.for_model(model_type, **{**common, **extra})


def build_checkpoint(model_type: str, directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny random-initialised `model_type` model and its tokenizer to `directory`; returns it."""
    tokenizer = family_tokenizer(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, tokenizer), dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
