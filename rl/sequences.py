"""Prompt + completion token sequences as padded tensors, and their teacher-forced log-probabilities."""

from __future__ import annotations

import torch


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int):
    """Right-padded (input_ids, attention_mask, completion_mask), each (batch, longest prompt + completion).

    completion_mask is 1 at the positions of completion tokens.
    """
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    completion_mask = torch.zeros((len(lengths), width), dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        sequence = prompt + completion
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention_mask[row, :len(sequence)] = 1
        completion_mask[row, len(prompt):len(sequence)] = 1
    return input_ids, attention_mask, completion_mask


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, shape (batch, length - 1): entry t-1 belongs to token t."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
