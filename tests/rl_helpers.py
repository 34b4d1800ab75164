"""Helpers shared by the RL test files (PPO, GRPO, Expert Iteration, the vLLM runs, the mitigations, the
weight sync): a stand-in reward, the prompt set of a settings object, reading metrics, the SPEC run-directory
check, and teacher-forced log-probabilities under transformers and under vLLM."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import torch

from specialists.run_directory import ROLLOUT_SCHEMA
from rl.rollouts import PromptSet, load_prompt_problems
from specialists.config import SpecialistsConfig
from specialists.formats import FORMAT_SETS, classify
from specialists.grading import Grade

# Wall-clock measurements: they differ between otherwise identical runs.
TIMING_KEYS = frozenset({"step_time", "step_time_s", "rollout_time_s", "rollout_tokens_per_s"})


class ChecksumRewards:
    """Stand-in for rl.rollouts.Rewards: correct iff crc32(text) % modulus == 0, so a fixed share of the barely
    trained test models' completions is "correct" and the algorithms see a reward signal; formats are
    classified for real."""

    def __init__(self, modulus: int):
        self.modulus = modulus

    def __call__(self, texts, gold, group_size):
        correct = [zlib.crc32(text.encode()) % self.modulus == 0 for text in texts]
        grades = [Grade(classify(text, FORMAT_SETS["synthetic"]), None, ok, "correct" if ok else "wrong")
                  for text, ok in zip(texts, correct)]
        return torch.tensor(correct, dtype=torch.float32), grades


def prompt_set_for(settings, seed: int = 0) -> PromptSet:
    """The RL prompt set the pipeline would build for `settings` (synthetic problems of the default task)."""
    problems = load_prompt_problems(settings, seed, SpecialistsConfig().task)
    return PromptSet(problems, settings.prompts_per_step, seed)


def read_metrics(run_dir: Path, drop=frozenset()) -> list[dict]:
    """metrics.jsonl as dicts, without the keys in `drop` (e.g. TIMING_KEYS)."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def rollout_rows(run_dir: Path, step: int) -> list[dict]:
    return pq.read_table(Path(run_dir) / "rollouts" / f"step_{step:06d}.parquet").to_pylist()


def check_run_directory(run_dir: Path, model_config, *, steps: int, rows_per_step: int, checkpoints: list[int],
                        algorithm: str) -> list[dict]:
    """Assert the SPEC run directory of an MoE run of `steps` recorded steps:

    - rollouts/step_000000 .. step_{steps-1}.parquet and no others, each with the recorder's schema and
      `rows_per_step` rows of its own step;
    - every expert_load has shape (layers, experts) and routes each completion token to experts_per_token
      experts in every layer;
    - one metrics line per step, steps 0 .. steps-1 in order;
    - checkpoints exactly at `checkpoints`, each with a trainer_state.pt of its algorithm and step.
    Returns the metrics lines.
    """
    run_dir = Path(run_dir)
    layers, experts, per_token = (model_config.num_hidden_layers, model_config.num_experts,
                                  model_config.num_experts_per_tok)
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir()) == [f"step_{s:06d}.parquet" for s in range(steps)]
    for step in range(steps):
        table = pq.read_table(run_dir / "rollouts" / f"step_{step:06d}.parquet")
        assert table.schema.equals(ROLLOUT_SCHEMA)
        rows = table.to_pylist()
        assert len(rows) == rows_per_step and {r["step"] for r in rows} == {step}
        for row in rows:
            load = torch.tensor(row["expert_load"])
            assert load.shape == (layers, experts)
            assert load.sum(dim=1).tolist() == [row["num_tokens"] * per_token] * layers
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(steps))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{s:06d}" for s in checkpoints]
    for step in checkpoints:
        state = torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt", weights_only=True)
        assert state["algorithm"] == algorithm and state["step"] == step and state["rng"]
    return metrics


def weights_equal(a: dict, b: dict) -> bool:
    """Two state dicts hold the same tensors (a's keys looked up in b)."""
    return all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def hf_token_logprobs(model, sequences: list[list[int]]) -> torch.Tensor:
    """log p(token_t | tokens_<t) of every token after the first, under the transformers model: (sequences, length - 1).
    Sequences of equal length (no padding)."""
    ids = torch.tensor(sequences)
    logprobs = model(input_ids=ids).logits.float().log_softmax(-1)[:, :-1]
    return logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)


def completion_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Sum of the completion tokens' log-probabilities given the prompt, teacher-forced under `model`."""
    return hf_token_logprobs(model, [prompt_ids + completion_ids])[0, len(prompt_ids) - 1:].sum().item()


def vllm_token_logprobs(llm, sequences: list[list[int]]) -> torch.Tensor:
    """The same as `hf_token_logprobs`, served by a vllm.LLM (prompt logprobs of the token ids)."""
    from vllm import SamplingParams

    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)
    return torch.tensor([[out.prompt_logprobs[i][s[i]].logprob for i in range(1, len(s))]
                         for s, out in zip(sequences, outputs)])
