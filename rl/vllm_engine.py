"""The vLLM rollout engine (see rl/engines.py for the interface, rl/weight_sync.py for the sync).

Prompts go in as token ids tokenized exactly as the trainer does (no special tokens), so both
engines see the same sequences. Log-probabilities are vLLM's raw ones (`logprobs_mode=raw_logprobs`,
before temperature and top-p), matching `HFEngine`.
"""

from __future__ import annotations

from pathlib import Path

from rl.config import SamplingSettings
from rl.engines import Completion
from rl.weight_sync import make_llm, push_weights


class VLLMEngine:
    def __init__(self, model_dir: str | Path, tokenizer, max_length: int, seed: int, kv_cache_gib: float = 1.0,
                 dtype: str = "float32"):
        self.tokenizer = tokenizer
        self.llm = make_llm(model_dir, seed=seed, max_model_len=max_length, kv_cache_gib=kv_cache_gib, dtype=dtype,
                            logprobs_mode="raw_logprobs")

    def generate(self, prompts: list[str], sampling: SamplingSettings, seed: int) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        params = [SamplingParams(n=sampling.samples_per_prompt, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=0, max_tokens=sampling.max_new_tokens, logprobs=0, seed=seed * 1_000_003 + index,
                                 skip_special_tokens=True)
                  for index in range(len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for output in outputs:
            group = []
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logprob = sum(step[token].logprob for step, token in zip(sample.logprobs, ids))
                group.append(Completion(text=sample.text, token_ids=ids, logprob=float(logprob),
                                        finished=sample.finish_reason == "stop"))
            results.append(group)
        return results

    def sync_weights(self, model) -> None:
        push_weights(self.llm, model)

    def close(self) -> None:
        # Dropping the engine frees its KV cache; an in-process engine has no worker processes to stop.
        self.llm = None
