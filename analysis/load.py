"""Reading rollout records: JSONL and Parquet files in chunks, normalised to one table shape, regrouped by step.

The record is the run directory's rollout record (`specialists.run_directory`, docs/run-directory.md): `step`,
`prompt_id` and `completion` are required; `epoch`, `prompt`, `answer` (gold), `reward`, `correct`, `format`,
`sample_index`, `num_tokens`, `logprob` and `expert_load` are optional. `normalise` turns a chunk of raw records
into one table:

- `step` int64, `prompt_id` str, `completion` str;
- `answer` str or None (the gold answer as text: a number "1234" or LaTeX "\\frac{1}{2}"; None when absent);
- `correct` float (1.0 / 0.0, NaN when not given: the analysis judges those rows);
- `correct_from` float (1.0 where the `--correct-from` column is > 0, 0.0 where not, NaN where missing), only
  when such a column is named;
- `format` str or None (None: to be classified);
- `epoch`, `reward`, `logprob`, `num_tokens`, `sample_index` float when present;
- `expert_load` Arrow-backed list<list<float64>> (one list over layers of lists over experts per row, the
  same shape in every row; None where absent).

Every error names the file and the line (JSONL) or row (Parquet) and the column at fault. `steps` regroups a
stream of chunks into one table per step, so that analysis memory is bounded by one step's rows.
"""

from __future__ import annotations

import io
import json
import numbers
import tomllib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from specialists.config import MixtureSettings, ModelSettings, expert_specialists
from specialists.errors import UserError
from specialists.files import json_object
from specialists.grading import answer_text
from specialists.run_directory import CONFIG_FILE, REQUIRED_COLUMNS, ROLLOUT_SCHEMA

NUMERIC_COLUMNS = ("epoch", "reward", "logprob", "num_tokens", "sample_index")
CONFIG_FILES = (CONFIG_FILE, "config.toml")  # echolab's, or a TOML config a user put beside their rollouts
EXPERT_LOAD_TYPE = pa.list_(pa.list_(pa.float64()))
JSONL_BLOCK_BYTES = 16 * 2**20  # a big JSONL file is read in blocks of whole lines of this size
PARQUET_CHUNK_ROWS = 65536

RowName = Callable[[int], str]  # 0-based row of a chunk -> where it came from, for messages


class InputWarning(UserWarning):
    """Something in the input was skipped (a cut last line) or read another way; the CLI prints it on one line."""


class StepsOutOfOrder(Exception):
    """A step's rows came back after another step's: the input must be read whole and sorted (see `steps`)."""


@dataclass(frozen=True)
class Chunk:
    """Raw records as read, and where each row came from."""

    records: pd.DataFrame
    row_name: RowName
    path: Path


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


def read_expert_specialists(config: dict) -> list[str] | None:
    """The format of the specialist each expert came from, when the run's experts are specialists trained apart:
    the config's top-level `expert_specialists` list (as a BTX checkpoint's config.json holds it; put it in a
    config.toml beside rollouts from elsewhere), else, for an echolab config with `model.kind = "btx"`, the
    BTX convention `specialists.config.expert_specialists` over its mixture's formats (alphabetical) and
    `model.num_experts`; None when the config names no specialists."""
    named = config.get("expert_specialists")
    if named is not None:
        if not isinstance(named, list) or not named or not all(isinstance(name, str) for name in named):
            raise UserError(f"the run config's expert_specialists must be a non-empty list of format names, got {named!r}")
        return named
    model, mixture = config.get("model"), config.get("mixture")
    if not isinstance(model, dict) or model.get("kind") != "btx":
        return None
    formats = list(mixture.get("formats") or {}) if isinstance(mixture, dict) else []
    formats = formats or list(MixtureSettings().formats)
    return expert_specialists(formats, int(model.get("num_experts", ModelSettings().num_experts)))


# ---------------------------------------------------------------- files in chunks

def parquet_chunks(path: Path, rows: int = PARQUET_CHUNK_ROWS) -> Iterator[Chunk]:
    """A Parquet file in chunks of up to `rows` rows (`expert_load` stays Arrow-backed: nested lists are slow as
    Python objects)."""
    try:
        reader = pq.ParquetFile(path)
        first = 0
        for batch in reader.iter_batches(batch_size=rows):
            yield Chunk(_arrow_to_frame(pa.Table.from_batches([batch])), _rows_of(path, first), path)
            first += batch.num_rows
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error})") from None


def parquet_columns(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error})") from None


def _rows_of(path: Path, first: int) -> RowName:
    return lambda row: f"{path} row {first + row + 1}"


def _arrow_to_frame(table: pa.Table) -> pd.DataFrame:
    if "expert_load" not in table.column_names:
        return table.to_pandas()
    frame = table.drop_columns(["expert_load"]).to_pandas()
    frame["expert_load"] = pd.arrays.ArrowExtensionArray(table.column("expert_load"))
    return frame


def jsonl_chunks(path: Path, may_be_cut: bool = False, same_keys_as: dict | None = None,
                 block_bytes: int = JSONL_BLOCK_BYTES) -> Iterator[Chunk]:
    """A JSONL file in chunks of whole lines, one chunk per block of about `block_bytes` (blank lines skipped).

    may_be_cut: the file may still be being written (the newest step file of a running trainer): a last line
        without its newline that is not valid JSON is skipped with an InputWarning instead of refused.
    same_keys_as: {"keys": frozenset, "where": str}: every record must have exactly these keys (a dump whose
        records all share one schema); filled from the first record when "keys" is None.

    A block is parsed by Arrow's JSON reader (C++, no Python object per record but the values) when it gives
    exactly the records `json.loads` would: one per line, flat values (text, numbers, booleans), and with
    `same_keys_as` every key in every record. Any other block (a bad line, a blank line, nested values, a record
    with other keys, a record longer than `JSONL_BLOCK_BYTES`) is read line by line, which names the first bad
    line.
    """
    with path.open("rb") as handle:
        first_line = 1
        for block in _line_blocks(handle, block_bytes):
            lines = block.count(b"\n") + (not block.endswith(b"\n"))
            records = _arrow_records(block, lines, same_keys_as, first_record=f"{path} line {first_line}")
            if records is not None:
                yield Chunk(records, lambda row, first=first_line: f"{path} line {first + row}", path)
            else:
                chunk = _python_records(path, block, first_line, may_be_cut, same_keys_as)
                if chunk is not None:
                    yield chunk
            first_line += lines


def _line_blocks(handle, block_bytes: int) -> Iterator[bytes]:
    """The file in blocks of whole lines of at least `block_bytes` (the last may lack its newline)."""
    rest = b""
    while data := handle.read(block_bytes):
        data = rest + data
        end = data.rfind(b"\n") + 1
        rest = data[end:]
        if end:
            yield data[:end]
    if rest:
        yield rest


def _arrow_records(block: bytes, lines: int, same_keys_as: dict | None, first_record: str) -> pd.DataFrame | None:
    """The block's records as `pd.DataFrame(list of json.loads(line))` gives them, read by Arrow; None when Arrow
    might read them otherwise (see `jsonl_chunks`): then the caller reads the block line by line."""
    if block.startswith(b"\xef\xbb\xbf"):  # a byte-order mark: Arrow skips it, json.loads refuses it
        return None
    try:
        # one thread: the analysis' other processes (sandbox workers) keep the other cores busy
        table = pajson.read_json(io.BytesIO(block), read_options=pajson.ReadOptions(use_threads=False,
                                                                                    block_size=JSONL_BLOCK_BYTES))
        table.validate(full=True)  # text that is not UTF-8: Arrow reads it, the line-by-line reader names it
    except (pa.ArrowException, UnicodeDecodeError):
        return None
    flat = all(pa.types.is_string(t) or pa.types.is_int64(t) or pa.types.is_float64(t) or pa.types.is_boolean(t)
               for t in table.schema.types)  # not timestamps, which Arrow infers from some strings
    if table.num_rows != lines or not flat:  # Arrow skips blank lines
        return None
    if same_keys_as is not None:
        keys = frozenset(table.column_names)
        if table.num_rows and any(column.null_count for column in table.columns):  # a record without a key?
            return None
        if same_keys_as["keys"] is None:
            same_keys_as["keys"], same_keys_as["where"] = keys, first_record
        elif keys != same_keys_as["keys"]:
            return None
    return table.to_pandas()


def _python_records(path: Path, block: bytes, first_line: int, may_be_cut: bool,
                    same_keys_as: dict | None) -> Chunk | None:
    """The block's records read line by line with `json.loads`; UserError naming the first bad line."""
    records: list[dict] = []
    line_numbers: list[int] = []
    for line_number, line in enumerate(io.BytesIO(block), start=first_line):
        where = f"{path} line {line_number}"
        try:
            record = json_object(line, where, "a JSON object (one rollout)")
        except UserError:
            if may_be_cut and not line.endswith(b"\n"):  # the file's last line: a block ends with a newline
                warnings.warn(f"{where}: skipped a cut last line (the file is still being written?)", InputWarning)
                break
            raise
        if record is None:
            continue
        if same_keys_as is not None:
            _check_keys(record, where, same_keys_as)
        records.append(record)
        line_numbers.append(line_number)
    if not records:
        return None
    # pd.DataFrame, not from_records: from_records drops rows when no record has a key
    return Chunk(pd.DataFrame(records), lambda row: f"{path} line {line_numbers[row]}", path)


def _check_keys(record: dict, where: str, schema: dict) -> None:
    if schema["keys"] is None:
        schema["keys"], schema["where"] = frozenset(record), where
    elif record.keys() != schema["keys"]:
        missing, extra = sorted(schema["keys"] - record.keys()), sorted(record.keys() - schema["keys"])
        raise UserError(f"{where}: mixed schemas: its keys differ from {schema['where']}'s"
                        + (f" (missing {', '.join(missing)})" if missing else "")
                        + (f" (extra {', '.join(extra)})" if extra else ""))


def first_columns(path: Path) -> list[str] | None:
    """The columns of a JSONL file's first record or of a Parquet file (None for a JSONL file without records), to
    tell sources apart and check column names before any work."""
    if path.suffix == ".parquet":
        return parquet_columns(path)
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                chunk = _python_records(path, line, line_number, may_be_cut=not handle.peek(1), same_keys_as=None)
                return None if chunk is None else [str(column) for column in chunk.records.columns]
    return None


# ---------------------------------------------------------------- normalising records

def normalise(chunk: Chunk, correct_from: str | None = None) -> pd.DataFrame:
    """The chunk's records as the analysis table (see the module doc); UserError naming the first bad row."""
    raw, row_name = chunk.records, chunk.row_name
    missing = [column for column in REQUIRED_COLUMNS if column not in raw.columns]
    if missing:
        raise UserError(f"{chunk.path}: missing required column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(repr, missing))} (required: {', '.join(REQUIRED_COLUMNS)})")
    table = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    table["step"] = _integers(raw["step"], "step", row_name)
    table["prompt_id"] = _no_nulls(raw["prompt_id"], "prompt_id", row_name).astype(str).astype(object)
    table["completion"] = _strings(raw["completion"], "completion", row_name)
    table["answer"] = _gold_answers(raw["answer"], row_name) if "answer" in raw.columns else None
    table["correct"] = _booleans(raw["correct"], "correct", row_name) if "correct" in raw.columns else np.nan
    if correct_from is not None:
        if correct_from not in raw.columns:
            raise UserError(f"{chunk.path}: no column {correct_from!r} to take correctness from "
                            f"(columns: {', '.join(map(str, raw.columns))})")
        scores = _numbers(raw[correct_from].map(lambda v: float(v) if isinstance(v, bool) else v), correct_from, row_name)
        table["correct_from"] = np.where(scores.isna(), np.nan, (scores > 0).astype(np.float64))
    table["format"] = _optional_strings(raw["format"], "format", row_name) if "format" in raw.columns else None
    for column in NUMERIC_COLUMNS:
        if column in raw.columns:
            table[column] = _numbers(raw[column], column, row_name)
    if "expert_load" in raw.columns:
        table["expert_load"] = pd.Series(pd.arrays.ArrowExtensionArray(expert_loads(raw["expert_load"], row_name)))
    return table


def rollout_frame(records: list[dict]) -> pd.DataFrame:
    """Rollout records held in memory (dicts with ROLLOUT_SCHEMA's keys, e.g. one step's rows as a trainer holds
    them) as the analysis table `normalise` makes of the same rows read from a run directory."""
    table = pa.Table.from_pylist(records, schema=ROLLOUT_SCHEMA)
    return normalise(Chunk(_arrow_to_frame(table), lambda row: f"rollout {row + 1}", Path("rollouts")))


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


def _gold_answers(values: pd.Series, row_name: RowName) -> pd.Series:
    """Gold answers as text: 5 -> '5', '1,234' -> '1,234', '\\\\boxed{\\\\frac{1}{2}}' -> '\\\\frac{1}{2}'; missing -> None.
    UserError naming the first row whose gold is neither a number nor text (a list, an object)."""
    numeric = pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype)
    if not numeric and pd.api.types.infer_dtype(values, skipna=True) not in ("string", "empty"):
        valid = values.map(lambda v: v is None or isinstance(v, str)
                           or (isinstance(v, numbers.Number) and not isinstance(v, (bool, np.bool_))))
        _reject_first(~valid.astype(bool), values, row_name, "column 'answer' must hold a number or text")
    codes, distinct = pd.factorize(values.to_numpy(dtype=object))  # a step's samples share their prompts' golds
    texts = np.array([None, *(answer_text(float(v) if numeric else v) for v in distinct)], dtype=object)
    return pd.Series(texts[codes + 1], index=values.index, dtype=object)  # code -1: missing


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


# ---------------------------------------------------------------- one table per step

def steps(tables: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Normalised chunks regrouped into one table per step, in the order steps first appear. A step's rows must
    be contiguous (trainers write them so); StepsOutOfOrder when a step comes back after another one."""
    pending: list[pd.DataFrame] = []
    current, finished = None, set()
    for table in tables:
        values = table["step"].to_numpy()
        starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1]) if len(values) else []
        for start, stop in zip(starts, [*starts[1:], len(values)]):
            step = int(values[start])
            if step != current:
                if pending:
                    yield joined(pending)
                    finished.add(current)
                if step in finished:
                    raise StepsOutOfOrder(step)
                current, pending = step, []
            pending.append(table.iloc[start:stop])
    if pending:
        yield joined(pending)


def sorted_steps(tables: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """All chunks in memory, stably sorted by step, one table per step: for inputs whose steps interleave."""
    whole = joined(list(tables))
    whole = whole.iloc[np.argsort(whole["step"].to_numpy(), kind="stable")]
    for _, table in whole.groupby("step", sort=True):
        yield table.reset_index(drop=True)


def joined(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Normalised tables as one (`expert_load` stays Arrow-backed)."""
    if len(tables) == 1:
        return tables[0].reset_index(drop=True)
    if any("expert_load" in table.columns for table in tables):  # Arrow-backed: concatenate as Arrow
        loads = pa.chunked_array([pa.array(table["expert_load"]) if "expert_load" in table.columns
                                  else pa.nulls(len(table), EXPERT_LOAD_TYPE) for table in tables], EXPERT_LOAD_TYPE)
        whole = pd.concat([table.drop(columns=["expert_load"], errors="ignore") for table in tables], ignore_index=True)
        whole["expert_load"] = pd.arrays.ArrowExtensionArray(loads.combine_chunks())
        return whole
    return pd.concat(tables, ignore_index=True)
