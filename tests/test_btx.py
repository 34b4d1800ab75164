"""Branch-Train-MiX bases (`[model] kind = "btx"`): the merge, `echolab pretrain` on a BTX config, vLLM serving the
merged checkpoint and weight sync into it after updates, expert-load capture, and the pipeline's cache.

One tiny BTX base is built for the module by `echolab pretrain` (in process) from users' corpora in the real
datasets' shapes (tests/corpora.py): 3 formats, 6 experts of 64 (2 per specialist), 2 active; the dense specialists'
MLPs are 128 wide. Its mix phase trains the routers only, so its experts must still be the specialists' MLPs.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch

from corpora import write_corpora
from experiments.cli import main as echolab
from experiments.config import load_experiment_config
from rl_helpers import hf_token_logprobs, vllm_token_logprobs
from specialists import btx
from specialists.config import ModelSettings, expert_specialists
from specialists.model import count_parameters, load_model, model_config

FORMATS = ["gsm8k", "llm_code", "python_function"]  # alphabetical: the order of the specialists' experts
TINY_BTX = """
seed = 0

[mixture]
format_set = "echo-chamber"

[mixture.formats.python_function]
weight = 1.0
data = "{python_function}"

[mixture.formats.llm_code]
weight = 1.0
data = "{llm_code}"

[mixture.formats.gsm8k]
weight = 1.0
data = "{gsm8k}"

[model]
kind = "{kind}"
hidden_size = 64
num_layers = 2
num_heads = 2
num_kv_heads = 1
num_experts = 6
experts_per_token = 2
expert_size = 64

[pretrain]
num_examples = 480
batch_size = 32

[evaluation]
num_problems = 16
max_new_tokens = 48
"""


def write_config(directory, kind: str = "btx", extra: str = "") -> str:
    paths = write_corpora(directory, texts_per_format=200)
    path = directory / f"{kind}.toml"
    path.write_text(TINY_BTX.replace("{kind}", kind).format(**{name: str(p) for name, p in paths.items()}) + extra)
    return str(path)


@pytest.fixture(scope="module")
def btx_base(tmp_path_factory):
    """`echolab pretrain` on the tiny BTX config: (output directory, config)."""
    directory = tmp_path_factory.mktemp("btx")
    config = write_config(directory)
    assert echolab(["pretrain", config, "--out", str(directory / "base"), "--quiet"]) == 0
    return directory / "base", load_experiment_config(config)


def random_dense_specialists(moe_config, count: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    return [AutoModelForCausalLM.from_config(btx.specialist_config(moe_config, count), dtype=torch.float32)
            for _ in range(count)]


def test_merged_experts_are_the_specialists_mlps_and_the_rest_their_mean():
    moe_config = model_config(ModelSettings(kind="btx", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                            num_experts=6, expert_size=32), 100, 0, 1)
    specialists = random_dense_specialists(moe_config, 3)  # MLPs of 2 x 32 units
    merged = btx.merge_specialists(specialists, moe_config, ["a", "b", "c"])
    assert merged.config.expert_specialists == ["a", "a", "b", "b", "c", "c"]
    for layer in range(2):
        experts = merged.model.layers[layer].mlp.experts
        for f, specialist in enumerate(specialists):
            mlp = specialist.model.layers[layer].mlp
            for c in range(2):  # expert 2f + c = units 32c .. 32c + 31 of specialist f; down-projection x 2
                units = slice(32 * c, 32 * (c + 1))
                assert torch.equal(experts.gate_up_proj[2 * f + c, :32], mlp.gate_proj.weight[units])
                assert torch.equal(experts.gate_up_proj[2 * f + c, 32:], mlp.up_proj.weight[units])
                assert torch.equal(experts.down_proj[2 * f + c], 2 * mlp.down_proj.weight[:, units])
            # A token routed to both of f's experts with equal weights (what norm_topk_prob gives equal scores)
            # gets exactly f's MLP: sum_c 1/2 * (2 * chunk_c(x)) = MLP(x).
            hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(f))
            chosen = torch.tensor([[2 * f, 2 * f + 1]] * 5)
            with torch.no_grad():
                routed = experts(hidden, chosen, torch.full((5, 2), 0.5))
                torch.testing.assert_close(routed, mlp(hidden), rtol=1e-5, atol=1e-6)
    averaged = dict(merged.named_parameters())
    for name, parameter in specialists[0].named_parameters():
        if ".mlp." not in name:  # attention, norms, embeddings, head: the mean of the specialists'
            mean = torch.stack([dict(s.named_parameters())[name] for s in specialists]).mean(dim=0)
            assert torch.equal(averaged[name], mean), name


def test_sizes_match_the_joint_moe_with_the_same_model_numbers():
    """Same [model] numbers, kind btx vs moe: the same architecture, so the same total and active parameters."""
    settings = ModelSettings(kind="btx", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=6,
                             expert_size=32)
    moe_config = model_config(settings, 100, 0, 1)
    merged = btx.merge_specialists(random_dense_specialists(moe_config, 3), moe_config, ["a", "b", "c"])
    from specialists.model import build_model

    joint = build_model(settings.model_copy(update={"kind": "moe"}), 100, 0, 1, seed=0)
    assert count_parameters(merged) == count_parameters(joint)
    # A specialist's MLP (2 experts x 32 = 64 units) is as wide as the active experts of a token (2 x 32) and as
    # the dense baseline's MLP (expert_size x experts_per_token).
    assert btx.specialist_config(moe_config, 3).intermediate_size == settings.expert_size * settings.experts_per_token


def test_echolab_pretrain_builds_a_btx_base_from_the_formats_corpora(btx_base):
    out, config = btx_base
    model = load_model(out / "model")
    assert model.config.expert_specialists == ["gsm8k", "gsm8k", "llm_code", "llm_code", "python_function", "python_function"]
    summary = json.loads((out / "pretrain_summary.json").read_text())
    # 480 examples, 160 per format; seed and mix phases: the first and last 48 (0.1) of the shuffled corpus
    assert {name: phase["examples"] for name, phase in summary["phases"].items()} == {
        "seed": 48, "specialist:python_function": 160, "specialist:llm_code": 160, "specialist:gsm8k": 160, "mix": 48}
    log = [json.loads(line) for line in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert [record["phase"] for record in log][-1] == "mix" and "aux_loss" in log[-1]
    # Router-only mix: every expert is still exactly its specialist's MLP chunk, the rest exactly their mean.
    specialists = [load_model(out / "specialists" / name) for name in FORMATS]
    merged = dict(model.named_parameters())
    for layer in range(2):
        for f, specialist in enumerate(specialists):
            mlp = specialist.model.layers[layer].mlp
            for c in range(2):
                units = slice(64 * c, 64 * (c + 1))
                up = merged[f"model.layers.{layer}.mlp.experts.gate_up_proj"][2 * f + c]
                assert torch.equal(up, torch.cat([mlp.gate_proj.weight[units], mlp.up_proj.weight[units]]))
                assert torch.equal(merged[f"model.layers.{layer}.mlp.experts.down_proj"][2 * f + c],
                                   2 * mlp.down_proj.weight[:, units])
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(merged[name], torch.stack([dict(s.named_parameters())[name] for s in specialists]).mean(dim=0))


def test_evaluation_reports_each_experts_format_affinity(btx_base):
    out, _ = btx_base
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["format_share"]) == {"python_function", "llm_code", "gsm8k", "natural_language", "other"}
    assert evaluation["expert_specialists"] == expert_specialists(FORMATS, 6)
    for layer in ("0", "1"):
        for fmt, row in evaluation["format_expert_affinity"][layer].items():
            assert len(row) == 6 and sum(row) == pytest.approx(1.0)
        top = evaluation["expert_top_format"][layer]
        assert evaluation["experts_still_specialists"][layer] == [a == b for a, b in zip(top, evaluation["expert_specialists"], strict=True)]
    for fmt, by_layer in evaluation["specialist_alignment"].items():
        row = evaluation["format_expert_affinity"]["0"][fmt]
        owned = [e for e, name in enumerate(evaluation["expert_specialists"]) if name == fmt]
        assert by_layer["0"] == pytest.approx(sum(row[e] for e in owned))


def test_btx_oracle_models_are_the_merge_under_oracle_routing_and_score_the_solution_tokens(btx_base):
    """The study's btx_oracle.py: its "averaged rest" model is specialist f's MLP with every other weight exactly as
    the merged MoE holds it (router-only mix leaves them), and its loss is transformers' own cross-entropy with the
    prompt's tokens masked out."""
    import importlib.util

    from specialists.tokenizer import load_tokenizer

    spec = importlib.util.spec_from_file_location("btx_oracle", "experiments/studies/echo_chamber/btx_oracle.py")
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    out, _ = btx_base
    specialists = [load_model(out / "specialists" / name) for name in FORMATS]
    merged = dict(load_model(out / "model").named_parameters())
    averaged = oracle.with_averaged_rest(specialists[1], specialists)
    own = dict(specialists[1].named_parameters())
    for name, parameter in averaged.named_parameters():
        assert torch.equal(parameter, own[name] if ".mlp." in name else merged[name]), name
    assert not torch.equal(own["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"])

    tokenizer = load_tokenizer(out / "model")
    prompt, solution = "Problem: Ann has 3 apples and buys 4 more.\nSolution:\n", "def solve():\n    return 3 + 4\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(solution, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, :len(prompt_ids)] = -100
    with torch.no_grad():
        expected = averaged(ids, labels=labels).loss.item()
    assert oracle.solution_loss(averaged, tokenizer, [(prompt, solution)]) == pytest.approx(expected, rel=1e-5)


def test_vllm_serves_the_merged_checkpoint_and_weight_sync_after_updates(btx_base):
    """vLLM log-probs match transformers on the merged model, and again after updates pushed into the live engine;
    the training forward records expert load over all 6 experts of both layers."""
    pytest.importorskip("vllm")
    from rl.routing import capture_routing
    from rl.weight_sync import make_llm, push_weights

    out, _ = btx_base
    model = load_model(out / "model")
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(2, model.config.vocab_size, (4, 24), generator=generator).tolist()
    llm = make_llm(out / "model", seed=0, max_model_len=256, kv_cache_gib=0.25)
    try:
        def difference() -> float:
            return (vllm_token_logprobs(llm, sequences) - hf_token_logprobs(model, sequences)).abs().max().item()

        assert difference() <= 1e-3  # the merged checkpoint as saved
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for update in range(2):
            model.train()
            ids = torch.tensor(sequences)
            owner = torch.arange(ids.size(0))[:, None].expand_as(ids)  # every token of each row counted
            with capture_routing(model, owner, ids.size(0)) as routing:
                model(input_ids=ids, labels=ids).loss.backward()
            assert routing[0].shape == (4, 2, 6) and (routing[0].sum(dim=2) == 24 * 2).all()  # 24 tokens x top-2
            optimizer.step()
            optimizer.zero_grad()
            model.eval()
            assert difference() > 1e-2  # not pushed yet: the engine still serves the old weights
            push_weights(llm, model)
            assert difference() <= 1e-3
    finally:
        del llm
        gc.collect()


RL = """
[rl]
algorithm = "grpo"
steps = 2
prompts_per_step = 2
num_prompts = 8
checkpoint_every = 1

[rl.sampling]
samples_per_prompt = 4
max_new_tokens = 32
"""


def test_echolab_run_post_trains_a_cached_btx_base_and_records_specialist_dominance(tmp_path, monkeypatch):
    """`echolab run` on a BTX config: the base is pretrained into the cache, served by vLLM, post-trained with GRPO;
    the rollouts carry expert load over all 6 experts, the analysis measures specialist dominance, and a second
    request for the same base comes from the cache."""
    import pyarrow.parquet as pq

    from experiments.pipeline import base_model_dir
    from specialists.config import cache_root

    monkeypatch.setenv("ECHOLAB_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path, extra=RL)
    assert echolab(["run", config, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    [cached] = list((cache_root() / "pretrain").iterdir())
    assert (cached / "evaluation.json").is_file() and sorted(p.name for p in (cached / "specialists").iterdir()) == sorted(FORMATS)
    for step in (0, 1, 2):  # step 2 samples the final model
        loads = pq.read_table(tmp_path / "run" / "rollouts" / f"step_00000{step}.parquet").column("expert_load").to_pylist()
        assert len(loads) == 8 and all(len(load) == 2 and all(len(layer) == 6 for layer in load) for load in loads)
    dominance = json.loads((tmp_path / "run" / "summary.json").read_text())["specialist_dominance"]
    assert dominance["expert_specialists"] == expert_specialists(FORMATS, 6)
    for by_step in dominance["specialist_share"].values():
        assert list(by_step) == ["0", "2"] and all(sum(shares.values()) == pytest.approx(1.0) for shares in by_step.values())
    assert "Specialist dominance" in (tmp_path / "run" / "report.html").read_text()

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the cached BTX base was trained again")

    monkeypatch.setattr("specialists.pretrain.pretrain", no_pretraining)
    assert base_model_dir(load_experiment_config(config).specialists(), progress=False) == cached / "model"
