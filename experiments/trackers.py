"""Experiment trackers: an echolab run's per-step metrics, live, in TensorBoard (event files in the run
directory, on by default), Weights & Biases and MLflow.

`TrackerObserver` is a step observer of the RL driver (`on_step(step, rollouts, metrics)`, called after
each step is recorded). Per step it logs
- the diversity metrics of the step's rollouts, computed by analysis' own functions (`analysis.live`:
  format_share/NAME, format_accuracy/NAME, diversity/*, accuracy/*, pass_at_k/K, expert_share/layer_L/
  expert_E, expert_entropy/layer_L, expert_max_violation/layer_L, collapse/*), the same values
  `echolab analyze` computes afterwards;
- the algorithm's metrics line: timings (`*_time_s`, `rollout_tokens_per_s`) as time/NAME, everything
  else numeric as train/NAME (train/loss, train/kl_to_reference, train/reward_mean, ...).
It is also a held-out observer (`on_heldout(step, rollouts)`, rl.recipe.HeldoutObserver): with
`[rl.evaluation]` on, each evaluated step's held-out metrics as heldout/pass_at_k/K, heldout/accuracy/mean,
heldout/format_share/NAME and heldout/format_accuracy/NAME (`analysis.live.heldout_metrics`, the values of
summary.json's `heldout` block).

Every tracker writes locally unless told otherwise by its library's own environment variables:
TensorBoard to RUN/tensorboard/; wandb in offline mode to RUN/wandb/ (WANDB_MODE=online sends it to the
server; `wandb sync RUN/wandb/offline-run-*` uploads later); MLflow to the SQLite store RUN/mlflow.db with
artifacts in RUN/mlflow-artifacts/ (MLFLOW_TRACKING_URI points it elsewhere). A resumed run continues the
TensorBoard curves from its first redone step (`purge_step`: TensorBoard drops the earlier events of those
steps); wandb and MLflow get a new run.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from analysis.live import CollapseWatch, heldout_metrics
from analysis.load import rollout_frame

TENSORBOARD_DIR = "tensorboard"
MLFLOW_STORE = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"
TIME_SUFFIXES = ("_time_s", "tokens_per_s")


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars in TensorBoard event files under RUN/tensorboard/ (torch.utils.tensorboard)."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step 0 too: a run killed before its first checkpoint is resumed from step 0
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a live view, and a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run in RUN/wandb/, offline unless WANDB_MODE says otherwise; the resolved config as its config."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        import wandb

        self.run = wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step, commit=True)  # shown now, not when the next step arrives

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """An MLflow run in experiment `project`, stored in RUN/mlflow.db unless MLFLOW_TRACKING_URI names a store."""

    def __init__(self, run_dir: Path, project: str, config: dict):
        import mlflow

        run_dir = Path(run_dir).resolve()
        given = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = mlflow.MlflowClient(given or f"sqlite:///{run_dir / MLFLOW_STORE}")
        experiment = self.client.get_experiment_by_name(project)
        # The local store keeps its artifacts (config.json) in the run directory too, not in ./mlruns.
        artifacts = None if given else (run_dir / MLFLOW_ARTIFACTS).as_uri()
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project, artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=Path(run_dir).name).info.run_id
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(name, value, 0, step) for name, value in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(report_to: list[str], run_dir: Path, project: str, config: dict, start_step: int = 0) -> list[Tracker]:
    """The trackers named in `report_to` (experiments.config.LoggingSettings), writing into `run_dir`."""
    opened = []
    for name in report_to:
        if name == "tensorboard":
            opened.append(TensorBoardTracker(run_dir, start_step))
        elif name == "wandb":
            opened.append(WandbTracker(run_dir, project, config))
        elif name == "mlflow":
            opened.append(MLflowTracker(run_dir, project, config))
        else:
            raise ValueError(f"unknown tracker {name!r}")
    return opened


def algorithm_metrics(line: dict) -> dict[str, float]:
    """A metrics.jsonl line as grouped tracker scalars: time/NAME for timings, train/NAME for the rest; the step,
    flags and values that are not finite numbers are left out."""
    grouped = {}
    for name, value in line.items():
        if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        group = "time" if name.endswith(TIME_SUFFIXES) else "train"
        grouped[f"{group}/{name}"] = float(value)
    return grouped


class TrackerObserver:
    """The driver's step observer that feeds the trackers (module doc). `watch` carries the run's format names,
    collapse threshold and last step; the rollouts it gets are the recorder's rows (dataclasses of
    ROLLOUT_SCHEMA's fields)."""

    def __init__(self, trackers: list[Tracker], watch: CollapseWatch):
        self.trackers, self.watch = trackers, watch

    def on_step(self, step: int, rollouts: list, metrics: dict) -> None:
        values = self.watch.observe(rollout_frame([asdict(row) for row in rollouts])) if rollouts else {}
        values.update(algorithm_metrics(metrics))
        for tracker in self.trackers:
            tracker.log(values, step)

    def on_heldout(self, step: int, rollouts: list) -> None:
        values = heldout_metrics(rollout_frame([asdict(row) for row in rollouts]), self.watch.names)
        for tracker in self.trackers:
            tracker.log(values, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
