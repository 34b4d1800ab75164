"""Branch-Train-MiX's merge: dense specialists -> one Qwen3-MoE whose experts are their MLPs.

Sukhbaatar et al. 2024, "Branch-Train-MiX: Mixing Expert LLMs into a Mixture-of-Experts LLM" (arXiv:2403.07816),
section 2.2 (MiX): the feed-forward blocks of the N domain experts become the experts of each MoE layer, the
other parameters (self-attention, norms, embeddings, output head) are averaged, and a new router per layer
learns on the whole mixture. The recipe around the merge (seed, branch, train, mix) is `specialists.pretrain`.

Sizes. A BTX base has the same [model] numbers as the joint MoE it is compared with, and exactly its shape:
F formats, num_experts = F * m experts of width W = expert_size, experts_per_token active. Each dense
specialist's MLP is m * W wide and becomes m experts: expert f * m + c is chunk c of specialist f's MLP
(intermediate units c * W ... (c + 1) * W), specialists in alphabetical order of their formats
(`specialists.config.expert_specialists`). Total and active parameters equal the joint MoE's; with
m = experts_per_token a specialist has the dense baseline's MLP width, i.e. the MoE's active size.

Why chunking is exact, and the factor m. The MLP is SwiGLU, MLP(x) = down (silu(gate x) * up x), which acts
on each intermediate unit separately, so MLP(x) = sum_c chunk_c(x) with chunk_c using the units of chunk c.
Qwen3-MoE weighs its top-k experts by router probabilities renormalised to sum 1 (`norm_topk_prob`), so
a token routed to the m experts of one specialist with equal scores gets sum_c (1/m) expert_c(x). Each
expert's down-projection is therefore m times its chunk's: then that token gets exactly the specialist's MLP
(for m = 1 the experts are the MLPs unchanged).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config, Qwen3MoeConfig

from specialists.config import expert_specialists

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def experts_per_specialist(config: Qwen3MoeConfig, num_specialists: int) -> int:
    return config.num_experts // num_specialists


def specialist_config(moe: Qwen3MoeConfig, num_specialists: int) -> Qwen3Config:
    """The dense Qwen3 of one specialist: the merged model's config with one MLP of m * expert_size units."""
    common = {key: getattr(moe, key) for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        "rms_norm_eps", "rope_parameters", "initializer_range")}
    width = moe.moe_intermediate_size * experts_per_specialist(moe, num_specialists)
    return Qwen3Config(intermediate_size=width, dtype="float32", **common)


@torch.no_grad()
def merge_specialists(specialists: Sequence[PreTrainedModel], moe: Qwen3MoeConfig, formats: Sequence[str]) -> PreTrainedModel:
    """The Qwen3-MoE of `moe`'s shape whose expert f * m + c is chunk c of specialist f's MLP (down-projection
    times m, see the module docstring) and whose other weights are the specialists' means; routers keep the
    fresh initialisation (seed torch before calling). `formats[f]` names specialist f (alphabetical order, see
    `expert_specialists`); the map expert -> format is saved in the checkpoint's config as `expert_specialists`."""
    if len(specialists) != len(formats) or moe.num_experts % len(formats) or list(formats) != sorted(formats):
        raise ValueError(f"{len(specialists)} specialists for the formats {list(formats)} (sorted) and "
                         f"{moe.num_experts} experts")
    m = experts_per_specialist(moe, len(formats))
    width = moe.moe_intermediate_size
    config = copy.deepcopy(moe)
    config.expert_specialists = expert_specialists(formats, moe.num_experts)  # saved in config.json with the rest
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    states = [dict(specialist.named_parameters()) for specialist in specialists]
    for name, parameter in model.named_parameters():
        if ".mlp.gate." in name:
            continue  # the router: new, trained in the mix phase
        if ".mlp.experts." in name:
            layer = name.removesuffix(".mlp.experts." + name.rpartition(".")[2])
            for f, state in enumerate(states):
                gate, up, down = (state[f"{layer}.mlp.{projection}.weight"] for projection in MLP_PROJECTIONS)
                for c in range(m):
                    units = slice(c * width, (c + 1) * width)
                    if name.endswith("gate_up_proj"):  # (experts, 2W, hidden): gate rows, then up rows
                        parameter[f * m + c] = torch.cat([gate[units], up[units]])
                    else:  # down_proj (experts, hidden, W)
                        parameter[f * m + c] = m * down[:, units]
            continue
        parameter.copy_(averaged(states, name))
    return model


def averaged(states: Sequence[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """The merge's rule for every weight outside the MLPs (attention, norms, embeddings, head): the specialists'
    mean of weight `name`, `states` being their `dict(named_parameters())`."""
    return torch.stack([state[name] for state in states]).mean(dim=0)


def router_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """Every layer's router weight (`mlp.gate.weight`): what the mix phase trains with `mix_train = "router"`."""
    return [parameter for name, parameter in model.named_parameters() if ".mlp.gate." in name]
