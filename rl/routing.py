"""Which experts each completion's tokens were routed to, read off a transformers forward pass.

vLLM's routed-expert capture needs Triton, which the CPU build lacks, so routing is recomputed in
the teacher-forced transformers forward that the algorithms run anyway (for the loss). A forward
hook on every router records its top-k choices; nothing is recomputed and generation is untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _routers(model) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@contextmanager
def capture_routing(model, token_mask: torch.Tensor):
    """Yields a list that, after the forward pass, holds one (batch, layers, experts) int tensor: how
    many of each sequence's tokens (positions where `token_mask` (batch, sequence) is 1) each layer
    routed to each expert. The forward may run in chunks along the batch (as TRL does): the router
    choices of all calls are concatenated in call order. For a dense model the list stays empty.
    """
    choices: dict[torch.nn.Module, list[torch.Tensor]] = {router: [] for router in _routers(model)}

    def hook(module, inputs, output):
        choices[module].append(output[2].detach())  # Qwen3MoeTopKRouter returns (logits, scores, top-k indices)

    handles = [router.register_forward_hook(hook) for router in choices]
    result: list[torch.Tensor] = []
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    if choices and all(choices.values()):
        batch, length = token_mask.shape
        per_layer = []
        for router, calls in choices.items():
            top_k = torch.cat(calls).reshape(batch, length, -1)
            one_hot = torch.nn.functional.one_hot(top_k, router.num_experts).sum(dim=2)  # (batch, length, experts)
            per_layer.append((one_hot * token_mask[..., None].to(one_hot.dtype)).sum(dim=1))
        result.append(torch.stack(per_layer, dim=1).to(torch.int32))
