"""Rollout throughput: vLLM against transformers `generate` on the default MoE model, at one dtype.

64 prompts x 8 samples x exactly 64 new tokens (min = max, so both engines do the same work),
temperature 1.0, same prompts, each engine warmed up first. transformers generates as many sequences per call
as vLLM's scheduler keeps in flight (`max_num_seqs`, whole prompts; `--hf-batch` to change). Both engines compute in `--dtype`: vLLM's engine as the RL engine is built
(rl.weight_sync.make_llm), transformers' model cast to it. The two are timed back to back in one process.
Engine start is reported apart from generation. Besides wall seconds, the CPU seconds of this process
while each engine generates (`time.process_time`, all its threads), which a loaded machine inflates far
less than the wall clock (`cpu_speedup`). Prints one JSON line.

    python bench/rollout_throughput.py [--model DIR] [--dtype float32|bfloat16] [--hf-batch N]   # default model: the default config's, untrained
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def default_model_dir(directory: str) -> str:
    """The default config's MoE with its tokenizer, untrained (speed does not depend on the weights)."""
    from specialists.config import SpecialistsConfig
    from specialists.model import build_model
    from specialists.pretrain import build_corpus
    from specialists.tokenizer import train_tokenizer

    config = SpecialistsConfig()
    tokenizer = train_tokenizer((e.text for e in build_corpus(config)[:2000]), config.pretrain.vocab_size)
    model = build_model(config.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, config.seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint directory (default: build the default MoE)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--hf-batch", type=int, help="sequences per transformers generate call, whole prompts "
                        "(default: as many as vLLM's scheduler keeps in flight, max_num_seqs)")
    args = parser.parse_args()

    import torch
    from vllm import SamplingParams, TokensPrompt

    from rl.weight_sync import make_llm
    from specialists.model import load_model
    from specialists.tasks import generate_problems, prompt_text
    from specialists.tokenizer import load_tokenizer

    model_dir = args.model or default_model_dir(tempfile.mkdtemp(prefix="echolab-bench-"))
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).to(getattr(torch, args.dtype)).eval()
    prompts = [prompt_text(p) for p in generate_problems(args.prompts, seed=0, split="eval")]
    total_tokens = args.prompts * args.samples * args.new_tokens

    started = time.perf_counter()
    llm = make_llm(model_dir, seed=0, max_model_len=256, dtype=args.dtype)
    engine_start_s = time.perf_counter() - started
    requests = [TokensPrompt(prompt_token_ids=tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    params = SamplingParams(n=args.samples, temperature=1.0, top_k=0, top_p=1.0, min_tokens=args.new_tokens,
                            max_tokens=args.new_tokens, seed=0)
    llm.generate(requests[:2], params, use_tqdm=False)  # warm-up
    started, cpu_started = time.perf_counter(), time.process_time()
    outputs = llm.generate(requests, params, use_tqdm=False)
    vllm_s, vllm_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    assert sum(len(s.token_ids) for o in outputs for s in o.outputs) == total_tokens

    torch.manual_seed(0)
    with torch.no_grad():  # warm-up, as vLLM's
        batch = tokenizer(prompts[:2], return_tensors="pt", padding=True, add_special_tokens=False)
        model.generate(**batch, do_sample=True, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)
    # transformers gets as many sequences per generate call as vLLM keeps in flight (its max_num_seqs), in
    # whole prompts: a smaller batch would leave it more per-token Python overhead than vLLM pays
    hf_batch = args.hf_batch or llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    batch_prompts = max(1, hf_batch // args.samples)
    hf_s, hf_cpu_s = 0.0, 0.0
    with torch.no_grad():
        for begin in range(0, len(prompts), batch_prompts):
            batch = tokenizer(prompts[begin:begin + batch_prompts], return_tensors="pt", padding=True, add_special_tokens=False)
            started, cpu_started = time.perf_counter(), time.process_time()
            output = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    num_return_sequences=args.samples, min_new_tokens=args.new_tokens,
                                    max_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)
            hf_s += time.perf_counter() - started
            hf_cpu_s += time.process_time() - cpu_started
            assert output.shape[1] - batch["input_ids"].shape[1] == args.new_tokens

    print(json.dumps({
        "prompts": args.prompts, "samples_per_prompt": args.samples, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "vllm_engine_start_s": round(engine_start_s, 2), "vllm_s": round(vllm_s, 2), "hf_s": round(hf_s, 2),
        "vllm_tokens_per_s": round(total_tokens / vllm_s, 1), "hf_tokens_per_s": round(total_tokens / hf_s, 1),
        "speedup": round(hf_s / vllm_s, 2), "torch_threads": torch.get_num_threads(),
        "vllm_cpu_s": round(vllm_cpu_s, 2), "hf_cpu_s": round(hf_cpu_s, 2), "cpu_speedup": round(hf_cpu_s / vllm_cpu_s, 2),
        "hf_batch_sequences": batch_prompts * args.samples, "loadavg_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
