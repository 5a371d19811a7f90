"""The cache folder of models the project builds itself (no downloads).

``$TEXTENV_HOME`` (default ``~/.cache/textenv``) holds one folder per built
model, named with a recipe version so that a changed recipe never loads an old
build. Builds write to a temporary folder and rename it into place, so an
interrupted build never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from textenv.files import plain_modes


def cache_root() -> Path:
    return Path(os.environ.get("TEXTENV_HOME", Path.home() / ".cache" / "textenv")).expanduser()


def new_staging_folder(parent: Path) -> Path:
    """An empty ``.building-<random>`` folder in ``parent``, made as ``mkdir`` makes one (the
    umask decides its mode; ``tempfile.mkdtemp``'s 0700 would hide the built model from the
    other users of a shared ``TEXTENV_HOME``)."""
    for _ in range(100):
        folder = parent / f".building-{secrets.token_hex(4)}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"could not create a staging folder in {str(parent)!r}")


def ensure_built(name: str, build: Callable[[Path, bool], None], description: str, progress: bool = True) -> Path:
    """``cache_root() / name``, running ``build(folder, progress)`` first if it is not there."""
    target = cache_root() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging_folder(target.parent)
    try:
        if progress:
            print(f"textenv: building {description} once, into {target}")
        with plain_modes(staging):  # safetensors writes its files 0600: a shared cache needs a plain write's
            build(staging, progress)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
