"""Which experts each completion's tokens were routed to, read off a transformers forward pass.

vLLM's routed-expert capture needs Triton, which the CPU build lacks, so routing is recomputed in
the teacher-forced transformers forward that the algorithms run anyway (for the loss). A forward
hook on every router records its top-k choices; nothing is recomputed and generation is untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Per mixture-of-experts family (transformers 5.19 config.model_type): where the top-k expert indices are in
# the output of the router at `layer.mlp.gate`. All three routers (Qwen3MoeTopKRouter, OlmoeTopKRouter,
# MixtralTopKRouter) return (logits, top-k weights, top-k indices); Mixtral's `block_sparse_moe` is renamed
# `mlp` when transformers loads it. They differ only in how the top-k weights are normalised (Mixtral always,
# the others by `norm_topk_prob`), which the counts do not see. A Qwen3-MoE layer in `mlp_only_layers` has a
# dense MLP and no router: the layers recorded are the MoE layers.
TOP_K_INDICES = {"qwen3_moe": 2, "olmoe": 2, "mixtral": 2}


def _routers(model) -> list[torch.nn.Module]:
    """The MoE layers' routers in layer order; [] for a dense model."""
    if model.config.model_type not in TOP_K_INDICES:
        return []
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@contextmanager
def capture_routing(model, owner: torch.Tensor, num_sequences: int):
    """Yields a list that, after the forward pass, holds one (num_sequences, layers, experts) int tensor: how
    many of each sequence's counted tokens each layer routed to each expert. `owner` has the shape of the
    forward's input ids and tells, per position, the sequence whose token is counted there, -1 for positions
    not counted (rl.sequences.PackedBatch.owner counts completion tokens). For a dense model the list stays
    empty.
    """
    choices: dict[torch.nn.Module, list[torch.Tensor]] = {router: [] for router in _routers(model)}
    top_k = TOP_K_INDICES.get(model.config.model_type)

    def hook(module, inputs, output):
        choices[module].append(output[top_k].detach())  # (tokens, k)

    handles = [router.register_forward_hook(hook) for router in choices]
    result: list[torch.Tensor] = []
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    if choices and all(choices.values()):
        owner = owner.flatten()
        counted = owner >= 0
        per_layer = []
        for router, calls in choices.items():
            top_k = torch.cat(calls).reshape(owner.numel(), -1)  # (positions, k)
            one_hot = torch.nn.functional.one_hot(top_k, router.num_experts).sum(dim=1)  # (positions, experts)
            counts = torch.zeros(num_sequences, router.num_experts, dtype=one_hot.dtype, device=one_hot.device)
            per_layer.append(counts.index_add_(0, owner[counted], one_hot[counted]))
        result.append(torch.stack(per_layer, dim=1).to(torch.int32))
