"""Where rollouts come from, and how each source's files become rollout records, read step by step.

Sources (detected from the path, `--source` to override):

- `echolab`: a run directory (`rollouts/step_NNNNNN.parquet`) or a rollout file (JSONL / Parquet) in the record
  format of docs/run-directory.md.
- `verl`: a rollout dump directory (`trainer.rollout_data_dir`), or one of its files. verl's
  `RayPPOTrainer._dump_generations` writes `{global_step}.jsonl` (steps from 1), one JSON object per sample with
  `input` (the prompt decoded with `skip_special_tokens=True`: chat role words such as "user" / "assistant"
  stay in the text), `output` (the decoded response), `score` (the summed token-level reward), `step`,
  `gts` (the ground truth, in versions that write it) and the reward function's extra keys (e.g. `acc`).
- `trl`: a `GRPOTrainer` output directory written with `log_completions=True`, its `completions/` folder, or one
  of its files. TRL writes `completions/completions_{global_step:05d}.parquet` at each logging step (steps from 1)
  with `step`, `prompt`, `completion` (text, or lists of chat messages `{role, content}` for conversational
  data), one column per reward function (null where it gave None), the columns of `log_extra`, and `advantage`.
  It holds the latest generation batch: with `steps_per_generation` > 1, consecutive files can repeat one
  batch, which is counted once, at its first step.
- `table`: any JSONL, Parquet or CSV table (or a directory of them), with `--columns` naming which of its
  columns hold the record's fields (`completion=response,step=global_step,...`).

Mapping: `prompt_id` is a stable hash of the prompt text where the source has none (a chat prompt's text is
its messages as "role: content" lines), `sample_index` the order within (step, prompt); `answer` comes from
`gts` (verl) or an `answer` column. `--correct-from COLUMN` names a column whose value > 0 means correct, for
rows without a gold answer. Steps keep the source's numbering.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv

from analysis.load import (Chunk, InputWarning, StepsOutOfOrder, first_columns, jsonl_chunks, normalise,
                           parquet_chunks, parquet_columns, sorted_steps, steps)
from specialists.errors import UserError
from specialists.run_directory import ROLLOUT_SCHEMA, is_run_dir, rollout_files

SOURCES = ("echolab", "verl", "trl", "table")
RECORD_FIELDS = tuple(ROLLOUT_SCHEMA.names)
ROLLOUT_SUFFIXES = (".jsonl", ".parquet")
TABLE_SUFFIXES = (".jsonl", ".parquet", ".csv")
VERL_STEP_FILE = re.compile(r"(\d+)\.jsonl")
TRL_FOLDER = "completions"
TRL_STEP_FILE = re.compile(r"completions_(\d+)\.parquet")
VERL_KEYS = {"input": "prompt", "output": "completion", "score": "reward", "gts": "answer"}  # theirs -> ours


@dataclass(frozen=True)
class ReadOptions:
    """How to read an input: what the user said on the command line."""

    source: str | None = None  # one of SOURCES; None: detect
    columns: dict[str, str] | None = None  # record field -> the table's column (source `table`)
    correct_from: str | None = None  # a column whose value > 0 means correct, for rows without a gold answer

    def __post_init__(self) -> None:
        if self.source is not None and self.source not in SOURCES:
            raise UserError(f"unknown source {self.source!r}; allowed: {', '.join(SOURCES)}")
        if self.columns is not None:
            if self.source not in (None, "table"):
                raise UserError(f"--columns maps a table's columns: it goes with --source table, not {self.source}")
            unknown = sorted(set(self.columns) - set(RECORD_FIELDS))
            if unknown:
                raise UserError(f"--columns: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                                f"(fields: {', '.join(RECORD_FIELDS)})")
            missing = [name for name in ("step", "completion") if name not in self.columns]
            if missing or not {"prompt_id", "prompt"} & set(self.columns):
                raise UserError("--columns must name the table's step, completion and prompt (or prompt_id) "
                                f"columns, e.g. completion=response,prompt=query,step=global_step")

    def described(self) -> dict:
        return {"source": self.source, "columns": self.columns, "correct_from": self.correct_from}


def parse_columns(text: str) -> dict[str, str]:
    """'completion=response,step=global_step' -> {'completion': 'response', 'step': 'global_step'}."""
    mapping = {}
    for item in text.split(","):
        name, equals, column = (part.strip() for part in item.partition("="))
        if not equals or not name or not column:
            raise UserError(f"--columns: expected FIELD=COLUMN pairs separated by commas, got {item.strip()!r}")
        if name in mapping:
            raise UserError(f"--columns: field {name!r} is named twice")
        mapping[name] = column
    return mapping


@dataclass(frozen=True)
class Input:
    """A resolved input: its source and its files in step order."""

    path: Path
    source: str
    files: tuple[Path, ...]
    options: ReadOptions = field(default_factory=ReadOptions)

    @property
    def name(self) -> str:
        """What reports call it: the directory or file stem (a TRL `completions/` folder: its output directory)."""
        if self.path.is_dir() and self.path.name == TRL_FOLDER and self.source == "trl":
            return self.path.resolve().parent.name
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def run_dir(self) -> Path | None:
        """The echolab run directory, when the input is one."""
        return self.path if self.source == "echolab" and self.path.is_dir() else None

    def default_out_dir(self) -> Path:
        """A run directory itself; anything else `<name>_analysis/` beside it (never inside another trainer's dir)."""
        return self.run_dir or self.path.with_name(f"{self.path.stem if self.path.is_file() else self.path.name}_analysis")


def open_input(path: str | Path, options: ReadOptions | None = None) -> Input:
    """Detect the source and list the files; check up front that the columns the reading needs exist."""
    options = options or ReadOptions()
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    source = options.source or ("table" if options.columns is not None else _detect(path))
    files = {"echolab": _echolab_files, "verl": _verl_files, "trl": _trl_files, "table": _table_files}[source](path)
    opened = Input(path, source, tuple(files), options)
    _check_columns(opened)
    return opened


def _detect(path: Path) -> str:
    if path.is_dir():
        if is_run_dir(path):
            return "echolab"
        if _trl_folder(path) is not None:
            return "trl"
        if _numbered(path, VERL_STEP_FILE):
            return "verl"
        raise UserError(f"{path}: not a run directory (no rollouts/*.parquet files), verl rollout dump "
                        f"(N.jsonl files) or TRL output (completions/completions_NNNNN.parquet files)")
    if path.suffix not in ROLLOUT_SUFFIXES:
        raise UserError(f"{path}: rollout files must end in {' or '.join(ROLLOUT_SUFFIXES)} "
                        f"(a CSV or other table: --columns)")
    keys = set(first_columns(path) or ())
    if {"input", "output"} <= keys and "completion" not in keys:
        return "verl"
    if {"prompt", "completion", "advantage"} <= keys and "prompt_id" not in keys:
        return "trl"
    return "echolab"


def _numbered(folder: Path, pattern: re.Pattern) -> list[Path]:
    """The folder's files whose names fully match `pattern`, ordered by the number it captures."""
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if path.is_file() and (match := pattern.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def _trl_folder(path: Path) -> Path | None:
    for folder in (path / TRL_FOLDER, path):
        if folder.is_dir() and _numbered(folder, TRL_STEP_FILE):
            return folder
    return None


def _echolab_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = rollout_files(path)
        if not files:
            raise UserError(f"{path}: not a run directory (no rollouts/*.parquet files)")
        return files
    if path.suffix not in ROLLOUT_SUFFIXES:
        raise UserError(f"{path}: rollout files must end in {' or '.join(ROLLOUT_SUFFIXES)}")
    return [path]


def _verl_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".jsonl":
            raise UserError(f"{path}: verl rollout dumps are .jsonl files")
        return [path]
    files = _numbered(path, VERL_STEP_FILE)
    if not files:
        raise UserError(f"{path}: not a verl rollout dump (no N.jsonl step files)")
    return files


def _trl_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".parquet":
            raise UserError(f"{path}: TRL completion logs are .parquet files")
        return [path]
    folder = _trl_folder(path)
    if folder is None:
        raise UserError(f"{path}: not a TRL output directory (no {TRL_FOLDER}/completions_NNNNN.parquet files; "
                        f"was it trained with log_completions=True?)")
    return _numbered(folder, TRL_STEP_FILE)


def _table_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise UserError(f"{path}: tables must end in {', '.join(TABLE_SUFFIXES)}")
        return [path]
    files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix in TABLE_SUFFIXES),
                   key=lambda p: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", p.name)])
    if not files:
        raise UserError(f"{path}: no {', '.join(TABLE_SUFFIXES)} files")
    return files


def _needed_columns(opened: Input) -> list[str]:
    """The source columns the first file must have."""
    if opened.source == "verl":
        needed = ["input", "output", "step"]
    elif opened.source == "trl":
        needed = ["step", "prompt", "completion"]
    elif opened.source == "table":
        needed = list(opened.options.columns.values())
    else:
        needed = []  # the record's required columns are checked with each chunk, naming the row
    return needed + ([opened.options.correct_from] if opened.options.correct_from else [])


def _check_columns(opened: Input) -> None:
    first = opened.files[0]
    needed = _needed_columns(opened)
    if not needed:
        return
    columns = _table_columns(first) if opened.source == "table" else first_columns(first)
    if columns is None:
        raise UserError(f"{first}: empty (no rollout rows)")
    missing = [name for name in needed if name not in columns]
    if missing:
        echolab = opened.source == "echolab"
        raise UserError(f"{first}: missing {'required ' if echolab else ''}column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(repr, missing))} for source {opened.source} (columns: {', '.join(map(str, columns))})"
                        + ("; another trainer's table: --columns" if echolab else ""))


def _table_columns(path: Path) -> list[str] | None:
    if path.suffix == ".csv":
        return _read_csv(path).column_names
    return first_columns(path)


def _read_csv(path: Path):
    try:
        return pacsv.read_csv(path)
    except Exception as error:  # pyarrow raises ArrowInvalid with the line in its message
        raise UserError(f"{path}: not a readable CSV file ({' '.join(str(error).split())})") from None


# ---------------------------------------------------------------- reading, step by step

def read_steps(opened: Input, in_memory: bool = False) -> Iterator[pd.DataFrame]:
    """The input's normalised rows (analysis.load), one table per step. Streaming keeps one step in memory and
    needs each step's rows together (load.StepsOutOfOrder otherwise); `in_memory` reads everything and sorts."""
    tables = (normalise(chunk, opened.options.correct_from) for chunk in _chunks(opened))
    regrouped = sorted_steps(tables) if in_memory else steps(tables)
    for table in regrouped:
        yield _with_sample_index(table)


def read_rollouts(path: str | Path, options: ReadOptions | None = None) -> pd.DataFrame:
    """The whole input as one normalised table (for small inputs and tests; `analyze` streams `read_steps`)."""
    tables = list(read_steps(open_input(path, options), in_memory=True))
    return pd.concat(tables, ignore_index=True)


def first_and_last_steps(opened: Input) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The normalised rows of the input's first and of its last step (the same table twice for one step). From a
    directory of per-step files only the first and the last two files are read (two: TRL may have logged the last
    generation batch twice, which counts at its first step); a single file is streamed, keeping those two steps
    (read whole and sorted when its steps interleave)."""
    if opened.path.is_dir() and opened.source in ("echolab", "verl", "trl") and len(opened.files) > 3:
        opened = dataclasses.replace(opened, files=(opened.files[0], *opened.files[-2:]))
    try:
        return _first_and_last(read_steps(opened))
    except StepsOutOfOrder:
        return _first_and_last(read_steps(opened, in_memory=True))


def _first_and_last(tables: Iterator[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    first = last = next(tables)
    for last in tables:
        pass
    return first, last


def _chunks(opened: Input) -> Iterator[Chunk]:
    """Raw chunks renamed to the record's fields."""
    last = opened.files[-1]
    per_step_files = opened.path.is_dir() and opened.source in ("echolab", "verl", "trl")
    schema = {"keys": None, "where": None}
    previous_batch = None
    for path in opened.files:
        count = 0
        for chunk in _file_chunks(path, opened.source, path == last, schema):
            if opened.source == "trl":
                batch = _batch_fingerprint(chunk.records)
                if batch == previous_batch:  # TRL logged the same generation batch again
                    warnings.warn(f"{path}: repeats the previous file's completions (one generation batch logged at "
                                  f"several steps); counted once", InputWarning)
                    count = -1
                    break
                previous_batch = batch
            count += len(chunk.records)
            yield Chunk(_as_records(chunk, opened), chunk.row_name, path)
        if count == 0:
            raise UserError(f"{path}: empty {'step file ' if per_step_files else ''}(no rollout rows)")


def _file_chunks(path: Path, source: str, newest: bool, schema: dict) -> Iterator[Chunk]:
    if path.suffix == ".csv":
        table = _read_csv(path)
        yield Chunk(table.to_pandas(), lambda row: f"{path} line {row + 2}", path)  # line 1 is the header
    elif path.suffix == ".parquet":
        if source == "trl":
            columns = frozenset(parquet_columns(path))
            if schema["keys"] is None:
                schema["keys"], schema["where"] = columns, path
            elif columns != schema["keys"]:
                missing, extra = sorted(schema["keys"] - columns), sorted(columns - schema["keys"])
                raise UserError(f"{path}: mixed schemas: its columns differ from {schema['where']}'s"
                                + (f" (missing {', '.join(missing)})" if missing else "")
                                + (f" (extra {', '.join(extra)})" if extra else ""))
        yield from parquet_chunks(path)
    else:
        yield from jsonl_chunks(path, may_be_cut=newest, same_keys_as=schema if source == "verl" else None)


def _batch_fingerprint(records: pd.DataFrame) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for value in records["completion"]:
        digest.update(_text(value).encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _as_records(chunk: Chunk, opened: Input) -> pd.DataFrame:
    """The source's columns renamed to record fields, and `prompt_id` hashed from the prompt where the source has
    none; other columns stay (for --correct-from)."""
    raw, correct_from = chunk.records, opened.options.correct_from
    if opened.source == "verl":
        ours = {theirs: mine for theirs, mine in VERL_KEYS.items() if theirs in raw.columns}
        records = raw.drop(columns=[c for c in ours.values() if c in raw.columns and c not in ours]).rename(columns=ours)
    elif opened.source == "trl":
        records = raw.assign(prompt=[_text(value) for value in raw["prompt"]],
                             completion=[_text(value) for value in raw["completion"]])
    elif opened.source == "table":
        records = pd.DataFrame({name: raw[column].to_numpy() for name, column in opened.options.columns.items()},
                               index=raw.index)
    else:
        return raw
    if correct_from is not None and correct_from not in records.columns and correct_from in raw.columns:
        records[correct_from] = raw[correct_from].to_numpy()  # a renamed key, e.g. verl's `score`
    if "prompt_id" not in records.columns:
        prompts = records["prompt"]
        nulls = prompts.isna().to_numpy()
        if nulls.any():
            raise UserError(f"{chunk.row_name(int(np.argmax(nulls)))}: the prompt is missing or null")
        codes, texts = pd.factorize(prompts)
        records["prompt_id"] = np.asarray([prompt_id(str(text)) for text in texts], dtype=object)[codes]
    return records


def _text(value: object) -> object:
    """A prompt or completion as text: chat messages [{role, content}] become "role: content" lines (one assistant
    message: just its content); content given as blocks [{type: text, text}] is joined. Text stays as it is."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list):
        return value
    messages = [message for message in value if isinstance(message, dict)]
    if len(messages) == 1 and messages[0].get("role") == "assistant":
        return _content(messages[0].get("content"))
    return "\n".join(f"{message.get('role')}: {_content(message.get('content'))}" for message in messages)


def _content(content: object) -> str:
    if isinstance(content, np.ndarray):
        content = content.tolist()
    if isinstance(content, list):
        return "".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return "" if content is None else str(content)


def prompt_id(text: str) -> str:
    """A stable id of a prompt: the first 16 hex digits of its BLAKE2b hash (the same in every process)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _with_sample_index(table: pd.DataFrame) -> pd.DataFrame:
    if "sample_index" not in table.columns:
        table["sample_index"] = table.groupby("prompt_id", sort=False).cumcount().astype(np.float64)
    return table
