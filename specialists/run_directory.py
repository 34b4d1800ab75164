"""The run directory and the rollout record: the contract between the RL recorder, analysis and users' scripts.

Defined once, here, below both `rl` (which writes run directories) and `analysis` (which reads them and
never imports `rl`). `docs/run-directory.md` documents it for people; keep the two in step.

Layout of a run directory:

    config.json                       the resolved experiment config
    rollouts/step_000000.parquet      one row per sampled completion (ROLLOUT_SCHEMA), one file per step
    metrics.jsonl                     one JSON line per step
    checkpoints/step_000010/          HF checkpoint (model + tokenizer) and trainer_state.pt
    summary.json, metrics.parquet     written by `echolab analyze`
    report.html                       written by `echolab report`

Step s's rollouts come from the model after s updates; step 0 is the model before any update.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

CONFIG_FILE = "config.json"
ROLLOUTS_DIR = "rollouts"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
METRICS_TABLE_FILE = "metrics.parquet"
REPORT_FILE = "report.html"

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
    ("answer", pa.float64()),  # gold final answer (files from other trainers may hold text: LaTeX, "#### N")
    ("reward", pa.float64()),
    ("correct", pa.bool_()),
    ("format", pa.string()),  # the format the completion fits, or "other"
    ("reason", pa.string()),  # why it was graded so: correct, wrong, no_answer, timeout, forbidden, error
    ("num_tokens", pa.int32()),
    ("logprob", pa.float64()),  # sum over the completion's tokens, sampling distribution before temperature
    ("expert_load", pa.list_(pa.list_(pa.int32()))),  # [layer][expert] routed-token counts; null for dense models
])
OPTIONAL_COLUMNS = tuple(name for name in ROLLOUT_SCHEMA.names if name not in REQUIRED_COLUMNS)


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


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The checkpoint holding the model after `step` updates."""
    return Path(run_dir) / CHECKPOINTS_DIR / step_name(step)


def is_run_dir(path: Path) -> bool:
    """A run directory is a directory with at least one rollout file."""
    return Path(path).is_dir() and bool(rollout_files(path))
