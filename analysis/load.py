"""Reading rollouts: a run directory's `rollouts/*.parquet`, or one JSONL / Parquet file from any trainer.

The record is SPEC.md's rollout record: `step`, `prompt_id` and `completion` are required; `epoch`,
`prompt`, `answer` (gold), `reward`, `correct`, `format`, `sample_index`, `num_tokens`, `logprob` and
`expert_load` are optional. `read_rollouts` returns one normalised table:

- `step` int64, `prompt_id` str, `completion` str;
- `answer` float (the gold answer parsed as a number, NaN when absent or unreadable);
- `correct` float (1.0 / 0.0, NaN when not given: the analysis judges those rows);
- `format` str or None (None: to be classified);
- `epoch`, `reward`, `logprob`, `num_tokens`, `sample_index` float when present;
- `expert_load` Arrow-backed list<list<float64>> (one list over layers of lists over experts per row, the
  same shape in every row; None where absent).

Rows keep the order they were read in (a run directory's files in name order).
"""

from __future__ import annotations

import json
import numbers
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from specialists.errors import UserError
from specialists.formats import parse_answer
from specialists.run_directory import CONFIG_FILE, REQUIRED_COLUMNS, ROLLOUT_SCHEMA, rollout_files

NUMERIC_COLUMNS = ("epoch", "reward", "logprob", "num_tokens", "sample_index")
ROLLOUT_SUFFIXES = (".jsonl", ".parquet")
CONFIG_FILES = (CONFIG_FILE, "config.toml")  # echolab's, or a TOML config a user put beside their rollouts
EXPERT_LOAD_TYPE = pa.list_(pa.list_(pa.float64()))

RowName = Callable[[int], str]  # 0-based row of the table read -> where it came from, for messages


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
    """Read and validate rollouts from a run directory or a .jsonl / .parquet file (see module doc).
    Errors name the file, and the line (JSONL) or row (Parquet) and column at fault."""
    path = Path(path)
    if path.is_dir():
        files = rollout_files(path)
        if not files:
            raise UserError(f"{path}: not a run directory (no rollouts/*.parquet files)")
        tables = [_read_parquet(file) for file in files]
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except pa.ArrowException as error:
            raise UserError(f"{path}/rollouts: the files' columns do not fit together ({error})") from None
        raw, source, row_name = _arrow_to_frame(table), f"{path}/rollouts", _parquet_rows(files, tables)
    elif not path.exists():
        raise UserError(f"{path}: no such file or directory")
    elif path.suffix == ".jsonl":
        raw, line_numbers = _read_jsonl(path)
        source, row_name = str(path), lambda row: f"{path} line {line_numbers[row]}"
    elif path.suffix == ".parquet":
        table = _read_parquet(path)
        raw, source, row_name = _arrow_to_frame(table), str(path), _parquet_rows([path], [table])
    else:
        raise UserError(f"{path}: rollout files must end in {' or '.join(ROLLOUT_SUFFIXES)}")
    if not len(raw):
        raise UserError(f"{source}: empty (no rollout rows)")
    return _normalise(raw, source, row_name)


def rollout_frame(records: list[dict]) -> pd.DataFrame:
    """Rollout records held in memory (dicts with ROLLOUT_SCHEMA's keys, e.g. one step's rows before or after a
    trainer writes them) as the table `read_rollouts` returns for the same rows on disk."""
    table = pa.Table.from_pylist(records, schema=ROLLOUT_SCHEMA)
    return _normalise(_arrow_to_frame(table), "rollouts", lambda row: f"rollout {row + 1}")


def _parquet_rows(files: list[Path], tables: list[pa.Table]) -> RowName:
    """Names of the rows of the concatenated `tables`: file and 1-based row within it."""
    ends = np.cumsum([table.num_rows for table in tables])

    def name(row: int) -> str:
        index = int(np.searchsorted(ends, row, side="right"))
        return f"{files[index]} row {row - (ends[index] - tables[index].num_rows) + 1}"

    return name


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


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """The records, and the line number of each (blank lines are skipped)."""
    records, line_numbers = [], []
    with path.open("rb") as handle:  # bytes: a line that is not UTF-8 is named like any other bad line
        for line_number, line in enumerate(handle, start=1):
            where = f"{path} line {line_number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object (one rollout), got {type(record).__name__}")
            records.append(record)
            line_numbers.append(line_number)
    return pd.DataFrame(records), line_numbers  # (not from_records: it drops rows when no record has a key)


def _normalise(raw: pd.DataFrame, source: str, row_name: RowName) -> pd.DataFrame:
    missing = [column for column in REQUIRED_COLUMNS if column not in raw.columns]
    if missing:
        raise UserError(f"{source}: missing required column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(repr, missing))} (required: {', '.join(REQUIRED_COLUMNS)})")
    table = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    table["step"] = _integers(raw["step"], "step", row_name)
    table["prompt_id"] = _no_nulls(raw["prompt_id"], "prompt_id", row_name).astype(str).astype(object)
    table["completion"] = _strings(raw["completion"], "completion", row_name)
    table["answer"] = _gold_answers(raw["answer"]) if "answer" in raw.columns else np.nan
    table["correct"] = _booleans(raw["correct"], "correct", row_name) if "correct" in raw.columns else np.nan
    table["format"] = _optional_strings(raw["format"], "format", row_name) if "format" in raw.columns else None
    for column in NUMERIC_COLUMNS:
        if column in raw.columns:
            table[column] = _numbers(raw[column], column, row_name)
    if "expert_load" in raw.columns:
        table["expert_load"] = pd.Series(pd.arrays.ArrowExtensionArray(expert_loads(raw["expert_load"], row_name)))
    return table


def _shown(value: object) -> str:
    text = repr(value.item() if isinstance(value, np.generic) else value)  # 5, not np.int64(5)
    return text if len(text) <= 40 else text[:37] + "..."


def _reject_first(bad: pd.Series, values: pd.Series, row_name: RowName, problem: str) -> None:
    """UserError naming the first row where `bad` holds, the problem and the value found there."""
    if bad.any():
        row = int(np.argmax(bad.to_numpy(dtype=bool)))
        raise UserError(f"{row_name(row)}: {problem}, got {_shown(values.iloc[row])}")


def _no_nulls(values: pd.Series, column: str, row_name: RowName) -> pd.Series:
    nulls = values.isna().to_numpy()
    if nulls.any():
        raise UserError(f"{row_name(int(np.argmax(nulls)))}: required column {column!r} is missing or null")
    return values


def _integers(values: pd.Series, column: str, row_name: RowName) -> pd.Series:
    values = _no_nulls(values, column, row_name)
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.astype(np.int64)
    numbers_ = pd.to_numeric(values, errors="coerce")
    bad = numbers_.isna() | (numbers_ != np.round(numbers_)) | values.map(lambda v: isinstance(v, bool))
    _reject_first(bad, values, row_name, f"column {column!r} must hold integers")
    return numbers_.astype(np.int64)


def _numbers(values: pd.Series, column: str, row_name: RowName) -> pd.Series:
    numbers_ = pd.to_numeric(values, errors="coerce")
    _reject_first(numbers_.isna() & values.notna(), values, row_name, f"column {column!r} must hold numbers")
    return numbers_.astype(np.float64)


def _strings(values: pd.Series, column: str, row_name: RowName) -> pd.Series:
    return _optional_strings(_no_nulls(values, column, row_name), column, row_name)


def _optional_strings(values: pd.Series, column: str, row_name: RowName) -> pd.Series:
    """Strings as a Python-object column, None where missing; UserError naming the first non-string."""
    if pd.api.types.infer_dtype(values, skipna=True) not in ("string", "empty"):
        bad = values.notna() & ~values.map(lambda v: isinstance(v, str)).astype(bool)
        _reject_first(bad, values, row_name, f"column {column!r} must hold strings")
    return pd.Series(values.to_numpy(dtype=object, na_value=None), index=values.index, dtype=object)


def _booleans(values: pd.Series, column: str, row_name: RowName) -> pd.Series:
    """True / False (or 1 / 0) -> 1.0 / 0.0; missing -> NaN."""
    missing = values.isna()
    valid = values.map(lambda v: isinstance(v, (bool, np.bool_)) or (isinstance(v, numbers.Number) and v in (0, 1)))
    _reject_first(~missing & ~valid.astype(bool), values, row_name, f"column {column!r} must hold true/false")
    return values.map(lambda v: np.nan if pd.isna(v) else float(v)).astype(np.float64)


def expert_loads(values: pd.Series, row_name: RowName = lambda row: f"row {row + 1}") -> pa.ListArray:
    """The `expert_load` values (None where absent) as one list<list<float64>> Arrow array, after checking that
    each is a list over layers of lists over experts of non-negative token counts, the same shape in every row.
    UserError naming the first row that is not."""
    try:
        nested = _expert_load_arrow(values)
    except pa.ArrowException:
        row = next((row for row in range(len(values)) if not _converts_to_expert_load(values.iloc[[row]])), 0)
        raise UserError(f"{row_name(row)}: column 'expert_load' must hold lists (layers) of lists (experts) of "
                        f"token counts, got {_shown(values.iloc[row])}") from None
    present = nested.is_valid().to_numpy(zero_copy_only=False)
    if not present.any():
        return nested
    layers = pc.list_value_length(nested).fill_null(0).to_numpy()
    layer_rows = pc.list_parent_indices(nested).to_numpy()  # the row of each per-layer list
    per_layer = pc.list_flatten(nested)
    experts = pc.list_value_length(per_layer).fill_null(0).to_numpy()
    first = int(np.argmax(present))
    shape = (int(layers[first]), int(experts[layer_rows == first][0]) if layers[first] else 0)
    wrong = present & (layers != shape[0])
    wrong[layer_rows[experts != shape[1]]] = True
    if 0 in shape or wrong.any():
        row = first if 0 in shape else int(np.argmax(wrong))
        raise UserError(f"{row_name(row)}: column 'expert_load' must have the same number of layers and experts "
                        f"in every row, at least one of each (the first row has {shape[0]} layers of {shape[1]} experts)")
    counts = pc.list_flatten(per_layer).to_numpy(zero_copy_only=False)  # NaN where a count is null
    bad = np.isnan(counts) | (counts < 0)
    if bad.any():
        row = int(layer_rows[pc.list_parent_indices(per_layer).to_numpy()[np.argmax(bad)]])
        raise UserError(f"{row_name(row)}: column 'expert_load' must hold non-negative token counts")
    return nested


def _expert_load_arrow(values: pd.Series) -> pa.ListArray:
    arrow = pa.array(values)  # Arrow-backed columns (from Parquet) as they are, Python lists (from JSONL) converted
    arrow = arrow.combine_chunks() if isinstance(arrow, pa.ChunkedArray) else arrow
    return arrow.cast(EXPERT_LOAD_TYPE)


def _converts_to_expert_load(values: pd.Series) -> bool:
    try:
        _expert_load_arrow(values)
    except pa.ArrowException:
        return False
    return True


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
