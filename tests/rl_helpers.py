"""Helpers shared by the RL test files (PPO, GRPO, Expert Iteration, the vLLM runs, the mitigations, the
weight sync): a stand-in reward, the prompt set of a settings object, a Run as the pipeline builds it,
reading metrics, the run-directory check, and teacher-forced log-probabilities under transformers and vLLM."""

from __future__ import annotations

import zlib
from pathlib import Path

import pyarrow.parquet as pq
import torch

from rl.engines import HFEngine
from rl.recipe import Run
from rl.recorder import Recorder
from rl.replay import PretrainReplay
from rl.rollouts import PromptSet, load_prompt_problems
from rl.sequences import pack
from specialists.config import SpecialistsConfig
from specialists.model import load_model
from specialists import run_directory
from specialists.run_directory import METRICS, METRICS_FILE, ROLLOUT_SCHEMA
from specialists.tokenizer import load_tokenizer
from specialists.formats import FORMAT_SETS, classify
from specialists.prompting import Prompter
from specialists.grading import Grade

# Wall-clock measurements: they differ between otherwise identical runs.
TIMING_KEYS = frozenset(key for key in METRICS if key.endswith("_s")) | {"rollout_tokens_per_s"}

# A bfloat16 engine serves the float32 weights rounded to bfloat16 (8 significant bits, relative rounding 2**-9):
# on the tiny test models its per-token log-probabilities differ from the float32 model's by at most ~0.01-0.07,
# from the model before an update (lr 1e-3 RL steps, lr 1e-2 on random tokens) by more than 0.7. BF16_TOLERANCE
# is above the first, BF16_STALE well below the second.
BF16_TOLERANCE = 0.1
BF16_STALE = 0.5


class ChecksumRewards:
    """Stand-in for rl.rollouts.Rewards: correct iff crc32(text) % modulus == 0, so a fixed share of the barely
    trained test models' completions is "correct" and the algorithms see a reward signal; formats are
    classified for real."""

    def __init__(self, modulus: int):
        self.modulus = modulus

    def __call__(self, texts, gold, group_size):
        correct = [zlib.crc32(text.encode()) % self.modulus == 0 for text in texts]
        grades = [Grade(classify(text, FORMAT_SETS["synthetic"]), None, ok, "correct" if ok else "wrong")
                  for text, ok in zip(texts, correct, strict=True)]
        return torch.tensor(correct, dtype=torch.float32), grades


class RecordingEngine:
    """An engine that keeps what each `generate` call returned (prompts, completions with token ids and the
    sampler's log-probs); `close` is left to the wrapped engine's owner."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, sampling, seed, first_index=0):
        groups = self.engine.generate(prompts, sampling, seed, first_index)
        self.calls.append((prompts, groups))
        return groups

    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def close(self) -> None:
        pass


def prompt_set_for(settings, tokenizer, seed: int = 0) -> PromptSet:
    """The RL prompt set the pipeline would build for `settings` (synthetic problems of the default task)."""
    problems = load_prompt_problems(settings, seed, SpecialistsConfig().task)
    return PromptSet(problems, settings.prompts_per_step, seed, Prompter(tokenizer, settings.prompt_template,
                                                                         settings.chat_template))


def make_run(model_dir, run_dir, settings, *, engine=None, rewards=None, seed: int = 0, start_step: int = 0,
             model=None, reference=None, replay_texts: list[str] | None = None) -> Run:
    """A Run as experiments.pipeline builds it, by default with the transformers engine on `model` (loaded from
    `model_dir`) and ChecksumRewards(2); `replay_texts` become the pretraining replay (seeded with `seed`)."""
    model = load_model(model_dir) if model is None else model
    tokenizer = load_tokenizer(model_dir)
    replay = None
    if replay_texts is not None:
        replay = PretrainReplay.from_texts(replay_texts, tokenizer, settings.mitigations.pretrain_replay_batch, seed)
    return Run(settings=settings, model=model, tokenizer=tokenizer,
               engine=HFEngine(model, tokenizer) if engine is None else engine, prompt_set=prompt_set_for(settings, tokenizer, seed),
               rewards=ChecksumRewards(2) if rewards is None else rewards, recorder=Recorder(run_dir), seed=seed,
               start_step=start_step, reference=reference, replay=replay, progress=False)


def read_metrics(run_dir: Path, drop=frozenset()) -> list[dict]:
    """metrics.jsonl of a finished run (every line whole) as dicts, without the keys in `drop` (e.g. TIMING_KEYS)."""
    assert (Path(run_dir) / METRICS_FILE).is_file(), run_dir
    lines, cut_line = run_directory.read_metrics(run_dir)
    assert cut_line is None, f"{run_dir}: metrics.jsonl line {cut_line} is cut"
    return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def rollout_rows(run_dir: Path, step: int) -> list[dict]:
    return pq.read_table(Path(run_dir) / "rollouts" / f"step_{step:06d}.parquet").to_pylist()


def check_run_directory(run_dir: Path, model_config, *, steps: int, rows_per_step: int, checkpoints: list[int],
                        algorithm: str) -> list[dict]:
    """Assert the run directory of an MoE run of `steps` update steps (rl.training.train):

    - rollouts/step_000000 .. step_{steps}.parquet and no others (steps 0 .. steps - 1 with an update, step
      `steps` the final model's), each with the recorder's schema and `rows_per_step` rows of its own step;
    - every expert_load has shape (layers, experts) and routes each completion token to experts_per_token
      experts in every layer;
    - one metrics line per step, steps 0 .. steps in order, each with every key of the metrics vocabulary;
      `update` true but on the last line, whose update statistics are null;
    - checkpoints exactly at `checkpoints`, each with a trainer_state.pt of its algorithm and step.
    Returns the metrics lines.
    """
    run_dir = Path(run_dir)
    layers, experts, per_token = (model_config.num_hidden_layers, model_config.num_experts,
                                  model_config.num_experts_per_tok)
    recorded = list(range(steps + 1))
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir()) == [f"step_{s:06d}.parquet" for s in recorded]
    for step in recorded:
        table = pq.read_table(run_dir / "rollouts" / f"step_{step:06d}.parquet")
        assert table.schema.equals(ROLLOUT_SCHEMA)
        rows = table.to_pylist()
        assert len(rows) == rows_per_step and {r["step"] for r in rows} == {step}
        for row in rows:
            load = torch.tensor(row["expert_load"])
            assert load.shape == (layers, experts)
            assert load.sum(dim=1).tolist() == [row["num_tokens"] * per_token] * layers
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == recorded
    for line in metrics:
        assert METRICS.keys() <= line.keys(), METRICS.keys() - line.keys()
    assert [m["update"] for m in metrics] == [True] * steps + [False]
    assert all(metrics[-1][key] is None for key in ("loss", "policy_loss", "grad_norm", "clip_fraction", "updates"))
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
                         for s, out in zip(sequences, outputs, strict=True)])


def grpo_grad_norm_by_hand(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                           advantages: list[float]) -> float:
    """The gradient norm of a first GRPO pass (loss_type grpo, temperature 1, no KL, entropy or router loss) on
    these completions, by hand: rho = 1 there, so d loss = mean_i (-A_i / |o_i|) sum_t d log pi(y_it). A plain
    right-padded forward of `model` in train mode; leaves its gradients set."""
    input_ids, attention_mask, completion_mask = pack(prompt_ids, completion_ids, pad_id)
    model.train()
    logprobs = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].log_softmax(-1)
    logprobs = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * completion_mask[:, 1:]
    lengths = completion_mask[:, 1:].sum(-1).clamp(min=1)
    (-torch.tensor(advantages) * logprobs.sum(-1) / lengths).mean().backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()


def untimed(metrics: list[dict]) -> list[dict]:
    """metrics.jsonl lines without the wall-clock keys (TIMING_KEYS): what must repeat exactly."""
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in metrics]


class Crash(Exception):
    pass


class CrashAt:
    """An observer that kills the run right after step `step` is recorded."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, step, rollouts, metrics):
        if step == self.step:
            raise Crash
