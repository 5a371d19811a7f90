"""A task's prompts as records: a prompt (a string, or a chat) and the fields that go with it.

A record is a string, or a dict with the prompt under ``"prompt"`` (a string or a
chat), ``"messages"`` (a chat), ``"text"`` (a string), or the field ``prompt_field``
names; a chat is a list of ``{"role", "content"}`` messages. Every other field of a
record (a reference answer, a difficulty, an id) reaches the reward as a keyword
argument, a list aligned with the completions, as TRL passes a data set's columns::

    reward(prompts, completions, answer=["4", "12"], level=[1, 3])

Records come from a list (of strings, or of dicts), a ``.txt`` file (one prompt per
line), ``.jsonl`` (one record per line), ``.json`` (a list of records), ``.csv`` (a
header row, then one record per row; every value a string), ``.parquet`` (needs
``pyarrow``), or a Hugging Face ``datasets.Dataset`` (its rows). Every record has the
same fields; one without a prompt, or with other fields than the first, is refused
with its number and the fix.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

Chat = list[dict[str, str]]
Prompt = Union[str, Chat]
PromptSpec = Union[Sequence[Union[str, Mapping[str, Any]]], str, os.PathLike, Any]

PROMPT_FIELDS = ("prompt", "messages", "text")  # where a record's prompt is looked for, in this order
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class PromptRecords:
    """The records of a task: ``prompts[i]`` (a string or a chat) and ``fields[name][i]``."""

    prompts: list[Prompt]
    fields: dict[str, list[Any]] = field(default_factory=dict)
    source: str = "the prompt list"

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_chat(self) -> bool:
        """Whether any prompt is a chat (then the task renders them with a chat template)."""
        return any(not isinstance(prompt, str) for prompt in self.prompts)

    def fields_at(self, indices: Sequence[int]) -> dict[str, list[Any]]:
        """The fields of records ``indices``, as the reward receives them (lists aligned with them)."""
        return {name: [values[i] for i in indices] for name, values in self.fields.items()}


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: a string as it is, a chat as its messages' contents, one per
    line (what a text scorer such as VADER or a reward model reads)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(message["content"] for message in prompt)


def display_text(prompt: Prompt) -> str:
    """A prompt as a person reads it in samples: a chat as ``role: content`` lines, never
    the raw chat template."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{message['role']}: {message['content']}" for message in prompt)


def load_prompts(spec: PromptSpec, prompt_field: str | None = None) -> PromptRecords:
    """The records of ``spec`` (module doc), checked: at least one, each with a non-empty
    prompt, all with the same fields.

    A string or path names a file when it exists or ends in one of ``FILE_SUFFIXES``.
    """
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Prompt file {str(path)!r} does not exist. Fix: pass a list of strings or records, or the path "
                "of a .txt (one prompt per line), .jsonl (one {\"prompt\": ...} object per line), .json, .csv or "
                ".parquet file."
            )
        rows, source = _read_prompt_file(path), str(path)
    elif _is_dataset(spec):
        rows, source = list(spec.to_list() if hasattr(spec, "to_list") else spec), "the dataset"
    else:
        rows, source = list(spec), "the prompt list"
    if not rows:
        raise ValueError(f"No prompts in {source}. Fix: give at least one prompt.")
    if all(isinstance(row, str) for row in rows):
        if prompt_field is not None:
            raise ValueError(f"prompt_field={prompt_field!r} names a field of records, and the prompts in {source} "
                             "are strings. Fix: drop prompt_field, or give records (dicts).")
        records = PromptRecords(list(rows), {}, source)
    else:
        records = _records(rows, source, prompt_field)
    for index, prompt in enumerate(records.prompts):
        if not prompt_text(prompt).strip():
            raise ValueError(f"Prompt #{index} in {source} is empty. Fix: remove it; every episode needs some text "
                             "to continue.")
    return records


def _is_dataset(spec: Any) -> bool:
    """A Hugging Face ``datasets.Dataset`` (or anything with its shape), without importing datasets."""
    return hasattr(spec, "column_names") and hasattr(spec, "__len__") and not isinstance(spec, (list, tuple))


def _records(rows: list[Any], source: str, prompt_field: str | None) -> PromptRecords:
    """Rows of dicts as records: the prompt out of each, the other fields alike in all."""
    prompts: list[Prompt] = []
    names: list[str] | None = None
    key = None
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"Prompt #{index} in {source} is a {type(row).__name__}; the others are records. Fix: "
                            "give every prompt as a string, or every one as a dict (e.g. {\"prompt\": ...}).")
        if key is None:
            key = _prompt_key(row, index, source, prompt_field)
        if key not in row:
            raise ValueError(f"Record #{index} in {source} has no {key!r} field (record #0 has its prompt there): "
                             f"{_shorten(row)}. Fix: give every record its prompt under {key!r}.")
        prompts.append(_check_prompt(row[key], index, source, key))
        others = [name for name in row if name != key]
        if names is None:
            names = others
        elif set(others) != set(names):
            missing, extra = sorted(set(names) - set(others)), sorted(set(others) - set(names))
            raise ValueError(
                f"Record #{index} in {source} has other fields than record #0 ({', '.join(sorted(names)) or 'none'}): "
                + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                              f"extra {extra}" if extra else "") if part)
                + ". Fix: give every record the same fields (the reward receives each as a list over the batch)."
            )
    fields = {name: [row[name] for row in rows] for name in names or []}
    return PromptRecords(prompts, fields, source)


def _prompt_key(row: Mapping[str, Any], index: int, source: str, prompt_field: str | None) -> str:
    if prompt_field is not None:
        if prompt_field not in row:
            raise ValueError(f"Record #{index} in {source} has no {prompt_field!r} field (prompt_field=): "
                             f"{_shorten(row)}. Fix: pass the name of the field that holds the prompt.")
        return prompt_field
    for name in PROMPT_FIELDS:
        if name in row:
            return name
    raise ValueError(f"Record #{index} in {source} has no prompt: no {', '.join(map(repr, PROMPT_FIELDS))} field in "
                     f"{_shorten(row)}. Fix: put the prompt under 'prompt' (a string) or 'messages' (a chat), or "
                     "pass prompt_field= naming the field that holds it.")


def _check_prompt(value: Any, index: int, source: str, key: str) -> Prompt:
    """A prompt is a string, or a chat: a non-empty list of ``{"role": str, "content": str}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(
            isinstance(message, Mapping) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str) for message in value):
        return [{"role": message["role"], "content": message["content"]} for message in value]
    raise TypeError(f"The {key!r} of record #{index} in {source} is neither a string nor a chat: {_shorten(value)}. "
                    "Fix: give a string, or a list of {\"role\": ..., \"content\": ...} messages.")


def _shorten(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_prompt_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not JSON ({error.msg}). Fix: write one JSON object per line, "
                                 'like {"prompt": "The film was", "answer": "good"}.') from None
        return rows
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error.msg} at line {error.lineno}). Fix: write a JSON list of "
                             "records (or of strings).") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path} holds a JSON {type(rows).__name__}, not a list. Fix: write a JSON list of "
                             'records, e.g. [{"prompt": "2+2=", "answer": "4"}].')
        return rows
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as file:
            return [dict(row) for row in csv.DictReader(file)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise ImportError(f"Reading {path} needs pyarrow. Fix: pip install pyarrow (or datasets).") from None
        return parquet.read_table(path).to_pylist()
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
