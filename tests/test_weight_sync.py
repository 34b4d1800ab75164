"""rl/weight_sync.py beyond the per-family push tests: a push invalidates vLLM's prefix cache, the engine computes from
the Parameters a push writes, and a bfloat16 engine serves the trained weights rounded to bfloat16. That a push after
optimiser updates serves the trained weights, and that every parameter reaches the engine, is tested for every
supported family, Qwen3 and Qwen3-MoE among them, in tests/test_model_families.py (the same checks, with noise
scaled to each tensor).

Tiny models are built from config (no hub). Each kind gets one in-process engine, because an engine takes
seconds to start; the bfloat16 test uses the session's bfloat16 engine on the tiny pretrained MoE (conftest). The
checks compare vLLM's float32 token logprobs with the trained model's own logprobs
(max |diff| <= 1e-3; the two agree to ~1e-6). Each check also confirms that without a push the logprobs
differ, so these tests can fail.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("vllm")

from rl.weight_sync import _driver_worker, make_llm, push_weights  # noqa: E402

from rl_helpers import BF16_STALE, BF16_TOLERANCE, hf_token_logprobs, vllm_token_logprobs  # noqa: E402
from specialists.model import load_model  # noqa: E402

TOLERANCE = 1e-3  # max |logprob difference| vLLM vs transformers (float32 both)
STALE = 1e-2  # a difference this large means the engine is not serving the model's weights
VOCAB = 384  # the tiny pretrained models' vocabulary (conftest), so SEQUENCES also fit the session's tiny MoE


def build_model(kind: str, directory):
    """A tiny Qwen3-MoE or dense Qwen3 from config, saved with a word-level tokenizer into `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3MoeConfig

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|pad|>")
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=32, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                  pad_token_id=1)
    if kind == "dense":
        config = Qwen3Config(intermediate_size=128, **common)
    else:
        config = Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, output_router_logits=False, decoder_sparse_step=1, mlp_only_layers=[],
                                experts_implementation="grouped_mm", **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def random_tokens(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (count, length), generator=generator).tolist()


def train(model, steps: int = 2, seed: int = 0) -> None:
    """AdamW lr 1e-2 on random tokens: every weight moves visibly."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in range(steps):
        ids = torch.tensor(random_tokens(4, 32, seed * 100 + batch))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


SEQUENCES = [prompt + completion for prompt, completion in zip(random_tokens(4, 8, 1), random_tokens(4, 16, 2), strict=True)]


def max_difference(llm, model) -> float:
    """Largest |logprob difference| between vLLM and the transformers model over SEQUENCES."""
    return (vllm_token_logprobs(llm, SEQUENCES) - hf_token_logprobs(model, SEQUENCES)).abs().max().item()


@pytest.fixture(scope="module", params=["moe", "dense"])
def engine(request, tmp_path_factory):
    """(transformers model, vLLM engine serving the same weights) for one model kind."""
    directory = tmp_path_factory.mktemp(f"weight-sync-{request.param}")
    model = build_model(request.param, directory)
    llm = make_llm(directory, seed=0, max_model_len=256, kv_cache_gib=0.25)
    yield model, llm
    del llm
    gc.collect()


def test_push_invalidates_prefix_cache(engine):
    """Prompts longer than a KV block (128 tokens) are cached; a push must not reuse their old-weight KV."""
    from vllm import SamplingParams

    model, llm = engine
    prompts = random_tokens(4, 200, seed=3)
    greedy = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0)

    @torch.no_grad()
    def difference() -> float:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        token_ids = [out.outputs[0].token_ids[0] for out in outputs]
        served = torch.tensor([out.outputs[0].logprobs[0][t].logprob for out, t in zip(outputs, token_ids, strict=True)])
        reference = model(input_ids=torch.tensor(prompts)).logits[:, -1].float().log_softmax(-1)
        return (served - reference[torch.arange(len(prompts)), token_ids]).abs().max().item()

    push_weights(llm, model)
    assert difference() <= TOLERANCE  # and the prompts' KV blocks are now cached
    train(model, steps=2, seed=7)
    assert difference() > STALE
    push_weights(llm, model)
    assert difference() <= TOLERANCE


def test_push_into_a_bfloat16_engine_casts_the_trained_weights(vllm_moe_bf16, tiny_moe_dir):
    """The RL's rollout engine as `[rl.engine] dtype = "bfloat16"` builds it (the session's, on the tiny MoE)."""
    model, llm = load_model(tiny_moe_dir), vllm_moe_bf16.llm
    served = _driver_worker(llm).model_runner.get_model()
    try:
        assert {p.dtype for p in served.parameters() if p.numel()} == {torch.bfloat16}
        assert max_difference(llm, model) <= BF16_TOLERANCE
        # One round: a second (4 steps of lr 1e-2 on random tokens) leaves this pretrained model's largest bfloat16
        # difference on these random sequences at ~0.5 (mean 0.007). Repeated pushes of real RL updates into this
        # engine are checked in tests/test_rl_vllm.py::test_bfloat16_rollouts_with_truncated_importance_sampling.
        train(model, steps=2, seed=0)
        assert max_difference(llm, model) > BF16_STALE
        push_weights(llm, model)
        assert max_difference(llm, model) <= BF16_TOLERANCE
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # training stays float32
        # What the engine holds is the trained weights rounded to bfloat16 (a router, compared exactly).
        router = served.model.layers[0].mlp.gate.weight
        assert torch.equal(router, model.model.layers[0].mlp.gate.weight.detach().to(torch.bfloat16))
    finally:  # conftest's contract: the session's engine serves the checkpoint's weights again
        push_weights(llm, load_model(tiny_moe_dir))


def test_an_engine_freed_later_leaves_the_live_engines_working(engine, tmp_path):
    """vLLM's in-process engine, when it shuts down (here: freed by the garbage collector), destroyed the process
    groups every engine of the process reads: the live engine then failed with "pipeline model parallel group is
    not initialized". The order effect it caused (this file before test_vllm_parity) is gone with it."""
    import weakref

    model, llm = engine
    push_weights(llm, model)
    build_model("dense", tmp_path)
    other = make_llm(tmp_path, seed=0, max_model_len=256, kv_cache_gib=0.25)
    client = weakref.ref(other.llm_engine.engine_core)
    del other
    gc.collect()
    assert client() is None  # freed, so shut down
    assert max_difference(llm, model) <= TOLERANCE  # and the live engine still serves its weights


def test_engine_reads_plain_weights(engine):
    """make_llm's engine computes from the Parameters push_weights writes (no private oneDNN copies)."""
    _, llm = engine
    assert _driver_worker(llm).model_runner.get_model()._weight_sync_checked is True
