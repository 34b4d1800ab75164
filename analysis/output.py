"""Writing what `analyze` and `report` produce without losing what is already there.

An output path that cannot work is named before any analysis runs, and files are replaced atomically:
each is written to a temporary file next to it and renamed over it, so a failed or killed command
leaves the previous file whole.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from specialists.errors import UserError


def check_output_dir(directory: Path) -> None:
    """UserError unless `directory` exists or can be created, and files can be written in it. Creates nothing:
    it tries a nameless temporary file in the nearest folder that exists."""
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write into {directory}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"cannot write into {directory}: {error.strerror} ({existing})") from None


def check_output_file(path: Path) -> None:
    """UserError when `path` is a directory or its folder cannot be created (see check_output_dir)."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the path of a file to write")
    check_output_dir(path.parent)


def replace_atomically(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Write each file with `writers[path](temporary_path)`, then rename every temporary file over its target.
    Nothing is replaced unless every file was written; the temporary files are removed on failure."""
    partials = {path: path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in writers}
    try:
        for path, write in writers.items():
            write(partials[path])
        for path, partial in partials.items():
            os.replace(partial, path)
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
