"""Pretraining replay (mitigations.pretrain_replay_coef): keep the pretraining objective in the RL loss.

InstructGPT's PPO-ptx (Ouyang et al. 2022, arXiv:2203.02155, eq. 2) adds gamma * E_{x ~ D_pretrain}[log pi(x)]
to the RL objective, so the policy keeps the likelihood of the pretraining distribution; here the
pretraining distribution is the format mixture the specialists were trained on, so the replay pulls
towards every format the mixture holds. Each optimiser step of PPO or GRPO minimises

    L = L_RL + pretrain_replay_coef * NLL,   NLL = - sum_{b,t>=1} log pi(x_bt | x_b,<t) / sum_b (|x_b| - 1)

over a batch of `pretrain_replay_batch` pretraining texts: the mean token negative log-likelihood of the
whole text (prompt, solution, end-of-text), exactly the pretraining loss of specialists.pretrain, on
the raw logits (no sampling temperature). PPO-ptx sums log pi(x) over each sequence; the token mean
keeps the coefficient on the scale of the pretraining loss whatever the lengths.

The batch of optimiser step (step, update) is drawn without replacement by a generator seeded from
(seed, step, update) (rl.seeds.step_seed), so a resumed run replays what the uninterrupted one did
and the global RNG is untouched. Expert Iteration refuses the switch: its update is already supervised.
"""

from __future__ import annotations

import torch

from rl.losses import masked_mean
from rl.seeds import step_seed
from rl.sequences import pack, token_logprobs


class PretrainReplay:
    """Tokenised pretraining texts and the seeded replay batches drawn from them."""

    def __init__(self, token_ids: list[list[int]], batch_size: int, pad_id: int, seed: int):
        if not token_ids or any(len(ids) < 2 for ids in token_ids):
            raise ValueError("pretraining replay needs texts of at least two tokens")
        self.token_ids, self.batch_size, self.pad_id, self.seed = token_ids, batch_size, pad_id, seed

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer, batch_size: int, seed: int) -> "PretrainReplay":
        """Texts as specialists.pretrain tokenises them (no special tokens added; the text ends with its own
        end-of-text)."""
        return cls([tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts], batch_size,
                   tokenizer.pad_token_id, seed)

    def indices(self, step: int, update: int = 0) -> list[int]:
        """The texts of optimiser step `update` of RL step `step` (all of them when there are fewer)."""
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, f"replay:{update}"))
        return torch.randperm(len(self.token_ids), generator=generator)[:self.batch_size].tolist()

    def batch(self, step: int, update: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), right-padded."""
        rows = [self.token_ids[i] for i in self.indices(step, update)]
        input_ids, attention_mask, _ = pack([[] for _ in rows], rows, self.pad_id)
        return input_ids, attention_mask

    def loss(self, model, step: int, update: int = 0) -> torch.Tensor:
        """NLL of the batch under `model` (differentiable): the term weighted by pretrain_replay_coef."""
        device = next(model.parameters()).device
        input_ids, attention_mask = (t.to(device) for t in self.batch(step, update))
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return -masked_mean(token_logprobs(logits, input_ids), attention_mask[:, 1:])

