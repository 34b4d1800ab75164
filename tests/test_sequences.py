"""The packed training layout (rl.sequences.pack_rows, rl.recipe.policy_forward): where each token goes, and that
the packed forward gives what a plain right-padded forward of each sequence gives."""

from __future__ import annotations

import torch

from rl.recipe import policy_forward
from rl.routing import capture_routing
from rl.sequences import pack, pack_rows, token_logprobs
from specialists.model import load_model

PAD = 0


def test_first_fit_decreasing_layout_by_hand():
    # Sequences of 2+3, 1+1, 3+2 and 1+2 tokens; width = the longest, 5. Longest first: 0 (5) and 2 (5) fill
    # rows 0 and 1; 3 (3 tokens) opens row 2, then 1 (2 tokens) fits beside it.
    prompts = [[11, 12], [21], [31, 32, 33], [41]]
    completions = [[13, 14, 15], [22], [34, 35], [42, 43]]
    packed = pack_rows(prompts, completions, PAD)
    assert packed.input_ids.tolist() == [[11, 12, 13, 14, 15], [31, 32, 33, 34, 35], [41, 42, 43, 21, 22]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert packed.real.tolist() == [[1] * 5] * 3
    assert packed.owner.tolist() == [[-1, -1, 0, 0, 0], [-1, -1, -1, 2, 2], [-1, 3, 3, -1, 1]]
    # completion token j of sequence b is predicted by the input just before it (flat index in the 3 x 5 rows)
    assert packed.targets.tolist() == [1, 2, 3, 13, 7, 8, 10, 11]
    assert packed.tokens.tolist() == [13, 14, 15, 22, 34, 35, 42, 43]
    assert packed.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    values = torch.arange(1.0, 9.0)
    assert packed.scatter(values).tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0], [7, 8, 0]]
    # a fixed completion width (a minibatch laid out like its whole batch) and row padding
    narrow = pack_rows([[1, 2]], [[3]], PAD, completion_width=4)
    assert narrow.mask.tolist() == [[1, 0, 0, 0]] and narrow.input_ids.tolist() == [[1, 2, 3]]
    padded = pack_rows([[1, 2, 3], [4]], [[5], [6]], PAD)  # 4 + 2 tokens: two rows, the second padded
    assert padded.input_ids.tolist() == [[1, 2, 3, 5], [4, 6, PAD, PAD]]
    assert padded.real.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]] and padded.position_ids[1].tolist() == [0, 1, 0, 0]


def test_packed_forward_equals_padded_forward(tiny_moe_dir):
    model = load_model(tiny_moe_dir)
    generator = torch.Generator().manual_seed(0)
    lengths = [(9, 14), (12, 3), (9, 20), (4, 1), (15, 7)]  # (prompt, completion) tokens
    prompts = [torch.randint(1, 300, (p,), generator=generator).tolist() for p, _ in lengths]
    completions = [torch.randint(1, 300, (c,), generator=generator).tolist() for _, c in lengths]
    packed = pack_rows(prompts, completions, PAD)
    assert packed.input_ids.shape[0] < len(lengths)  # sequences share rows
    temperature = 0.7
    with torch.no_grad():
        with capture_routing(model, packed.owner, len(lengths)) as routing:
            forward = policy_forward(model, packed, temperature, router_loss=True)
        # each sequence alone, right-padded: what the loss would see without packing
        input_ids, attention_mask, completion_mask = pack(prompts, completions, PAD)
        with capture_routing(model, torch.where(completion_mask.bool(), torch.arange(5)[:, None], -1), 5) as padded_routing:
            output = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    logits = output.logits.float()
    expected_logprobs = token_logprobs(logits / temperature, input_ids)
    expected_raw = token_logprobs(logits, input_ids)
    log_probs = torch.log_softmax(logits[:, :-1] / temperature, -1)
    expected_entropy = -(log_probs.exp() * log_probs).sum(-1)
    for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
        assert torch.allclose(forward.logprobs[b, :len(completion)], expected_logprobs[b, span], atol=1e-5)
        assert torch.allclose(forward.raw_logprobs[b, :len(completion)], expected_raw[b, span], atol=1e-5)
        assert torch.allclose(forward.entropy[b, :len(completion)], expected_entropy[b, span], atol=1e-5)
        assert (forward.logprobs[b, len(completion):] == 0).all()
    # the router loss over the real tokens, as the model computes it on the padded batch with its attention mask
    assert torch.allclose(forward.aux_loss, output.aux_loss, atol=1e-6)
    # and each completion's routed-token counts
    assert torch.equal(routing[0], padded_routing[0])
    per_token = model.config.num_experts_per_tok * model.config.num_hidden_layers  # top-k experts in every layer
    assert routing[0].sum(dim=(1, 2)).tolist() == [c * per_token for _, c in lengths]
