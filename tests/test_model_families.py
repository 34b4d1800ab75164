"""Every supported family (specialists.families.FAMILIES) as an RL base: loading, vLLM rollouts, weight sync into
the live engine after optimiser updates, and expert load per layer for the mixtures of experts.

Each family gets a tiny random-initialised checkpoint built here (tests/model_families.py) and one in-process
vLLM engine (rl.weight_sync.make_llm) for the module. Parity: vLLM's float32 token log-probabilities against
the trained transformers model's own, max |diff| <= 1e-3 (they agree to ~1e-6); every check first confirms
that the engine serves stale weights before a push (difference > 1e-2), so these tests can fail.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch

from specialists.errors import UserError
from specialists.families import FAMILIES, checkpoint_family, has_chat_template
from specialists.model import is_moe, load_model
from specialists.prompting import Prompter
from specialists.tasks import generate_problems
from specialists.tokenizer import load_tokenizer

from model_families import EXPERTS, EXPERTS_PER_TOKEN, LAYERS, build_checkpoint
from rl_helpers import completion_logprob, hf_token_logprobs, vllm_token_logprobs

TOLERANCE = 1e-3  # max |logprob difference| vLLM vs transformers (float32 both)
STALE = 1e-2  # a difference this large means the engine is not serving the model's weights
MOE_FAMILIES = [name for name, family in FAMILIES.items() if family.mixture_of_experts]


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    return build_checkpoint(request.param, tmp_path_factory.mktemp(f"family-{request.param}"))


@pytest.fixture(scope="module")
def rollout_engine(checkpoint):
    """(transformers model, the RL's vLLM rollout engine serving the same weights) for the module's family: the
    only engine of the family in the session, also lent to the end-to-end run."""
    pytest.importorskip("vllm")
    from rl.config import EngineSettings
    from rl.engines import make_engine

    model = load_model(checkpoint).eval()
    engine = make_engine(EngineSettings(kv_cache_gib=0.25), checkpoint, model, load_tokenizer(checkpoint),
                         max_length=256, seed=0)
    yield model, engine
    engine.close()
    gc.collect()


@pytest.fixture
def engine(rollout_engine):
    """(transformers model, vllm.LLM) of the family's rollout engine."""
    model, rollout = rollout_engine
    return model, rollout.llm


def sequences(vocab_size: int, seed: int) -> list[list[int]]:
    """4 random token sequences of 24 tokens (the special tokens' ids 0 and 1 left out)."""
    return torch.randint(2, vocab_size, (4, 24), generator=torch.Generator().manual_seed(seed)).tolist()


def max_difference(llm, model) -> float:
    tokens = sequences(model.config.vocab_size, seed=1)
    return (vllm_token_logprobs(llm, tokens) - hf_token_logprobs(model, tokens)).abs().max().item()


def train(model, steps: int, seed: int) -> None:
    """AdamW lr 1e-2 on random tokens (router load-balancing loss on for the MoE): every weight moves."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = {"output_router_logits": True} if is_moe(model) else {}
    for batch in range(steps):
        ids = torch.tensor(sequences(model.config.vocab_size, seed=100 * seed + batch))
        model(input_ids=ids, labels=ids, **extra).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_checkpoint_loads_as_its_family(checkpoint):
    family, config = checkpoint_family(checkpoint)
    assert family is FAMILIES[config["model_type"]]
    model = load_model(checkpoint)
    assert is_moe(model) == family.mixture_of_experts
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert has_chat_template(checkpoint) == (tokenizer.chat_template is not None) == ("qwen" in config["model_type"])


def test_push_after_updates_serves_trained_weights(engine):
    model, llm = engine
    assert max_difference(llm, model) <= TOLERANCE  # the checkpoint the engine loaded
    from rl.weight_sync import push_weights

    for round_ in range(2):
        train(model, steps=2, seed=round_)
        assert max_difference(llm, model) > STALE  # not pushed yet: the engine still serves the old weights
        push_weights(llm, model)
        assert max_difference(llm, model) <= TOLERANCE


def test_every_parameter_reaches_the_engine(engine):
    """Perturb one tensor at a time (catches a single stale tensor: a router, one expert tensor, a norm). The noise
    is large beside the tensor's own entries (norm weights are ~1, the others ~0.02), so every perturbation shows."""
    from rl.weight_sync import push_weights

    model, llm = engine
    push_weights(llm, model)
    for name, param in model.named_parameters():
        scale = 0.2 + param.detach().abs().mean()
        noise = scale * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name)))
        with torch.no_grad():
            param.add_(noise)
        assert max_difference(llm, model) > STALE, name
        push_weights(llm, model)
        assert max_difference(llm, model) <= TOLERANCE, name
        with torch.no_grad():
            param.sub_(noise)
    push_weights(llm, model)


def test_seeded_rollouts_carry_the_served_logprobs(engine, checkpoint):
    """Sampled completions of Prompter prompts: repeatable per seed, and vLLM's log-probability of each one
    equals the transformers model's teacher-forced one (after a push, as in every RL step)."""
    from vllm import SamplingParams, TokensPrompt

    from rl.weight_sync import push_weights

    model, llm = engine
    train(model, steps=1, seed=5)
    push_weights(llm, model)
    tokenizer = load_tokenizer(checkpoint)
    prompter = Prompter(tokenizer, chat=tokenizer.chat_template is not None)
    prompts = [prompter.token_ids(p) for p in generate_problems(3, seed=2, split="eval")]
    params = SamplingParams(n=2, temperature=1.0, top_k=0, max_tokens=12, logprobs=0, seed=7)

    def sample():
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        return [(ids, s) for ids, out in zip(prompts, outputs, strict=True) for s in out.outputs]

    samples = sample()
    assert len(samples) == len(prompts) * params.n
    assert [list(s.token_ids) for _, s in sample()] == [list(s.token_ids) for _, s in samples]
    for prompt_ids, sample_ in samples:
        served = sum(step[token].logprob for step, token in zip(sample_.logprobs, sample_.token_ids, strict=True))
        assert abs(completion_logprob(model, prompt_ids, list(sample_.token_ids)) - served) <= TOLERANCE


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_expert_load_per_layer(model_type, tmp_path):
    """capture_routing counts, per sequence, layer and expert, the routed tokens of the masked positions: the
    same counts as the top-k of the router logits transformers returns itself (output_router_logits)."""
    from rl.routing import capture_routing

    model = load_model(build_checkpoint(model_type, tmp_path)).eval()
    ids = torch.tensor(sequences(model.config.vocab_size, seed=3))  # (4, 24)
    owner = torch.arange(4)[:, None].expand_as(ids).clone()  # each row its own sequence
    owner[:, :5] = -1  # a prompt of 5 tokens is not counted
    with torch.no_grad(), capture_routing(model, owner, 4) as loads:
        router_logits = model(input_ids=ids, output_router_logits=True).router_logits  # per layer (4 * 24, E)
    (load,) = loads
    assert load.shape == (4, LAYERS, EXPERTS)
    assert load.sum(dim=2).tolist() == [[19 * EXPERTS_PER_TOKEN] * LAYERS] * 4  # 19 counted tokens x k experts
    for layer, logits in enumerate(router_logits):
        top_k = logits.topk(EXPERTS_PER_TOKEN, dim=-1).indices.reshape(4, 24, EXPERTS_PER_TOKEN)[:, 5:]
        expected = torch.nn.functional.one_hot(top_k, EXPERTS).sum(dim=(1, 2))  # (4, E)
        assert torch.equal(load[:, layer], expected.to(load.dtype)), layer


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    from model_families import family_tokenizer

    GPT2Config(n_embd=64, n_layer=1, n_head=2).save_pretrained(tmp_path)
    family_tokenizer("llama").save_pretrained(tmp_path)
    with pytest.raises(UserError) as error:
        checkpoint_family(tmp_path)
    message = str(error.value)
    assert "'gpt2'" in message and "\n" not in message
    assert all(family.name in message for family in FAMILIES.values())


def test_incomplete_checkpoints_are_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        checkpoint_family(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no tokenizer"):
        checkpoint_family(tmp_path)


@pytest.mark.parametrize("change, problem", [
    ({"head_dim": 48}, "head_dim 48 is not one of"),
    ({"hidden_size": 80, "head_dim": 32}, "hidden_size 80 is not a multiple of 32"),
    ({"norm_topk_prob": True}, "norm_topk_prob = true"),
])
def test_checkpoints_vllm_cannot_serve_exactly_are_refused(change, problem, tmp_path):
    build_checkpoint("olmoe", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=problem):
        checkpoint_family(tmp_path)


class LentEngine:
    """The family's session engine lent to one run: the run may sync it, not close it."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def close(self) -> None:
        pass


def test_echolab_run_on_the_family(rollout_engine, checkpoint, tmp_path, monkeypatch):
    """The pipeline with `[model] path` = the family's checkpoint: no pretraining, a short GRPO run with vLLM
    rollouts (the family's engine, lent), the run directory with expert load per layer for the MoE, the analysis
    and the report. Last in the module: it leaves the engine serving the checkpoint's weights again."""
    import pyarrow.parquet as pq

    import rl.engines
    from experiments.config import ExperimentConfig
    from experiments.pipeline import run_experiment

    model, engine = rollout_engine
    tokenizer = load_tokenizer(checkpoint)
    chat = tokenizer.chat_template is not None  # the prompt as the chat template's user turn where there is one
    config = ExperimentConfig.model_validate({
        "model": {"path": str(checkpoint)},
        "rl": {"chat_template": chat, "prompt_template": "Solve: {question}\n", "steps": 2, "prompts_per_step": 2, "num_prompts": 4, "checkpoint_every": 1, "learning_rate": 1e-3,
               "sampling": {"samples_per_prompt": 4, "max_new_tokens": 16}, "engine": {"kv_cache_gib": 0.25}}})
    monkeypatch.setattr(rl.engines, "make_engine", lambda *args, **kwargs: LentEngine(engine))
    monkeypatch.setenv("ECHOLAB_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    try:
        report = run_experiment(config, run_dir, progress=False)
    finally:
        engine.sync_weights(load_model(checkpoint))  # the checkpoint's weights, for the next user of the engine
    assert report.is_file() and not (tmp_path / "cache").exists()  # nothing was pretrained
    steps = sorted(run_dir.glob("rollouts/step_*.parquet"))
    assert len(steps) >= 2
    family_model = load_model(checkpoint)
    moe = is_moe(family_model)
    for path in steps:
        rows = pq.read_table(path).to_pylist()
        assert len(rows) == 2 * 4
        for row in rows:
            prompt = row["prompt"]
            if chat:  # the template's text as the user turn, then the generation prompt
                head, tail = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
                assert prompt.startswith(head) and prompt.endswith(tail)
                message = prompt[len(head):-len(tail)]
            else:  # Llama's beginning-of-text token written out, once; no special token for the others
                bos = tokenizer.bos_token if model.config.model_type == "llama" else ""
                assert prompt.startswith(bos)
                message = prompt[len(bos):]
            assert message.startswith("Solve: ") and message.endswith("?\n") and "<|" not in message
            if not moe:
                assert row["expert_load"] is None
                continue
            load = torch.tensor(row["expert_load"])
            assert load.shape == (LAYERS, EXPERTS)  # every MoE layer, every expert
            assert load.sum(dim=1).tolist() == [row["num_tokens"] * EXPERTS_PER_TOKEN] * LAYERS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert ("expert_share" in summary and len(summary["expert_share"]) == LAYERS) == moe
    trained = load_model(sorted(run_dir.glob("checkpoints/step_*"))[-1])
    assert trained.config.model_type == family_model.config.model_type
