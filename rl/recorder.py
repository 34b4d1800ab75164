"""Writes a run directory: every rollout, per-step metrics, router statistics and checkpoints.

Layout (../shared/SPEC.md):
    config.json                 the resolved config
    rollouts/step_000000.parquet  one row per sampled completion, one file per step (append-only by step)
    metrics.jsonl               one line per step
    router/step_000000.json     expert statistics of the step (routed-token counts per layer and expert)
    checkpoints/step_000010/    HF checkpoints (model + tokenizer), every `checkpoint_every` steps
Step 0 is the model before any update.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from specialists.files import replace_atomically

ROLLOUT_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("epoch", pa.float64()),
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("answer", pa.float64()),
    ("reward", pa.float64()),
    ("correct", pa.bool_()),
    ("format", pa.string()),
    ("reason", pa.string()),
    ("num_tokens", pa.int32()),
    ("logprob", pa.float64()),
    ("expert_load", pa.list_(pa.list_(pa.int32()))),  # [layer][expert] routed-token counts; null for dense models
])


@dataclass
class Rollout:
    step: int
    epoch: float
    prompt_id: str
    sample_index: int
    prompt: str
    completion: str
    answer: float | None
    reward: float
    correct: bool
    format: str
    reason: str
    num_tokens: int
    logprob: float
    expert_load: list[list[int]] | None = None


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


class Recorder:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        for sub in ("rollouts", "router", "checkpoints"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)

    def write_config(self, resolved: dict) -> None:
        _write_text_atomically(self.run_dir / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")

    def write_rollouts(self, step: int, rollouts: list[Rollout]) -> None:
        table = pa.Table.from_pylist([asdict(r) for r in rollouts], schema=ROLLOUT_SCHEMA)
        # atomic: a killed run never leaves half a step behind
        replace_atomically({self.run_dir / "rollouts" / f"{_step_name(step)}.parquet":
                            lambda path: pq.write_table(table, path)})

    def write_metrics(self, step: int, metrics: dict) -> None:
        # One write of one whole line: a kill or a full disk can at worst leave a cut last line, which
        # `metrics_lines` (and so a resume) drops.
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    def metrics_lines(self) -> list[dict]:
        """The complete lines of metrics.jsonl (a cut last line, left by a kill mid-write, is skipped)."""
        path = self.run_dir / "metrics.jsonl"
        text = path.read_text() if path.exists() else ""
        complete = text.split("\n")[:-1]  # every line ends with "\n"; what follows the last one was cut
        return [json.loads(line) for line in complete]

    def write_router(self, step: int, rollouts: list[Rollout]) -> None:
        """Routed-token counts of the step, in total and per format (sums of the rollouts' expert_load)."""
        loads = [(r.format, r.expert_load) for r in rollouts if r.expert_load is not None]
        if not loads:
            return
        def total(rows):
            return [[sum(layer) for layer in zip(*per_layer)] for per_layer in zip(*rows)]
        by_format = {}
        for name in sorted({name for name, _ in loads}):
            by_format[name] = total([load for fmt, load in loads if fmt == name])
        record = {"step": step, "expert_load": total([load for _, load in loads]), "expert_load_by_format": by_format}
        _write_text_atomically(self.run_dir / "router" / f"{_step_name(step)}.json", json.dumps(record) + "\n")

    def checkpoint_dir(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / _step_name(step)

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
        done = sorted(p for p in (self.run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
        if not done:
            return None
        return int(done[-1].name.split("_")[1]), done[-1]

    def forget_from(self, step: int) -> None:
        """Forget what was recorded at `step` and later: resuming from the checkpoint taken after `step` updates
        redoes those steps."""
        for sub in ("rollouts", "router"):
            for path in (self.run_dir / sub).glob("step_*"):
                if int(path.name.split("_")[1].split(".")[0]) >= step:
                    path.unlink()
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in self.metrics_lines() if line["step"] < step]
            _write_text_atomically(path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in kept))


def _write_text_atomically(path: Path, text: str) -> None:
    replace_atomically({path: lambda partial: partial.write_text(text)})
