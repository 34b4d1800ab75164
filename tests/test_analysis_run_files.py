"""analysis.run_files: metrics.jsonl as a per-step table, and a checkpoint's model size without loading it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from analysis.load import InputWarning
from analysis.run_files import checkpoint_model_size, read_training_metrics
from model_families import build_checkpoint
from specialists.errors import UserError
from specialists.run_directory import METRICS_FILE, checkpoint_dir


def test_metrics_lines_become_a_float_table_by_step(tmp_path):
    lines = [{"step": 0, "update": True, "loss": -0.03, "grad_norm": 1.3, "note": "text"},
             {"step": 1, "update": True, "loss": 0.01, "grad_norm": None, "note": "text"},
             {"step": 1, "update": True, "loss": 0.02, "grad_norm": 0.5, "note": "text"},  # re-done after a resume
             {"step": 2, "update": False, "loss": None, "grad_norm": None, "note": "text"}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 3, "loss'  # killed mid-write
    (tmp_path / METRICS_FILE).write_text(text, encoding="utf-8")
    with pytest.warns(InputWarning, match="skipped a cut last line"):
        table = read_training_metrics(tmp_path)
    assert table.index.tolist() == [0, 1, 2] and sorted(table.columns) == ["grad_norm", "loss", "update"]
    assert table["loss"].tolist()[:2] == [-0.03, 0.02] and np.isnan(table.loc[2, "loss"])  # the last line of step 1
    assert table["update"].tolist() == [1.0, 1.0, 0.0]


def test_no_metrics_file_or_no_lines_is_none_and_a_line_without_step_is_named(tmp_path):
    assert read_training_metrics(tmp_path) is None
    (tmp_path / METRICS_FILE).write_text("\n", encoding="utf-8")
    assert read_training_metrics(tmp_path) is None
    (tmp_path / METRICS_FILE).write_text('{"loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"metrics\.jsonl: every metrics line needs a `step`"):
        read_training_metrics(tmp_path)


@pytest.mark.parametrize("model_type, experts", [("qwen3", None), ("qwen3_moe", 4), ("mixtral", 4)])
def test_checkpoint_model_size_counts_what_transformers_counts(tmp_path, model_type, experts):
    # qwen3 ties input and output embeddings (stored once, counted once); Mixtral names its experts
    # num_local_experts
    assert checkpoint_model_size(tmp_path) is None
    checkpoint = build_checkpoint(model_type, checkpoint_dir(tmp_path, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parameters = AutoModelForCausalLM.from_pretrained(checkpoint).num_parameters()
    size = checkpoint_model_size(tmp_path)
    assert size == {"parameters": parameters, "layers": 2, "experts": experts,
                    "experts_per_token": 2 if experts else None, "model_type": model_type}
