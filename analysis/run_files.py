"""The run directory's files besides the rollouts, as the report reads them: the per-step training metrics
(`metrics.jsonl`) and the size of the model a checkpoint holds.

Both are optional: a run from another trainer (TRL's completion logs, a verl dump, a rollout file) has neither,
and an echolab run written by the TRL callback has metrics but no checkpoints.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path

import pandas as pd
from safetensors import safe_open

from analysis.load import InputWarning
from specialists.errors import UserError
from specialists.run_directory import CHECKPOINTS_DIR, METRICS_FILE, read_metrics


def read_training_metrics(run_dir: Path) -> pd.DataFrame | None:
    """metrics.jsonl as a table: rows steps (int index, ascending), one float column per key whose values are all
    numbers or null (null -> NaN; booleans such as `update` become 1.0 / 0.0; text keys are left out). A step
    logged twice (a resumed run that re-did it) keeps its last line; a cut last line (a run killed mid-write) is
    skipped with an InputWarning. None when the run has no metrics.jsonl or it holds no lines."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    records, cut_line = read_metrics(run_dir)
    if cut_line is not None:
        warnings.warn(f"{path} line {cut_line}: skipped a cut last line (the file is still being written?)",
                      InputWarning)
    if not records:
        return None
    lines = pd.DataFrame(records)
    if "step" not in lines.columns or lines["step"].isna().any():
        raise UserError(f"{path}: every metrics line needs a `step`")
    numeric = [column for column in lines.columns
               if column != "step" and lines[column].map(_number_or_null).all()]
    table = lines[numeric].astype("float64")
    table.index = lines["step"].astype(int).to_numpy()
    return table[~table.index.duplicated(keep="last")].sort_index()


def _number_or_null(value: object) -> bool:
    return value is None or isinstance(value, numbers.Real)  # NaN (pandas' missing key) is a Real too


def checkpoint_model_size(run_dir: Path) -> dict | None:
    """The model of the run's first checkpoint: {"parameters": stored tensors' element count (tied weights stored
    once, so counted once), "layers", "experts", "experts_per_token" (None for dense), "model_type"}. Read from
    the checkpoint's config.json and the safetensors headers, no weights loaded. None without a checkpoint."""
    checkpoints = sorted((Path(run_dir) / CHECKPOINTS_DIR).glob("step_*"))
    for checkpoint in checkpoints:
        weights = sorted(checkpoint.glob("*.safetensors"))
        config_path = checkpoint / "config.json"
        if not weights or not config_path.is_file():
            continue
        config = json.loads(config_path.read_text(encoding="utf-8"))
        parameters = 0
        for file in weights:
            with safe_open(str(file), framework="numpy") as tensors:
                for name in tensors.keys():
                    shape = tensors.get_slice(name).get_shape()
                    parameters += math.prod(shape)  # () for a scalar: 1
        experts = config.get("num_experts") or config.get("num_local_experts")  # Qwen3-MoE / OLMoE, Mixtral
        return {"parameters": parameters, "layers": config.get("num_hidden_layers"), "experts": experts,
                "experts_per_token": config.get("num_experts_per_tok") if experts else None,
                "model_type": config.get("model_type")}
    return None
