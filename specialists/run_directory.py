"""The run directory and the rollout record: the contract between the RL recorder, analysis and users' scripts.

Defined once, here, below both `rl` (which writes run directories) and `analysis` (which reads them and
never imports `rl`). `docs/run-directory.md` documents it for people; keep the two in step.

Layout of a run directory:

    config.json                       the resolved experiment config
    rollouts/step_000000.parquet      one row per sampled completion (ROLLOUT_SCHEMA), one file per step
    metrics.jsonl                     one JSON line per step (METRICS, ALGORITHM_METRICS), read by read_metrics
    checkpoints/step_000010/          HF checkpoint (model + tokenizer) and trainer_state.pt
    heldout/step_000000.parquet       held-out evaluation of the model of a step (ROLLOUT_SCHEMA), rl.evaluation
    summary.json, metrics.parquet     written by `echolab analyze`
    report.html                       written by `echolab report`
    base_divergence.parquet           per-token KL to the base and entropy on a sample, cached by `echolab report`

Step s's rollouts come from the model after s updates; step 0 is the model before any update, and the
last step, s = rl.steps, samples the final model without updating it (`update` false in its metrics line).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from specialists.errors import UserError
from specialists.files import json_object

CONFIG_FILE = "config.json"
ROLLOUTS_DIR = "rollouts"
HELDOUT_DIR = "heldout"  # rl.evaluation's samples of held-out problems, one file per evaluated step
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
METRICS_TABLE_FILE = "metrics.parquet"
REPORT_FILE = "report.html"
BASE_DIVERGENCE_FILE = "base_divergence.parquet"  # analysis.base_divergence: the report's cache of model forwards

# The rollout record (one row per sampled completion). A rollout file from another trainer needs only
# REQUIRED_COLUMNS; echolab's recorder writes every column of ROLLOUT_SCHEMA.
REQUIRED_COLUMNS = ("step", "prompt_id", "completion")
ROLLOUT_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("epoch", pa.float64()),  # passes over the RL prompt set completed before this step's batch
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),  # position of the completion among its prompt's samples at this step
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("answer", pa.string()),  # gold final answer as text: "42", "\\frac{1}{2}" (specialists.grading.answer_text)
    ("reward", pa.float64()),
    ("correct", pa.bool_()),
    ("format", pa.string()),  # the format the completion fits, or "other"
    ("reason", pa.string()),  # why it was graded so: correct, wrong, no_answer, timeout, forbidden, error
    ("num_tokens", pa.int32()),
    ("logprob", pa.float64()),  # sum over the completion's tokens, model that sampled, raw distribution (no temperature)
    ("expert_load", pa.list_(pa.list_(pa.int32()))),  # [layer][expert] routed-token counts; null for dense models
])
OPTIONAL_COLUMNS = tuple(name for name in ROLLOUT_SCHEMA.names if name not in REQUIRED_COLUMNS)


# The metrics vocabulary: every metrics.jsonl line holds every key of METRICS (null where the algorithm, or a
# step without an update, has no such quantity), plus the keys of its algorithm in ALGORITHM_METRICS. The same
# name means the same quantity in PPO, GRPO and Expert Iteration. Means over a step's updates unless said.
METRICS = {
    "step": "the RL step; its rollouts come from the model after `step` updates",
    "epoch": "passes over the RL prompt set completed before this step's batch",
    "update": "whether the model was updated with this step's rollouts (false for the last step, the final model)",
    "reward_mean": "mean reward of the step's completions",
    "reward_std": "population standard deviation of the step's rewards",
    "accuracy": "share of the step's completions graded correct",
    "frac_reward_zero_std": "share of prompts whose samples all got the same reward (no GRPO signal)",
    "truncated_fraction": "share of completions cut at max_new_tokens",
    "rollout_tokens": "completion tokens sampled in the step",
    "sampling_rounds": "engine calls that made the step's batch: 1, more with grpo.dynamic_sampling",
    "loss": "the minimised total loss",
    "policy_loss": "the policy-gradient term alone (PPO, GRPO)",
    "kl_to_reference": "mean token k3 KL of the sampling policy to the pretrained model, on the step's rollouts",
    "entropy": "mean token entropy of the sampling distribution (logits / temperature) on the step's rollouts",
    "clip_fraction": "share of completion tokens whose gradient the PPO clip removed",
    "approx_kl": "mean token k3 KL from pi_old to the updated policy over the updates: how far they moved",
    "grad_norm": "gradient norm before clipping",
    "aux_loss": "the router load-balancing loss, unweighted (MoE with a coefficient > 0)",
    "replay_loss": "the pretraining-replay NLL, unweighted (pretrain_replay_coef > 0)",
    "updates": "optimiser steps taken with the step's rollouts",
    "sampler_kl": "mean token k3 KL from the sampler to the trainer on the sampled tokens: the train/inference mismatch",
    "sampler_ratio_max": "largest trainer/sampler probability ratio of a sampled token (before any TIS cap)",
    "tis_capped_fraction": "share of completion tokens whose TIS weight hit the cap (rl.tis_cap; PPO, GRPO)",
    "clip_cov_fraction": "share of completion tokens Clip-Cov detached (mitigations.clip_cov; PPO, GRPO)",
    "kl_cov_penalty": "KL-Cov's penalty term, aggregated like the policy loss (mitigations.kl_cov; PPO, GRPO)",
    "prefix_kl": "k3 KL to the reference on the first prefix_kl_tokens completion tokens, aggregated like the policy loss, unweighted (mitigations.prefix_kl_coef; PPO, GRPO)",
    "sequence_kl": "mean over the step's completions of sum_t (log pi_old - log pi_ref), the sequence KL subtracted from their rewards x sequence_kl_coef (PPO, GRPO)",
    "format_kl": "KL(p || q) of the step's format shares p to the step-0 batch's q, both add-1/2 smoothed: what format_kl_coef penalises (PPO, GRPO)",
    "outcome_ucb_bonus": "mean over the step's completions of the historical exploration bonus 1/sqrt(N(prompt, answer)), unweighted (outcome_exploration_coef; PPO, GRPO)",
    "outcome_batch_penalty": "mean over the step's completions of the batch exploration penalty, the share of the group's other samples with the same answer, unweighted (outcome_exploration_coef; PPO, GRPO)",
    "sample_time_s": "seconds the engine took to sample the step",
    "score_time_s": "seconds grading and rewarding took",
    "update_time_s": "seconds of the recipe's work: forwards, backward, optimiser steps",
    "sync_time_s": "seconds pushing the updated weights into the engine",
    "step_time_s": "seconds from the start of sampling to the metrics line",
    "rollout_tokens_per_s": "rollout_tokens / sample_time_s",
}
ALGORITHM_METRICS = {
    "ppo": {
        "value_loss": "the clipped value loss of the value head",
        "explained_variance": "1 - Var[R - V] / Var[R] of the value head before the updates",
    },
    "grpo": {},
    "ei": {
        "sampled": "completions sampled",
        "kept": "completions graded correct",
        "kept_unique": "correct completions left after deduplication per prompt: the fine-tuning data",
    },
}


def step_name(step: int) -> str:
    """step_000042: the name of a step's rollout file (plus .parquet) and of a checkpoint directory."""
    return f"step_{step:06d}"


def step_of(path: Path) -> int:
    """The step a rollout file or checkpoint directory is named after (step_000042.parquet -> 42)."""
    return int(Path(path).name.split(".")[0].removeprefix("step_"))


def rollout_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / ROLLOUTS_DIR / f"{step_name(step)}.parquet"


def rollout_files(run_dir: Path) -> list[Path]:
    """The run directory's per-step rollout files in step order."""
    return sorted((Path(run_dir) / ROLLOUTS_DIR).glob("step_*.parquet"), key=step_of)


def heldout_file(run_dir: Path, step: int) -> Path:
    """The held-out evaluation of the model of `step` (the model after `step` updates), in ROLLOUT_SCHEMA."""
    return Path(run_dir) / HELDOUT_DIR / f"{step_name(step)}.parquet"


def heldout_files(run_dir: Path) -> list[Path]:
    """The run directory's held-out evaluation files in step order (none when rl.evaluation is off)."""
    return sorted((Path(run_dir) / HELDOUT_DIR).glob("step_*.parquet"), key=step_of)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The checkpoint holding the model after `step` updates."""
    return Path(run_dir) / CHECKPOINTS_DIR / step_name(step)


def is_run_dir(path: Path) -> bool:
    """A run directory is a directory with at least one rollout file."""
    return Path(path).is_dir() and bool(rollout_files(path))


class MetricsLines(NamedTuple):
    """metrics.jsonl's complete lines, and the number of a cut last line that was skipped (None: there was none)."""

    lines: list[dict]
    cut_line: int | None


def read_metrics(run_dir: Path) -> MetricsLines:
    """The lines of a run directory's metrics.jsonl as dicts, in file order (no lines when there is no file).

    Every line is written whole with its newline (rl.recorder.Recorder.write_metrics), so a last line without one
    was cut by a kill or a full disk mid-write: it is skipped, and its number returned (a resume redoes that step;
    analysis warns). Blank lines are skipped; any other line that is not a JSON object is a UserError naming it."""
    path = Path(run_dir) / METRICS_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    *complete, cut = text.split("\n")  # what follows the last newline: "" unless a write was cut
    lines = []
    for number, line in enumerate(complete, start=1):
        if (record := json_object(line, f"{path} line {number}", "a JSON object (one step's metrics)")) is not None:
            lines.append(record)
    return MetricsLines(lines, len(complete) + 1 if cut.strip() else None)
