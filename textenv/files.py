"""Writing files so that a crash never leaves a half-written one in place.

Every result the project writes (agents, reports, tables, summaries) goes to a
temporary file in the same folder, is flushed and fsynced, then renamed over the
target (``os.replace`` is atomic within a filesystem): after a crash, a full disk
or a kill at any moment the target is either the old complete file or the new one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary_path)`` fills a temporary file beside ``path``, which then replaces
    ``path`` in one rename. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def check_writable_folder(folder: str | Path) -> None:
    """Raise ``OSError`` naming the folder when files could not be created in it: called
    before long work, so that a run does not fail at its end. Nothing is left behind: a
    missing folder is not made, its nearest existing parent is tried instead."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(f"cannot write into {str(folder)!r}: {str(existing)!r} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OSError(f"cannot write into {str(folder)!r}: {error.strerror or error}") from None


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
