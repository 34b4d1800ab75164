"""Prompt + completion token sequences as tensors: right-padded rows, or packed rows for the training forward."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class PackedBatch:
    """B prompt + completion sequences packed into R rows of width W with no padding between them (first-fit
    decreasing by length; row ends are padded), and where each completion token sits.

    The training forward runs on the rows: position ids restart at 0 with each sequence and, without an
    attention mask, transformers gives each sequence a causal mask of its own (packed-sequence attention,
    `transformers.masking_utils.find_packed_sequence_indices`), so each sequence is computed exactly as
    alone; row padding is a run of one-token sequences no real token sees. Logits are needed only where a
    completion token is predicted: the N `targets`. Per-token results go to the completion layout (B, C)
    (`scatter`): row b holds completion b's tokens from column 0, as TRL's GRPOTrainer lays them out.
    """

    input_ids: torch.Tensor  # (R, W)
    position_ids: torch.Tensor  # (R, W) 0, 1, ... within each sequence; 0 on row padding
    real: torch.Tensor  # (R, W) 1 on the tokens of a sequence, 0 on row padding
    owner: torch.Tensor  # (R, W) the sequence a completion token belongs to; -1 on prompts and padding
    targets: torch.Tensor  # (N,) flat (R * W) position of the input predicting each completion token, completion order
    tokens: torch.Tensor  # (N,) the completion tokens, completion order (sequence by sequence)
    slots: torch.Tensor  # (N,) flat (B * C) position of each completion token in the completion layout
    mask: torch.Tensor  # (B, C) 1 on completion tokens

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Per completion token values (N, ...) -> the completion layout (B, C, ...), 0 off the mask; keeps gradients."""
        batch, width = self.mask.shape
        out = values.new_zeros((batch * width, *values.shape[1:]))
        return out.index_put((self.slots,), values).view(batch, width, *values.shape[1:])

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def pack_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
              completion_width: int | None = None) -> PackedBatch:
    """Pack each prompt + completion into rows as wide as the longest one (see PackedBatch). `completion_width`
    fixes C (default: the longest completion), so minibatches of a batch share its completion layout."""
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(map(len, sequences))
    rows: list[list[int]] = []  # sequence indices per row
    free: list[int] = []
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])):  # first-fit decreasing
        row = next((r for r, space in enumerate(free) if space >= len(sequences[index])), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= len(sequences[index])

    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    start_of = {}
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            length = len(sequences[index])
            input_ids[row, start:start + length] = torch.tensor(sequences[index])
            position_ids[row, start:start + length] = torch.arange(length)
            real[row, start:start + length] = 1
            owner[row, start + len(prompt_ids[index]):start + length] = index
            start_of[index] = row * width + start
            start += length

    completion_width = max(map(len, completion_ids)) if completion_width is None else completion_width
    targets, tokens, slots = [], [], []
    mask = torch.zeros((len(sequences), completion_width), dtype=torch.float32)
    for index, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        first = start_of[index] + len(prompt) - 1  # the input predicting the first completion token
        targets.extend(range(first, first + len(completion)))
        tokens.extend(completion)
        slots.extend(range(index * completion_width, index * completion_width + len(completion)))
        mask[index, :len(completion)] = 1
    targets, tokens, slots = (torch.tensor(values, dtype=torch.long) for values in (targets, tokens, slots))
    return PackedBatch(input_ids, position_ids, real, owner, targets, tokens, slots, mask)
