"""Real prompt sets: problems read from a local JSONL file, Parquet file or `datasets.save_to_disk` directory.

Two columns matter: the question and the answer (`PromptColumns`; GSM8K's names by default). The answer
column may hold
- a GSM8K solution ending in `#### N` (or the bare number N): the gold answer is the number N;
- a MATH solution with a `\\boxed{...}` (the last one; nested braces are matched): the gold answer is the
  boxed text, kept as text ('\\frac{1}{2}', '2\\sqrt{3}') and graded by math-verify
  (`specialists.grading.answers_equal`); a boxed plain number ('\\boxed{72}') is the number 72;
- a bare LaTeX answer, as MATH-500's `answer` column holds them ('\\frac{14}{3}',
  '\\left( 3, \\frac{\\pi}{2} \\right)'): kept as text and graded by math-verify like a boxed one. A bare cell
  is taken for an answer only when it is one line of at most BARE_ANSWER_MAX_CHARS characters, has no run of
  two plain words in a row (prose: a solution without its `####` or `\\boxed{}`), and math-verify reads it.

The held-out split (`prompt_split`) is either a second file read with the same columns, or a seeded
fraction of the first. It never shares a question with the RL prompts: questions are compared after
`normalised_question` (Unicode NFKC, case-folded, whitespace collapsed); duplicates within a file are
dropped (the first kept), and RL prompts whose question is also in the held-out file are dropped with a
warning (the held-out file, usually a benchmark's test split, stays whole).

A `save_to_disk` directory is read with `datasets.load_from_disk`; its column names come from the
directory's `dataset_info.json` (so checking a config does not import `datasets`). A `DatasetDict` (one
directory per split) is refused with the names of its splits: point at one of them.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from specialists.config import Strict
from specialists.errors import UserError
from specialists.files import json_object
from specialists.grading import reads_as_latex
from specialists.tasks import Problem, parse_number

SUPPORTED_KINDS = "a .jsonl file, a .parquet file or a datasets.save_to_disk directory"

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_BOXED = "\\boxed{"
BARE_ANSWER_MAX_CHARS = 200
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_SENTENCE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")  # two plain words in a row: prose, not an answer


class PromptColumns(Strict):
    """Which columns of a prompt file hold the question and the answer (GSM8K's names by default)."""

    question: str = Field("question", description="the problem text")
    answer: str = Field("answer", description="a GSM8K solution ending in '#### N', a bare number, a MATH "
                                               "solution with a \\boxed{} answer, or a bare LaTeX answer (MATH-500)")


@dataclass(frozen=True)
class PromptSplit:
    """RL prompts and held-out problems, disjoint by normalised question; each in file order."""

    train: list[Problem]
    heldout: list[Problem]


def prompt_file_kind(path: str | Path) -> str:
    """'jsonl', 'parquet' or 'dataset' (a save_to_disk directory); a UserError for anything else."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise UserError(f"{path} is a DatasetDict with splits {', '.join(splits)}: point at one split's "
                            f"directory, e.g. {path / (splits[0] if splits else 'train')}")
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return "dataset"
        raise UserError(f"{path} is a directory but not a datasets.save_to_disk directory (no dataset_info.json, "
                        f"state.json); expected {SUPPORTED_KINDS}")
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    raise UserError(f"{path}: unsupported prompt file; expected {SUPPORTED_KINDS}")


def column_names(path: str | Path) -> list[str]:
    """The columns of a prompt file, read cheaply: a Parquet schema, a dataset's features, a JSONL file's
    first record."""
    path = Path(path)
    kind = prompt_file_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(path).names
        except Exception as error:  # pyarrow's ArrowInvalid and friends: not a Parquet file
            raise UserError(f"{path}: not a readable Parquet file ({error})") from None
    if kind == "dataset":
        info = json.loads((path / "dataset_info.json").read_text())
        return list(info.get("features") or {})
    for line_number, record in _jsonl_records(path):
        return list(record)
    raise UserError(f"{path}: no records in file")


def check_columns(path: str | Path, columns: PromptColumns) -> None:
    """A UserError naming the file, the missing column and the columns it has."""
    present = column_names(path)
    for role, name in (("question", columns.question), ("answer", columns.answer)):
        if name not in present:
            raise UserError(f"{path} has no {role} column {name!r} (prompt_columns.{role}); its columns: "
                            f"{', '.join(present)}")


def read_problems(path: str | Path, columns: PromptColumns = PromptColumns()) -> list[Problem]:
    """Every row of the file as a Problem (id `<file stem>-<row>`, row counted from 0), in file order."""
    path = Path(path)
    check_columns(path, columns)
    problems = []
    for row, record in _records(path, columns):
        question, solution = record.get(columns.question), record.get(columns.answer)
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{path}: row {row}: no question text in column {columns.question!r}")
        answer = gold_answer(solution)
        if answer is None:
            raise UserError(f"{path}: row {row}: column {columns.answer!r} holds no answer: expected a solution "
                            f"ending in '#### N', a number, a \\boxed{{...}} answer or a one-line LaTeX answer "
                            f"(got {str(solution)[-60:]!r})")
        reference = solution if isinstance(solution, str) else ""
        problems.append(Problem(f"{path.stem}-{row}", question, answer, reference_solution=reference))
    if not problems:
        raise UserError(f"{path}: no problems in file")
    return problems


def gold_answer(solution: object) -> float | str | None:
    """The gold answer of an answer cell: a number for GSM8K ('... #### 1,234' -> 1234.0, '72' -> 72.0, 5 ->
    5.0) and for a boxed plain number; the boxed text otherwise ('... \\boxed{\\frac{1}{2}}.' ->
    '\\frac{1}{2}'); a bare LaTeX answer as it is ('\\frac{14}{3}', `bare_latex_answer`); None when the cell
    has none of these."""
    if isinstance(solution, bool) or solution is None:
        return None
    if isinstance(solution, (int, float)):
        return None if solution != solution else float(solution)  # NaN: a missing cell
    if not isinstance(solution, str):
        return None
    text = solution.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    else:
        boxed = last_boxed(text)
        if boxed is not None:
            text = boxed.strip()
            return parse_number(text) if _NUMBER.fullmatch(text) else (text or None)
        if _BOXED not in text and not _NUMBER.fullmatch(text):  # (a \boxed{ that never closes is no answer)
            return text if bare_latex_answer(text) else None
    return parse_number(text) if _NUMBER.fullmatch(text) else None


def bare_latex_answer(text: str) -> bool:
    """Whether a cell without '####' or '\\boxed{}' is an answer rather than a solution: one line of at most
    BARE_ANSWER_MAX_CHARS characters, no two plain words in a row outside LaTeX command names (prose),
    and math-verify reads it as LaTeX (`specialists.grading.reads_as_latex`, as the grading will)."""
    if not text or "\n" in text or len(text) > BARE_ANSWER_MAX_CHARS or _SENTENCE.search(_LATEX_COMMAND.sub(" ", text)):
        return False
    return reads_as_latex(text)


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}`, braces matched ('\\boxed{\\frac{1}{2}}' -> '\\frac{1}{2}');
    None without one or when its braces do not close."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:position]
    return None


def normalised_question(text: str) -> str:
    """The form two questions are compared in: Unicode NFKC, case-folded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def prompt_split(path: str | Path, columns: PromptColumns = PromptColumns(), heldout_path: str | Path | None = None,
                 heldout_fraction: float = 0.0, seed: int = 0) -> PromptSplit:
    """The RL prompts and held-out problems of a prompt file (see the module docstring).

    With `heldout_path`, the held-out problems are that file's (same columns); RL prompts whose question is
    among them are dropped with a warning. With `heldout_fraction` f, round(f * n) of the file's n distinct
    questions, drawn with `seed`, are held out. With neither, nothing is held out.
    """
    if heldout_path is not None and heldout_fraction > 0:
        raise UserError("give a held-out file or a held-out fraction, not both")
    problems = _distinct(read_problems(path, columns), path)
    if heldout_path is not None:
        heldout = _distinct(read_problems(heldout_path, columns), heldout_path)
        held_questions = {normalised_question(p.question) for p in heldout}
        train = [p for p in problems if normalised_question(p.question) not in held_questions]
        if len(train) < len(problems):
            warnings.warn(f"{path}: {len(problems) - len(train)} of {len(problems)} questions are also in the held-out "
                          f"file {heldout_path}; they are dropped from the RL prompts", stacklevel=2)
        if not train:
            raise UserError(f"{path}: every question is also in the held-out file {heldout_path}")
        return PromptSplit(train, heldout)
    if heldout_fraction <= 0:
        return PromptSplit(problems, [])
    count = round(heldout_fraction * len(problems))
    if not 0 < count < len(problems):
        raise UserError(f"{path}: a held-out fraction of {heldout_fraction} of {len(problems)} distinct questions "
                        f"holds out {count}; it must leave at least one on each side")
    chosen = set(random.Random(f"{seed}:heldout").sample(range(len(problems)), count))
    return PromptSplit([p for i, p in enumerate(problems) if i not in chosen],
                       [p for i, p in enumerate(problems) if i in chosen])


def _distinct(problems: list[Problem], path: str | Path) -> list[Problem]:
    """The problems with the first of each normalised question kept; a warning says how many were dropped."""
    seen: dict[str, Problem] = {}
    for problem in problems:
        seen.setdefault(normalised_question(problem.question), problem)
    if len(seen) < len(problems):
        warnings.warn(f"{path}: {len(problems) - len(seen)} repeated questions dropped (the first of each kept)",
                      stacklevel=3)
    return list(seen.values())


def _records(path: Path, columns: PromptColumns):
    """(row, {column: value}) of the file's rows, only the two columns read where the format allows it."""
    kind = prompt_file_kind(path)
    names = list(dict.fromkeys([columns.question, columns.answer]))
    if kind == "jsonl":
        for row, (_, record) in enumerate(_jsonl_records(path)):
            yield row, record
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path, columns=names).to_pylist()
    else:
        from datasets import load_from_disk

        rows = load_from_disk(str(path)).select_columns(names).to_list()
    yield from enumerate(rows)


def _jsonl_records(path: Path):
    """(line number, record) of every non-blank line; a UserError naming the first line that is no JSON object."""
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if (record := json_object(line, f"{path} line {line_number}")) is not None:
                yield line_number, record
