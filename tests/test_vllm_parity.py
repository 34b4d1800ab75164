"""The same checkpoint in transformers and in vLLM: same greedy tokens, same float32 log-probabilities, and
per-token sampling log-probabilities of the distribution each engine samples from (temperature, top-p). Our vLLM
engine's completions are those vLLM's own `LLM.generate` returns with detokenisation on (text included)."""

import pytest
import torch

from rl.config import SamplingSettings
from rl.engines import HFEngine, completion_text
from rl.seeds import request_seed
from specialists.model import load_model
from specialists.tasks import generate_problems, prompt_text
from specialists.tokenizer import load_tokenizer

PROMPTS = [prompt_text(p) for p in generate_problems(6, seed=5, split="eval")]
TOLERANCE = 1e-3  # |log-prob difference| vLLM vs transformers, both float32 (they agree to ~1e-5)


@torch.no_grad()
def sampling_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float, top_p: float) -> list[float]:
    """Teacher-forced log-probs of the completion's tokens under logits / temperature restricted to the top-p
    nucleus and renormalised: the distribution the engines sample from."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest set of most likely tokens whose mass reaches top_p (the token crossing it included)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    logprobs = logits.masked_fill(~keep, float("-inf")).log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1).tolist()


def test_greedy_tokens_and_logprobs_match(tiny_moe_dir, vllm_moe):
    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=32, samples_per_prompt=1)
    from_vllm = vllm_moe.generate(PROMPTS, greedy, seed=0)
    from_hf = HFEngine(model, tokenizer).generate(PROMPTS, greedy, seed=0)
    assert len(from_vllm) == len(from_hf) == len(PROMPTS)
    for prompt, vllm_group, hf_group in zip(PROMPTS, from_vllm, from_hf, strict=True):
        assert vllm_group[0].token_ids == hf_group[0].token_ids
        assert vllm_group[0].text == hf_group[0].text
        # greedy: both report the raw log-probs, which teacher forcing reproduces token by token
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        forced = sampling_logprobs(model, prompt_ids, vllm_group[0].token_ids, temperature=1.0, top_p=1.0)
        assert len(vllm_group[0].token_logprobs) == len(hf_group[0].token_logprobs) == len(forced)
        for engine_group in (vllm_group, hf_group):
            assert max(abs(a - b) for a, b in zip(engine_group[0].token_logprobs, forced, strict=True)) <= TOLERANCE


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.0, 0.6)])
def test_sampling_logprobs_are_of_the_sampling_distribution(temperature, top_p, tiny_moe_dir, vllm_moe):
    """Both engines report log pi_T,p(y_t): the logits divided by the temperature, then top-p's nucleus
    renormalised (vLLM's processed_logprobs; transformers' scores after its logits processors)."""
    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    sampling = SamplingSettings(temperature=temperature, top_p=top_p, max_new_tokens=24, samples_per_prompt=2)
    for engine in (vllm_moe, HFEngine(model, tokenizer)):
        groups = engine.generate(PROMPTS[:3], sampling, seed=1)
        assert len(groups) == 3
        for prompt, group in zip(PROMPTS[:3], groups, strict=True):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for sample in group:
                forced = sampling_logprobs(model, prompt_ids, sample.token_ids, temperature, top_p)
                assert len(sample.token_logprobs) == len(forced) > 0
                assert max(abs(a - b) for a, b in zip(sample.token_logprobs, forced, strict=True)) <= TOLERANCE
                raw = sampling_logprobs(model, prompt_ids, sample.token_ids, 1.0, 1.0)
                assert max(abs(a - b) for a, b in zip(sample.token_logprobs, raw, strict=True)) > 10 * TOLERANCE  # not the raw ones


def test_seeded_batches_larger_than_one_prefill_budget(vllm_moe):
    """vLLM rewinds the generator of a chunk-prefilled seeded request, which CPU generators cannot do;
    the engine is built without chunked prefill, so a large seeded batch samples, and does so repeatably."""
    prompts = PROMPTS * 20  # 120 prompts x 8 samples: far over one step's 4,096-token budget
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=4, samples_per_prompt=8)
    first = vllm_moe.generate(prompts, sampling, seed=3)
    assert [len(group) for group in first] == [8] * len(prompts)
    assert [[c.token_ids for c in g] for g in vllm_moe.generate(prompts, sampling, seed=3)] == [[c.token_ids for c in g] for g in first]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_engine_returns_what_vllm_returns_with_detokenisation(temperature, tiny_moe_dir, vllm_moe):
    """The engine asks vLLM for token ids and log-probs only and decodes the text afterwards (rl.engines.
    completion_text); everything must equal a plain `LLM.generate` with detokenisation on and per-token log-prob
    dicts, as the engine asked before. At temperature 2 the tiny model samples stray byte tokens, where a one-shot
    `tokenizer.decode` of the completion differs from vLLM's text (asserted: the case is covered)."""
    from vllm import SamplingParams, TokensPrompt

    tokenizer = load_tokenizer(tiny_moe_dir)
    prompts = PROMPTS * 2
    sampling = SamplingSettings(temperature=temperature, max_new_tokens=48, samples_per_prompt=8)
    ours = vllm_moe.generate(prompts, sampling, seed=7)
    params = [SamplingParams(n=8, temperature=temperature, top_p=1.0, top_k=0, max_tokens=48, logprobs=0,
                             seed=request_seed(7, index), skip_special_tokens=True) for index in range(len(prompts))]
    requests = [TokensPrompt(prompt_token_ids=tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    plain = vllm_moe.llm.generate(requests, params, use_tqdm=False)
    one_shot_differs = 0
    for group, output in zip(ours, plain, strict=True):
        for completion, sample in zip(group, output.outputs, strict=True):
            assert completion.token_ids == list(sample.token_ids)
            assert completion.text == sample.text
            assert completion.token_logprobs == [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
            assert completion.finished == (sample.finish_reason == "stop")
            one_shot_differs += tokenizer.decode(completion.token_ids, skip_special_tokens=True) != sample.text
    assert sum(c.finished for g in ours for c in g) > 0  # a stop token ended some completions
    if temperature == 2.0:
        assert one_shot_differs > 0


def test_completion_text_is_vllms_incremental_text(tiny_moe_dir):
    """vLLM's incremental detokeniser holds back a character cut by the end of a completion and leaves the final
    stop token out; a one-shot decode would print U+FFFD for the cut character."""
    from vllm import SamplingParams

    tokenizer = load_tokenizer(tiny_moe_dir)
    prompt_ids = tokenizer("Question: 2 + 2 = ", add_special_tokens=False)["input_ids"]
    text_ids, accent_ids = tokenizer("4 caf", add_special_tokens=False)["input_ids"], tokenizer("\u00e9", add_special_tokens=False)["input_ids"]
    assert len(accent_ids) == 2  # two byte tokens (C3 A9): the corpus has no accents
    params = SamplingParams(skip_special_tokens=True, detokenize=False)
    cut = text_ids + accent_ids[:1]
    assert tokenizer.decode(cut) == "4 caf\ufffd"
    assert completion_text(tokenizer, prompt_ids, cut, params, stopped=False) == "4 caf"
    assert completion_text(tokenizer, prompt_ids, text_ids + accent_ids, params, stopped=False) == "4 caf\u00e9"
    assert completion_text(tokenizer, prompt_ids, text_ids + [tokenizer.eos_token_id], params, stopped=True) == "4 caf"
