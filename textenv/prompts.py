"""Prompts from a list of strings, a text file (one per line) or a JSONL file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

PromptSpec = Union[Sequence[str], str, os.PathLike]


def load_prompts(spec: PromptSpec) -> list[str]:
    """A non-empty list of non-empty prompt strings.

    A string is read as a file path when it names an existing file, or ends in
    ``.txt``/``.jsonl``; JSONL lines need a ``"prompt"`` (or ``"text"``) field.
    """
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Prompt file {str(path)!r} does not exist. Fix: pass a list of strings, "
                "or the path of a .txt file (one prompt per line) or a .jsonl file "
                "(one {\"prompt\": ...} object per line)."
            )
        prompts = _read_prompt_file(path)
        source = str(path)
    else:
        prompts = list(spec)
        source = "the prompt list"
    if not prompts:
        raise ValueError(f"No prompts in {source}. Fix: give at least one prompt.")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"Prompt #{index} in {source} is a {type(prompt).__name__}, not a string")
        if not prompt.strip():
            raise ValueError(
                f"Prompt #{index} in {source} is empty. Fix: remove it; every episode "
                "needs some text to continue."
            )
    return prompts


def _read_prompt_file(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not ({"prompt", "text"} & record.keys()):
            raise ValueError(
                f"{path}:{number} has no 'prompt' field. Fix: write one JSON object per "
                'line, like {"prompt": "The film was"}.'
            )
        prompts.append(record.get("prompt", record.get("text")))
    return prompts
