"""Checking where `analyze` and `report` will write before they start: an output path that cannot work is
named before any analysis runs. (The files themselves are replaced atomically: specialists.files.)
"""

from __future__ import annotations

import tempfile
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
