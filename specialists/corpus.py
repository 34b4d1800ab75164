"""Users' own pretraining text: one JSONL file per format (`[mixture.formats.NAME] data = "FILE.jsonl"`).

A corpus file holds one JSON object per line with a non-empty string `text`: a whole training document
in that format (question and solution, as the texts of TinyGSM, OpenMathInstruct-1 or GSM8K are written).
Blank lines are skipped; other keys are ignored. `read_texts` is called when a config is loaded (so a
bad file is refused before any work, with one line naming the file and the line) and again by the
pretraining; a file is parsed once per process while its size and modification time stay the same.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from specialists.errors import UserError
from specialists.files import json_object


def read_texts(path: str | Path) -> tuple[str, ...]:
    """The `text` of every line of a JSONL corpus file; UserError naming the file (and line) when it is bad."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a JSONL corpus file")
    if not path.is_file():
        raise UserError(f"{path}: corpus file not found")
    status = path.stat()
    return _read_texts(path.resolve(), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _read_texts(path: Path, size: int, mtime_ns: int) -> tuple[str, ...]:
    texts = []
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if (record := json_object(line, f"{path} line {line_number}", 'an object like {"text": "..."}')) is None:
                continue
            text = record.get("text")
            if not isinstance(text, str):
                raise UserError(f"{path} line {line_number}: no \"text\" string (each line must be an object "
                                "like {\"text\": \"...\"})")
            if not text.strip():
                raise UserError(f"{path} line {line_number}: the \"text\" is empty")
            texts.append(text)
    if not texts:
        raise UserError(f"{path}: no texts (the file is empty)")
    return tuple(texts)


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes: a cached base trained on a corpus must not outlive an edit of it."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
