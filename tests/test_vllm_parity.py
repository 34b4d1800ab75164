"""The same checkpoint in transformers and in vLLM: same greedy tokens, same float32 log-probabilities."""

from rl.config import SamplingSettings
from rl.engines import HFEngine
from specialists.model import load_model
from specialists.tasks import generate_problems, prompt_text
from specialists.tokenizer import load_tokenizer

from rl_helpers import completion_logprob

PROMPTS = [prompt_text(p) for p in generate_problems(6, seed=5, split="eval")]


def test_greedy_tokens_and_logprobs_match(tiny_moe_dir, vllm_moe):
    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=32, samples_per_prompt=1)
    from_vllm = vllm_moe.generate(PROMPTS, greedy, seed=0)
    from_hf = HFEngine(model, tokenizer).generate(PROMPTS, greedy, seed=0)
    assert [len(group) for group in from_vllm] == [len(group) for group in from_hf] == [1] * len(PROMPTS)
    for vllm_group, hf_group in zip(from_vllm, from_hf, strict=True):
        assert vllm_group[0].token_ids == hf_group[0].token_ids
        assert vllm_group[0].text == hf_group[0].text
        assert abs(vllm_group[0].logprob - hf_group[0].logprob) <= 1e-3

    # Per token, on the completions vLLM chose: teacher-forced transformers vs vLLM's own logprobs.
    for prompt, group in zip(PROMPTS, from_vllm, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert abs(completion_logprob(model, prompt_ids, group[0].token_ids) - group[0].logprob) <= 1e-3


def test_seeded_batches_larger_than_one_prefill_budget(vllm_moe):
    """vLLM rewinds the generator of a chunk-prefilled seeded request, which CPU generators cannot do;
    the engine is built without chunked prefill, so a large seeded batch samples, and does so repeatably."""
    prompts = PROMPTS * 20  # 120 prompts x 8 samples: far over one step's 4,096-token budget
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=4, samples_per_prompt=8)
    first = vllm_moe.generate(prompts, sampling, seed=3)
    assert [len(group) for group in first] == [8] * len(prompts)
    assert [[c.token_ids for c in g] for g in vllm_moe.generate(prompts, sampling, seed=3)] == [[c.token_ids for c in g] for g in first]
