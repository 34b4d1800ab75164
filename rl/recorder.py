"""Writes a run directory (layout and rollout schema: specialists.run_directory): every rollout, the held-out
evaluations (rl.evaluation), per-step metrics and checkpoints. Step 0 is the model before any update.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from specialists.files import replace_atomically
from specialists.run_directory import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    HELDOUT_DIR,
    METRICS_FILE,
    ROLLOUT_SCHEMA,
    ROLLOUTS_DIR,
    checkpoint_dir,
    heldout_file,
    read_metrics,
    rollout_file,
    step_of,
)


@dataclass
class Rollout:
    """One row of ROLLOUT_SCHEMA."""

    step: int
    epoch: float
    prompt_id: str
    sample_index: int
    prompt: str
    completion: str
    answer: str | None
    reward: float | None  # None: not known to the recorder (experiments.trl_callback)
    correct: bool
    format: str
    reason: str
    num_tokens: int
    logprob: float | None  # None: not scored
    expert_load: list[list[int]] | None = None


class Recorder:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        for sub in (ROLLOUTS_DIR, CHECKPOINTS_DIR):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)

    def write_config(self, resolved: dict) -> None:
        _write_text_atomically(self.run_dir / CONFIG_FILE, json.dumps(resolved, indent=2, sort_keys=True) + "\n")

    def write_rollouts(self, step: int, rollouts: list[Rollout]) -> None:
        _write_table_atomically(rollout_file(self.run_dir, step), rollouts)

    def write_heldout(self, step: int, rollouts: list[Rollout]) -> None:
        """The held-out evaluation of the model of `step` (rl.evaluation); the folder appears with the first one."""
        (self.run_dir / HELDOUT_DIR).mkdir(exist_ok=True)
        _write_table_atomically(heldout_file(self.run_dir, step), rollouts)

    def write_metrics(self, step: int, metrics: dict) -> None:
        # One write of one whole line: a kill or a full disk can at worst leave a cut last line, which
        # `metrics_lines` (and so a resume) drops.
        with (self.run_dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    def metrics_lines(self) -> list[dict]:
        """The complete lines of metrics.jsonl (a cut last line, left by a kill mid-write, is skipped)."""
        return read_metrics(self.run_dir).lines

    def checkpoint_dir(self, step: int) -> Path:
        return checkpoint_dir(self.run_dir, step)

    def save_checkpoint(self, step: int, model, tokenizer, trainer_state: dict) -> Path:
        """HF checkpoint plus `trainer_state.pt` (optimiser etc.), written to a temp dir and renamed."""
        import torch

        def write(partial: Path) -> None:
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            torch.save(trainer_state, partial / "trainer_state.pt")

        final = self.checkpoint_dir(step)
        shutil.rmtree(final, ignore_errors=True)
        replace_atomically({final: write})
        return final

    def last_checkpoint(self) -> tuple[int, Path] | None:
        done = sorted((p for p in (self.run_dir / CHECKPOINTS_DIR).glob("step_*") if not p.name.endswith(".tmp")),
                      key=step_of)
        if not done:
            return None
        return step_of(done[-1]), done[-1]

    def forget_from(self, step: int) -> None:
        """Forget what was recorded at `step` and later: resuming from the checkpoint taken after `step` updates
        redoes those steps."""
        for folder in (ROLLOUTS_DIR, HELDOUT_DIR):
            for path in (self.run_dir / folder).glob("step_*"):  # partial files (.tmp) of a killed write too
                if step_of(path) >= step:
                    path.unlink()
        path = self.run_dir / METRICS_FILE
        if path.exists():
            kept = [line for line in self.metrics_lines() if line["step"] < step]
            _write_text_atomically(path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in kept))


def _write_table_atomically(path: Path, rollouts: list[Rollout]) -> None:
    table = pa.Table.from_pylist([asdict(r) for r in rollouts], schema=ROLLOUT_SCHEMA)
    # atomic: a killed run never leaves half a step behind
    replace_atomically({path: lambda partial: pq.write_table(table, partial)})


def _write_text_atomically(path: Path, text: str) -> None:
    replace_atomically({path: lambda partial: partial.write_text(text)})
