"""Files written whole or not at all, for every writer of the project (the pretraining cache aside):
the run directory's recorder (rl.recorder) and the outputs of `analyze` and `report` (analysis); and the one
JSON-lines line reader for every reader of such files (corpora, prompt files, metrics.jsonl, rollout dumps)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from specialists.errors import UserError


def replace_atomically(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Write each target with `writers[target](partial)`, `partial` being the target's name + ".tmp" (a file or
    a directory), then rename every partial over its target: a kill or a full disk leaves each target old or
    new, never half written. Nothing is replaced unless every write succeeded; partials are removed on
    failure, and an OSError names the target it failed on. A directory target must not exist yet (a rename
    does not replace a non-empty directory)."""
    partials = {path: path.with_name(path.name + ".tmp") for path in writers}
    try:
        for path, write in writers.items():
            with _naming(path):
                write(partials[path])
        for path, partial in partials.items():
            with _naming(path):
                os.replace(partial, path)
    finally:
        for partial in partials.values():
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise an OSError (pyarrow's name no file) as one that names `path`. Writers with their own file code
    (torch's zip writer, safetensors) report a full disk as a RuntimeError or their own error, without errno:
    any error of a write that left `path`'s file system without a free block is re-raised as ENOSPC, so the
    CLI says "No space left on device" and the file, not a traceback."""
    try:
        yield
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise OSError(error.errno, reason, str(path)) from error
    except Exception as error:
        if os.statvfs(path.parent).f_bavail == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise


def json_object(line: bytes | str, where: str, what: str = "a JSON object") -> dict | None:
    """The record on one line of a JSON-lines file, None for a blank line. Anything else is a UserError starting
    with `where` (e.g. "FILE line 7"): "not UTF-8 text", "not valid JSON (REASON)", or "expected WHAT, got TYPE"
    for JSON that is not an object."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected {what}, got {type(record).__name__}")
    return record
