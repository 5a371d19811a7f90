"""Writing files so that a crash never leaves a half-written one in place.

Every result the project writes (agents, reports, tables, summaries) goes to a
temporary file in the same folder, is flushed and fsynced, then renamed over the
target (``os.replace`` is atomic within a filesystem): after a crash, a full disk
or a kill at any moment the target is either the old complete file or the new one.

The file gets the permission bits a plain ``open(path, "w")`` would leave: a new
file ``0o666`` less the umask (``0o644`` under the usual umask 022), an existing
target its own mode, kept across the replacement. (``tempfile.mkstemp`` makes
``0o600`` files, which would leave every result readable by its owner alone.) Some
writers replace the file they are given by their own temporary file (safetensors
0.8's ``save_file`` does, at ``0o600``: safetensors/safetensors#782): the mode is set
after ``write`` returns, whatever it did. ``plain_modes`` does the same for a folder
that a library fills itself (``save_pretrained``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

PLAIN_FILE_MODE = 0o666  # what open(path, "w") asks for; the umask (and default ACLs) take bits away


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary_path)`` fills a temporary file beside ``path``, which then replaces
    ``path`` in one rename. On any error the temporary file is removed and ``path`` is untouched.

    ``path`` ends with the mode a plain write would give it: an existing file's own mode,
    else ``0o666`` less the umask (see the module's notes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary_path, new_file_mode = _create_temporary(path)
    try:
        mode = _existing_mode(path)
        write(temporary_path)
        os.chmod(temporary_path, new_file_mode if mode is None else mode)
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


def plain_file_mode(folder: str | Path) -> int:
    """The permission bits a file newly created in ``folder`` by a plain write gets
    (``0o666`` less the umask and any default ACL), found by creating one: the umask
    is never changed, not even for a moment (``os.umask`` is process-wide)."""
    probe, mode = _create_temporary(Path(folder) / "mode-probe")
    probe.unlink()
    return mode


@contextlib.contextmanager
def plain_modes(folder: str | Path) -> Iterator[Path]:
    """Files that the block writes under ``folder`` (any depth) end with the modes of a plain
    write: files new to the folder ``plain_file_mode``, files that were there their old mode.
    For writers that make their files ``0o600`` (safetensors 0.8, hence ``save_pretrained``)::

        with plain_modes(folder):
            model.save_pretrained(folder)
    """
    folder = Path(folder)
    before = {path: stat.S_IMODE(path.stat().st_mode) for path in _files_under(folder)}
    yield folder
    new_file_mode = None
    for path in _files_under(folder):
        mode = before.get(path)
        if mode is None:
            new_file_mode = plain_file_mode(path.parent) if new_file_mode is None else new_file_mode
            mode = new_file_mode
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)


def _files_under(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file ``.<name>.<random>.tmp`` beside ``path``, created as a plain write
    creates one (``0o666`` less the umask, unlike ``tempfile.mkstemp``'s ``0o600``), and
    the mode it got."""
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PLAIN_FILE_MODE)
        except FileExistsError:
            continue
        try:
            return temporary, stat.S_IMODE(os.fstat(descriptor).st_mode)
        finally:
            os.close(descriptor)
    raise FileExistsError(f"could not create a temporary file beside {str(path)!r}")


def _existing_mode(path: Path) -> int | None:
    """The mode of the file at ``path`` (through a link, as a plain write would open it),
    or ``None`` where there is no file yet."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return None


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
