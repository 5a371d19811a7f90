"""Loading causal LMs and tokenizers by name, path or instance, with clear errors.

Everything here goes through ``from_pretrained``, the same path for the embedded
default model (``"default"``) as for any user checkpoint. Problems a user can fix
(a path that does not exist, a tokenizer with neither pad nor EOS token, a
tokenizer larger than the model's vocabulary) are reported here, before any long
work starts.

Loads are quiet: transformers' "Loading weights" progress bar is off for each load
(``quiet_loading``), for library users as for the commands, unless transformers'
own verbosity asks for more (``TRANSFORMERS_VERBOSITY=info`` or ``debug``, or
``transformers.logging.set_verbosity_info()``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Union

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

ModelSpec = Union[str, os.PathLike, PreTrainedModel, None]
TokenizerSpec = Union[str, os.PathLike, PreTrainedTokenizerBase, None]

DEFAULT_MODEL_NAME = "default"

#: Models the project builds itself on first use (see ``textenv.lm.cache``), by name: each
#: maps to a function that returns the model's folder, building it first if needed.
#: ``textenv.training.builtin_models`` registers ``"default"``, ``"textenv:default"``,
#: ``"textenv:arithmetic"``, ``"textenv:sentiment-reward-model"``, ``"textenv:guess-number"``
#: and ``"smollm2-135m-instruct"`` (importing ``textenv`` does); this module only looks
#: names up, it never imports the builders.
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {}

#: Model files that are not ``from_pretrained`` folders, by file suffix (lower case): each
#: maps to a function that converts such a file once into a cached folder and returns it.
#: ``textenv.training.builtin_models`` registers ``".gguf"``.
MODEL_FILE_CONVERTERS: dict[str, Callable[[Path], Path]] = {}


def loading_is_verbose() -> bool:
    """Whether model loads may show transformers' progress bars: only when transformers'
    own verbosity is info or debug (``TRANSFORMERS_VERBOSITY``, ``set_verbosity_info``)."""
    from transformers.utils import logging as transformers_logging

    return transformers_logging.get_verbosity() <= logging.INFO


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Transformers' progress bars ("Loading weights") off inside the block, the previous
    setting back after it (even on an error), through transformers' public switches.

    Every ``from_pretrained`` in the project runs inside one. When transformers' own
    verbosity is info or debug (``loading_is_verbose``) the block changes nothing and the
    bars show. The switch is process-wide: a bar that another thread starts during the
    block is hidden too.
    """
    from transformers.utils import logging as transformers_logging

    if loading_is_verbose() or not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def register_builtin_model(name: str, ensure: Callable[[], Path]) -> None:
    """Make ``name`` resolve to the folder ``ensure()`` returns (building it on first use).

    A name never contains ``/``, so that it cannot shadow a hub id (``owner/name``) or a path.
    """
    if not name or "/" in name or os.sep in name:
        raise ValueError(f"Built-in model names contain no '/' (they would shadow a hub id or a path), got {name!r}")
    BUILTIN_MODELS[name] = ensure


def register_model_file_converter(suffix: str, convert: Callable[[Path], Path]) -> None:
    """Make a path ending in ``suffix`` (e.g. ``".gguf"``) resolve to ``convert(path)``: the
    folder the file was converted into (once, in the cache)."""
    if not suffix.startswith("."):
        raise ValueError(f"A model file suffix starts with '.', got {suffix!r}")
    MODEL_FILE_CONVERTERS[suffix.lower()] = convert


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Map ``None``/``"default"``/a built-in name to its model (building it once), a model
    file such as ``x.gguf`` to its converted folder (converting it once), and refuse a
    local-looking path that does not exist, before ``from_pretrained`` tries to reach a hub
    with it."""
    text = DEFAULT_MODEL_NAME if name_or_path is None else str(name_or_path)
    if text in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[text]())
    if text.startswith("textenv:") or text == DEFAULT_MODEL_NAME:
        raise ValueError(f"Unknown built-in model {text!r}. Fix: use one of {sorted(BUILTIN_MODELS)}.")
    suffix = Path(text).suffix.lower()
    if suffix in MODEL_FILE_CONVERTERS and not Path(text).expanduser().is_dir():
        if not Path(text).expanduser().is_file():
            raise FileNotFoundError(f"Model file {text!r} does not exist. Fix: pass the path of an existing "
                                    f"{suffix} file, or a folder written by `save_pretrained`.")
        return str(MODEL_FILE_CONVERTERS[suffix](Path(text).expanduser()))
    looks_local = (
        os.sep in text and not _looks_like_hub_id(text)
    ) or text.startswith((".", "~")) or Path(text).expanduser().exists()
    if looks_local and not Path(text).expanduser().exists():
        raise FileNotFoundError(
            f"Model path {text!r} does not exist. Fix: pass a folder written by "
            "`save_pretrained`, a model name that `from_pretrained` can resolve, or "
            f"{DEFAULT_MODEL_NAME!r} for the embedded default model."
        )
    return str(Path(text).expanduser()) if looks_local else text


def _looks_like_hub_id(text: str) -> bool:
    # "owner/name" with exactly one slash and no leading slash is a hub id.
    return text.count("/") == 1 and not text.startswith("/")


def _load_error(kind: str, name: str, error: Exception) -> OSError:
    return OSError(
        f"Could not load the {kind} {name!r}: {error}. Fix: pass a folder written by "
        "`save_pretrained`, or a name available in the local Hugging Face cache "
        f"(this tool never downloads at run time), or {DEFAULT_MODEL_NAME!r}."
    )


def load_tokenizer(spec: TokenizerSpec) -> PreTrainedTokenizerBase:
    """A tokenizer that is ready for batched use: it has a pad token.

    Many checkpoints (GPT-2, Llama) have none. Prompts are left-padded under an
    attention mask, so the pad id is never attended: EOS pads, as elsewhere in the
    ecosystem, with a one-line notice. A tokenizer object passed in is copied first,
    never changed.
    """
    if isinstance(spec, PreTrainedTokenizerBase):
        tokenizer = spec
        name = getattr(spec, "name_or_path", type(spec).__name__)
    else:
        name = resolve_model_path(spec)
        try:
            with quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise _load_error("tokenizer", name, error) from error
    if tokenizer.pad_token_id is not None:
        return tokenizer
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"The tokenizer {name!r} has no pad token and no EOS token to pad with, so prompts "
            "of different lengths cannot be batched. Fix: give it a pad token before passing the "
            "tokenizer object, e.g. `tokenizer.add_special_tokens({'pad_token': '<pad>'})` with "
            "`model.resize_token_embeddings(len(tokenizer))`, or `tokenizer.pad_token = <an "
            "existing token>` (it is only ever masked out)."
        )
    if tokenizer is spec:
        tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    warnings.warn(
        f"The tokenizer {name!r} has no pad token: padding with its EOS token "
        f"{tokenizer.eos_token!r} (pad := eos; padding is masked out, never attended).",
        UserWarning,
        stacklevel=2,
    )
    return tokenizer


def load_causal_lm(
    spec: ModelSpec,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A causal LM in eval mode with dropout off, on ``device``; a fresh (trainable) copy.

    Its weights are ``dtype`` whatever dtype the checkpoint was saved in: Llama and Qwen
    are published in bf16, and ``from_pretrained`` would keep that, so an optimizer
    would then step pure bf16 weights, where updates below about 1e-3 of a weight
    vanish. Float32 (the default) is the master copy that mixed precision trains.
    """
    if isinstance(spec, PreTrainedModel):
        model = spec.to(dtype)
    else:
        name = resolve_model_path(spec)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        try:
            with quiet_loading():
                config = AutoConfig.from_pretrained(name)
                zero_dropout_config(config)
                model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, **kwargs)
        except (OSError, ValueError) as error:
            raise _load_error("causal language model", name, error) from error
    disable_dropout(model)
    return model.to(device).eval()


def load_model_body(spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The body (``AutoModel``: the transformer without any head) of a causal LM, a reward
    model or any Hugging Face checkpoint, trainable, dropout off, ``dtype`` weights: what a
    separate critic (``policies.lm_policy``) puts its value head on."""
    if isinstance(spec, PreTrainedModel):
        model = spec.base_model.to(dtype)
    else:
        name = resolve_model_path(spec)
        try:
            with quiet_loading():
                config = AutoConfig.from_pretrained(name)
                zero_dropout_config(config)
                model = AutoModel.from_pretrained(name, config=config, dtype=dtype)
        except (OSError, ValueError) as error:
            raise _load_error("model body", name, error) from error
    disable_dropout(model)
    return model.to(device).eval()


@functools.lru_cache(maxsize=8)
def _cached_frozen_lm(name: str, device: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = load_causal_lm(name, device, dtype=dtype)
    model.requires_grad_(False)
    return model


def load_frozen_lm(spec: ModelSpec, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A frozen reference model: no gradients, eval mode, ``dtype`` weights (float32 unless
    asked otherwise; a model instance keeps its own).

    Loaded once per (name, device, dtype) and shared by every environment in the process,
    so ``n_envs`` parallel environments do not hold ``n_envs`` copies of the weights.
    A model instance is used as given (frozen in place).
    """
    if isinstance(spec, PreTrainedModel):
        disable_dropout(spec)
        return spec.requires_grad_(False).to(device).eval()
    return _cached_frozen_lm(resolve_model_path(spec), str(torch.device(device)), dtype)


def causal_lm_skeleton(spec: str | os.PathLike) -> PreTrainedModel:
    """The causal LM ``spec`` names, built on the meta device: its config, its generation
    config (as ``from_pretrained`` sets it) and the shapes of its weights, without reading a
    weight. What a task checks a reference against (vocabulary, context, stop tokens) before
    the reference itself loads (``textenv.reference_scoring.ReferenceModel``)."""
    from transformers import GenerationConfig

    name = resolve_model_path(spec)
    try:
        with quiet_loading():
            config = AutoConfig.from_pretrained(name)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as error:
        raise _load_error("causal language model", name, error) from error
    if skeleton.can_generate():
        try:  # as from_pretrained does: the saved generation config, else the one made from config
            with quiet_loading():
                skeleton.generation_config = GenerationConfig.from_pretrained(name)
        except OSError:
            pass
    return skeleton.eval()


def zero_dropout_config(config) -> None:
    """Every dropout probability of a config (``attn_pdrop``, ``attention_dropout``,
    ``hidden_dropout``, ``classifier_dropout``, ...) set to 0, before the model is built
    from it: modules that copy a rate from the config at construction get 0 too."""
    for key, value in vars(config).items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


def release_cached_frozen_models() -> None:
    """Forget the shared frozen models (``load_frozen_lm``'s cache), so that those no env
    uses any more can be freed (e.g. after a LoRA policy became its env's reference)."""
    _cached_frozen_lm.cache_clear()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere, so that train mode and eval mode compute the same function.

    RL needs the probability ratio to be exactly 1 before the first update; a dropout
    layer re-sampled between rollout and update breaks that. With dropout off, the
    policy's body can be in train mode during the update, which gradient checkpointing
    needs (Hugging Face models checkpoint only in train mode). Covers the config
    (``zero_dropout_config``), every ``nn.Dropout``, and float rates that attention
    modules keep as attributes (e.g. Llama's ``self.attention_dropout``).
    """
    config = getattr(model, "config", None)
    if config is not None:
        zero_dropout_config(config)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(module, key, 0.0)


def vocab_size_of(model: PreTrainedModel) -> int:
    """The action-space size: the model's output rows, not ``len(tokenizer)``."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_tokenizer_fits_model(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    vocab = vocab_size_of(model)
    if len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only {vocab} output "
            "rows; they do not belong together. Fix: pass the tokenizer saved with this "
            "model (or resize the model's embeddings and save it again)."
        )
