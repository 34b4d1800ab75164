"""Reading rollouts: a run directory's `rollouts/*.parquet`, or one JSONL / Parquet file from any trainer.

The record is SPEC.md's rollout record: `step`, `prompt_id` and `completion` are required; `epoch`,
`prompt`, `answer` (gold), `reward`, `correct`, `format`, `sample_index`, `num_tokens`, `logprob` and
`expert_load` are optional. `read_rollouts` returns one normalised table:

- `step` int64, `prompt_id` str, `completion` str;
- `answer` float (the gold answer parsed as a number, NaN when absent or unreadable);
- `correct` float (1.0 / 0.0, NaN when not given: the analysis judges those rows);
- `format` str or None (None: to be classified);
- `epoch`, `reward`, `logprob`, `num_tokens`, `sample_index` float when present;
- `expert_load` as read (one list over layers of lists over experts per row, or None).

Rows keep the order they were read in (a run directory's files in name order).
"""

from __future__ import annotations

import json
import numbers
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from specialists.errors import UserError
from specialists.formats import parse_answer

REQUIRED_COLUMNS = ("step", "prompt_id", "completion")
NUMERIC_COLUMNS = ("epoch", "reward", "logprob", "num_tokens", "sample_index")
ROLLOUT_SUFFIXES = (".jsonl", ".parquet")
CONFIG_FILES = ("config.json", "config.toml")


def rollout_files(run_dir: Path) -> list[Path]:
    """The run directory's per-step Parquet files, in name order (step_000000.parquet, ...)."""
    return sorted((Path(run_dir) / "rollouts").glob("*.parquet"))


def is_run_dir(path: Path) -> bool:
    """A run directory is a directory with at least one `rollouts/*.parquet` file."""
    return Path(path).is_dir() and bool(rollout_files(path))


def read_run_config(run_dir: Path) -> dict:
    """The run's resolved config (`config.json` or `config.toml`), or {} when the run has none."""
    for name in CONFIG_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            try:
                return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
            except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
                raise UserError(f"{path}: unreadable config ({error})") from None
    return {}


def read_rollouts(path: str | Path) -> pd.DataFrame:
    """Read and validate rollouts from a run directory or a .jsonl / .parquet file (see module doc)."""
    path = Path(path)
    if path.is_dir():
        files = rollout_files(path)
        if not files:
            raise UserError(f"{path}: not a run directory (no rollouts/*.parquet files)")
        table = pa.concat_tables([_read_parquet(file) for file in files], promote_options="permissive")
        raw, source = _arrow_to_frame(table), f"{path}/rollouts"
    elif not path.exists():
        raise UserError(f"{path}: no such file or directory")
    elif path.suffix == ".jsonl":
        raw, source = _read_jsonl(path), str(path)
    elif path.suffix == ".parquet":
        raw, source = _arrow_to_frame(_read_parquet(path)), str(path)
    else:
        raise UserError(f"{path}: rollout files must end in {' or '.join(ROLLOUT_SUFFIXES)}")
    if raw.empty:
        raise UserError(f"{source}: no rollout rows")
    return _normalise(raw, source)


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error})") from None


def _arrow_to_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow table -> DataFrame; `expert_load` stays Arrow-backed (nested lists are slow as Python objects)."""
    if "expert_load" not in table.column_names:
        return table.to_pandas()
    frame = table.drop_columns(["expert_load"]).to_pandas()
    frame["expert_load"] = pd.arrays.ArrowExtensionArray(table.column("expert_load"))
    return frame


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_number}: malformed JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return pd.DataFrame.from_records(records)


def _normalise(raw: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [column for column in REQUIRED_COLUMNS if column not in raw.columns]
    if missing:
        raise UserError(f"{source}: missing required column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
    table = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    table["step"] = _integers(raw["step"], "step", source)
    table["prompt_id"] = _no_nulls(raw["prompt_id"], "prompt_id", source).astype(str).astype(object)
    table["completion"] = _strings(raw["completion"], "completion", source)
    table["answer"] = _gold_answers(raw["answer"]) if "answer" in raw.columns else np.nan
    table["correct"] = _booleans(raw["correct"], source) if "correct" in raw.columns else np.nan
    table["format"] = _optional_strings(raw["format"], "format", source) if "format" in raw.columns else None
    for column in NUMERIC_COLUMNS:
        if column in raw.columns:
            table[column] = _numbers(raw[column], column, source)
    if "expert_load" in raw.columns:
        table["expert_load"] = _expert_loads(raw["expert_load"], source)
    return table


def _first_bad_row(mask: pd.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0]) + 1


def _no_nulls(values: pd.Series, column: str, source: str) -> pd.Series:
    nulls = values.isna()
    if nulls.any():
        raise UserError(f"{source}: column {column!r} is empty in record {_first_bad_row(nulls)}")
    return values


def _integers(values: pd.Series, column: str, source: str) -> pd.Series:
    values = _no_nulls(values, column, source)
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.astype(np.int64)
    numbers_ = pd.to_numeric(values, errors="coerce")
    bad = numbers_.isna() | (numbers_ != np.round(numbers_)) | values.map(lambda v: isinstance(v, bool))
    if bad.any():
        raise UserError(f"{source}: column {column!r} must hold integers (record {_first_bad_row(bad)})")
    return numbers_.astype(np.int64)


def _numbers(values: pd.Series, column: str, source: str) -> pd.Series:
    numbers_ = pd.to_numeric(values, errors="coerce")
    bad = numbers_.isna() & values.notna()
    if bad.any():
        raise UserError(f"{source}: column {column!r} must hold numbers (record {_first_bad_row(bad)})")
    return numbers_.astype(np.float64)


def _strings(values: pd.Series, column: str, source: str) -> pd.Series:
    return _optional_strings(_no_nulls(values, column, source), column, source)


def _optional_strings(values: pd.Series, column: str, source: str) -> pd.Series:
    """Strings as a Python-object column, None where missing; UserError naming the first non-string."""
    if pd.api.types.infer_dtype(values, skipna=True) not in ("string", "empty"):
        bad = values.notna() & ~values.map(lambda v: isinstance(v, str)).astype(bool)
        raise UserError(f"{source}: column {column!r} must hold strings (record {_first_bad_row(bad)})")
    return pd.Series(values.to_numpy(dtype=object, na_value=None), index=values.index, dtype=object)


def _booleans(values: pd.Series, source: str) -> pd.Series:
    """True / False (or 1 / 0) -> 1.0 / 0.0; missing -> NaN."""
    def convert(value: object) -> float:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return np.nan
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Number) and value in (0, 1)):
            return float(value)
        raise ValueError(value)

    try:
        return values.map(convert).astype(np.float64)
    except ValueError as error:
        raise UserError(f"{source}: column 'correct' must hold true/false, got {error.args[0]!r}") from None


def _expert_loads(values: pd.Series, source: str) -> pd.Series:
    """Per-row nested lists (layers of experts' token counts) as an Arrow-backed column; None where absent."""
    if isinstance(values.dtype, pd.ArrowDtype):
        return values
    try:
        nested = pa.array(values.tolist())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise UserError(f"{source}: column 'expert_load' must hold lists of lists of token counts ({error})") from None
    return pd.Series(pd.arrays.ArrowExtensionArray(nested), index=values.index)


def _gold_answers(values: pd.Series) -> pd.Series:
    """Gold answers as numbers: 5 -> 5.0, '1,234' -> 1234.0; missing or unreadable -> NaN."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        return values.astype(np.float64)

    def convert(value: object) -> float:
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            return float(value)
        parsed = parse_answer(value) if isinstance(value, str) else None
        return np.nan if parsed is None else parsed

    return values.map(convert).astype(np.float64)
