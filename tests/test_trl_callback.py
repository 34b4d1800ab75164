"""CollapseCallback on a stock, unmodified TRL GRPOTrainer (transformers generation, no vLLM) with the tiny
Qwen3-MoE of conftest: what it records, what it logs through TRL's logger, and that `echolab analyze` and
`echolab report` read its run directory."""

from __future__ import annotations

import json
import math
import os
import warnings

import pyarrow.parquet as pq
import pytest
import torch

from experiments.cli import main as echolab
from specialists.errors import UserError
from specialists.model import load_model
from specialists.run_directory import METRICS_FILE, SUMMARY_FILE, rollout_files
from specialists.tasks import generate_problems, prompt_text
from specialists.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration

PROMPTS, GENERATIONS, STEPS = 2, 4, 3


class DigitReward:
    """The user's own reward: the share of digits in the completion (never all equal, so updates happen).
    Keeps what TRL passed it at each step, for the test to compare with the record."""

    def __init__(self):
        self.calls: dict[int, dict] = {}

    def __call__(self, prompts, completions, completion_ids, trainer_state, **kwargs) -> list[float]:
        self.calls[trainer_state.global_step] = {"prompts": prompts, "completions": completions,
                                                 "completion_ids": completion_ids}
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain text or chat messages
        return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"  # the tiny tokenizer has none


def train(model_dir, run_dir, tmp_path, steps=STEPS, *, conversational=False, save_every=None, resume=None,
          **callback_options):
    """`steps` updates of stock GRPOTrainer with the callback; returns (trainer, callback, the user's reward).
    conversational: prompts as chat messages (rendered by a chat template); save_every: TRL checkpoints every
    that many steps; resume: a TRL checkpoint to resume from."""
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRL currently supports vLLM versions.*")
        from trl import GRPOConfig, GRPOTrainer

    from echolab import CollapseCallback

    problems = generate_problems(8, seed=3, split="train")
    prompts = [prompt_text(p) for p in problems]
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": text}] for text in prompts] if conversational else prompts,
        "answer": [p.answer for p in problems], "prompt_id": [p.id for p in problems]})
    # bf16=False: TRL's default bf16 autocasts the model's forward, and the test recomputes log-probs in float32.
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, max_steps=steps, learning_rate=1e-3,
                      per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
                      max_completion_length=24, logging_steps=1, report_to=["tensorboard"], bf16=False,
                      disable_tqdm=True, seed=0,  # TensorBoard writes under output_dir/runs/
                      save_strategy="steps" if save_every else "no", save_steps=save_every or 500)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_dir)
    if conversational:
        tokenizer.chat_template = CHAT_TEMPLATE
    collapse = CollapseCallback(run_dir, **callback_options)
    reward = DigitReward()
    trainer = GRPOTrainer(model=load_model(model_dir), processing_class=tokenizer, args=args,
                          train_dataset=dataset, reward_funcs=[reward, collapse.reward_func], callbacks=[collapse])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, collapse, reward


def recomputed_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Sum of log p(completion token | everything before), one sequence, no batching."""
    ids = torch.tensor([prompt_ids + list(completion_ids)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    return logprobs[len(prompt_ids) - 1:].gather(-1, ids[0, len(prompt_ids):, None]).sum().item()


@pytest.fixture(scope="module")
def trained(tiny_moe_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trl-callback")
    return (*train(tiny_moe_dir, tmp_path / "run", tmp_path), tmp_path)


def event_scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for root, _, files in os.walk(directory):
        if any(name.startswith("events.out.tfevents") for name in files):
            accumulator = EventAccumulator(root)
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                scalars.setdefault(tag, {}).update({event.step: event.value for event in accumulator.Scalars(tag)})
    return scalars


def test_records_every_step_in_the_rollout_schema(trained, tiny_moe_dir):
    trainer, collapse, reward, tmp_path = trained
    run = tmp_path / "run"
    files = rollout_files(run)
    assert [f.name for f in files] == [f"step_{s:06d}.parquet" for s in range(STEPS)]
    rows = pq.read_table(files[0]).to_pylist()
    assert len(rows) == PROMPTS * GENERATIONS
    assert sorted(r["sample_index"] for r in rows) == sorted(list(range(GENERATIONS)) * PROMPTS)
    assert {r["format"] for r in rows} <= set(collapse.names)
    assert all(r["answer"] is not None and r["reward"] is None for r in rows)
    top_k = load_model(tiny_moe_dir).config.num_experts_per_tok
    for row in rows:
        # every completion token is routed to top_k experts in each of the 2 layers
        assert [sum(layer) for layer in row["expert_load"]] == [row["num_tokens"] * top_k] * 2
    # Step 0 was sampled from the model before any update: its logprobs are the base model's, recomputed here
    # from the token ids TRL handed the user's reward function.
    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    seen = reward.calls[0]
    assert [r["completion"] for r in rows] == seen["completions"]
    assert len(seen["prompts"]) == len(seen["completion_ids"]) == len(rows)
    for row, prompt, completion in zip(rows[:3], seen["prompts"][:3], seen["completion_ids"][:3], strict=True):
        assert row["num_tokens"] == len(completion)
        expected = recomputed_logprob(model, tokenizer(text=[prompt])["input_ids"][0], completion)
        assert row["logprob"] == pytest.approx(expected, abs=1e-3)
    assert all(math.isfinite(r["logprob"]) and r["logprob"] < 0 for r in rows)


def test_metrics_reach_the_trainers_logger_and_match_the_analysis(trained):
    trainer, collapse, _, tmp_path = trained
    run = tmp_path / "run"
    assert echolab(["analyze", str(run), "--quiet"]) == 0
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["steps"] == list(range(STEPS))
    logged = event_scalars(tmp_path / "trl")
    for step in range(STEPS):
        # TRL logs a generation's metrics with the update it led to, at global_step = step + 1
        for name in collapse.names:
            assert logged[f"train/format_share/{name}"][step + 1] == pytest.approx(summary["format_share"][str(step)][name], abs=1e-6)
        assert logged["train/diversity/format_entropy"][step + 1] == pytest.approx(summary["format_entropy"][str(step)], abs=1e-6)
        assert logged["train/expert_entropy/layer_1"][step + 1] == pytest.approx(summary["expert_entropy"]["1"][str(step)], abs=1e-6)
        assert logged["train/pass_at_k/4"][step + 1] == pytest.approx(summary["pass_at_k"][str(step)]["4"], abs=1e-6)
    lines = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(STEPS))
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert lines[0]["format_share/other"] == pytest.approx(summary["format_share"]["0"]["other"], abs=1e-6)


def test_echolab_report_reads_the_run(trained):
    *_, tmp_path = trained
    out = tmp_path / "report.html"
    assert echolab(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "echolab report" in text and "Format shares over RL steps" in text


def test_stop_at_collapse_ends_training_after_the_collapse_step(tiny_moe_dir, tmp_path):
    # With K formats (other included) the largest share is always >= 1/K, so a threshold of 1/K is reached
    # at step 0: the training stops after its first update.
    from specialists.formats import FORMAT_SETS

    threshold = 1 / (len(FORMAT_SETS["synthetic"]) + 1)
    trainer, collapse, _ = train(tiny_moe_dir, tmp_path / "run", tmp_path, steps=3, collapse_threshold=threshold,
                              stop_at_collapse=True)
    assert collapse.watch.collapse_step == 0
    assert trainer.state.global_step == 1
    assert [f.name for f in rollout_files(tmp_path / "run")] == ["step_000000.parquet"]


def test_a_second_fresh_training_into_the_same_run_directory_is_refused(trained, tiny_moe_dir, tmp_path):
    *_, first = trained
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_moe_dir, first / "run", tmp_path, steps=1)



def test_conversational_prompts_are_rendered_with_the_chat_template(tiny_moe_dir, tmp_path):
    _, collapse, reward = train(tiny_moe_dir, tmp_path / "run", tmp_path, steps=1, conversational=True)
    rows = pq.read_table(rollout_files(tmp_path / "run")[0]).to_pylist()
    seen = reward.calls[0]
    assert [r["completion"] for r in rows] == [messages[-1]["content"] for messages in seen["completions"]]
    assert rows[0]["prompt"] == seen["prompts"][0][0]["content"]
    model, tokenizer = load_model(tiny_moe_dir), load_tokenizer(tiny_moe_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt_ids = tokenizer.apply_chat_template(conversation=[seen["prompts"][0]], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"][0]
    assert rows[0]["logprob"] == pytest.approx(recomputed_logprob(model, prompt_ids, seen["completion_ids"][0]), abs=1e-3)


def test_resuming_from_a_checkpoint_redoes_its_steps_once(tiny_moe_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_moe_dir, run, tmp_path, steps=2, save_every=1)  # TRL checkpoints after steps 1 and 2
    _, collapse, _ = train(tiny_moe_dir, run, tmp_path, steps=2, save_every=1, resume=tmp_path / "trl" / "checkpoint-1")
    assert [f.name for f in rollout_files(run)] == ["step_000000.parquet", "step_000001.parquet"]
    lines = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]  # step 1's first record was dropped, its redo kept
    assert collapse.watch.steps_seen == [0, 1]  # step 0 restored from disk, step 1 observed
