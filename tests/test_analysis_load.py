"""Reading rollouts: normalised columns from JSONL, Parquet files and run directories."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.load import read_run_config
from analysis.sources import read_rollouts
from specialists.run_directory import is_run_dir
from specialists.errors import UserError
from specialists.formats import parse_answer

RECORDS = [
    {"step": 0, "prompt_id": 7, "completion": "a", "answer": "1,234", "correct": True, "expert_load": [[1, 2]]},
    {"step": 0, "prompt_id": 7, "completion": "b", "answer": 5, "correct": None, "expert_load": None},
    {"step": 1, "prompt_id": 8, "completion": "c", "answer": None, "correct": False, "expert_load": [[0, 3]]},
]


def check(table: pd.DataFrame) -> None:
    assert table["step"].dtype == np.int64 and table["step"].tolist() == [0, 0, 1]
    assert table["prompt_id"].tolist() == ["7", "7", "8"]
    assert table["completion"].tolist() == ["a", "b", "c"]
    assert [None if a is None else parse_answer(a) for a in table["answer"]] == [1234.0, 5.0, None]  # gold as text
    assert all(a is None or isinstance(a, str) for a in table["answer"])
    assert table["correct"].tolist()[0] == 1.0 and np.isnan(table["correct"].iloc[1]) and table["correct"].iloc[2] == 0.0
    assert table["format"].isna().all()
    assert table["expert_load"].notna().tolist() == [True, False, True]


def test_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")  # a trailing blank line is fine
    check(read_rollouts(path))


def test_parquet_file_and_run_directory(tmp_path):
    frame = pd.DataFrame(RECORDS).assign(answer=[1234.0, 5.0, None])
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "r.parquet")
    check(read_rollouts(tmp_path / "r.parquet"))
    run = tmp_path / "run"
    (run / "rollouts").mkdir(parents=True)
    for step, part in frame.groupby("step"):  # step 1's `correct` holds no nulls: schemas differ per file
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), run / "rollouts" / f"step_{step:06d}.parquet")
    (run / "config.toml").write_text('formats = "echo-chamber"\nseed = 3\n')
    assert is_run_dir(run) and not is_run_dir(tmp_path)
    check(read_rollouts(run))
    assert read_run_config(run) == {"formats": "echo-chamber", "seed": 3}


def test_unreadable_config_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(UserError, match="unreadable config"):
        read_run_config(tmp_path)
    assert read_run_config(tmp_path / "elsewhere") == {}


def test_null_in_a_required_column(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"step": 0, "prompt_id": 1, "completion": "x"}\n{"step": 0, "prompt_id": null, "completion": "y"}\n')
    with pytest.raises(UserError, match=r"r\.jsonl line 2: required column 'prompt_id' is missing or null"):
        read_rollouts(path)
