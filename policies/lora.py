"""LoRA for the LM policy (peft): only the adapters and the value head train, and the
frozen reference is the same body with its adapters switched off.

A full fine-tune of a 7B policy needs the policy, a second full copy as the KL
reference, and Adam's two moments for every weight. With LoRA the base weights are
frozen and shared: the policy is ``base + B·A`` on the targeted linear layers, and the
reference is ``base`` itself, reached through ``AdaptersOff`` (every call runs inside
peft's ``disable_adapter()``), so no second copy is loaded. At initialisation peft
sets ``B = 0``, so the policy equals the reference exactly and the KL starts at 0.

``policy_kwargs={"lora": {"r": 16}}`` turns it on (``LORA_DEFAULTS`` fill the rest;
any ``peft.LoraConfig`` field may be given). Adapter dropout is refused: PPO needs the
probability ratio to be exactly 1 before the first update.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

LORA_DEFAULTS: dict[str, Any] = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def add_lora_adapters(model: PreTrainedModel, options: dict[str, Any]) -> nn.Module:
    """``model`` wrapped as a peft ``PeftModel`` with fresh LoRA adapters (base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:  # pragma: no cover - peft is a dependency
        raise ImportError("LoRA needs peft. Fix: pip install peft") from error
    options = {**LORA_DEFAULTS, **options}
    if options.get("lora_dropout"):
        raise ValueError(
            f"lora_dropout={options['lora_dropout']} would make the probability ratio differ from 1 before "
            "the first update. Fix: leave lora_dropout at 0."
        )
    try:
        config = LoraConfig(task_type="CAUSAL_LM", **options)
    except TypeError as error:
        raise ValueError(f"Bad LoRA options {options}: {error}. Fix: use peft.LoraConfig's fields, e.g. "
                         "{'r': 16, 'lora_alpha': 32, 'target_modules': 'all-linear'}.") from None
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM inside a peft model (its LoRA layers injected in place),
    or the model itself: what has ``base_model`` (the body), the head and the config."""
    return model.get_base_model() if is_lora(model) else model


class AdaptersOff:
    """A module of a peft model called with its LoRA adapters switched off."""

    def __init__(self, peft_model: nn.Module, module: nn.Module):
        self._peft_model = peft_model
        self._module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._peft_model.disable_adapter():
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class LoraReference:
    """The frozen reference for a LoRA policy: the policy's own body and head with the
    adapters off. It offers what the environment uses of a reference model (``config``,
    ``generation_config``, ``base_model``, ``get_output_embeddings``, ``parameters``)."""

    def __init__(self, peft_model: nn.Module):
        causal_lm = peft_model.get_base_model()
        self.config = causal_lm.config
        self.generation_config = causal_lm.generation_config
        self.name_or_path = causal_lm.name_or_path
        self.base_model = AdaptersOff(peft_model, causal_lm.base_model)
        self._head = AdaptersOff(peft_model, causal_lm.get_output_embeddings())
        self._causal_lm = causal_lm

    def get_output_embeddings(self) -> AdaptersOff:
        return self._head

    def parameters(self):
        """The base weights (shared with the policy, frozen)."""
        return (p for name, p in self._causal_lm.named_parameters() if "lora_" not in name)


def save_adapters(lora_model: nn.Module, folder: str | Path) -> None:
    """Only the adapters (``adapter_config.json`` + weights, megabytes): load them onto the
    base checkpoint with ``peft.PeftModel.from_pretrained(base, folder)``."""
    lora_model.save_pretrained(folder)


def export_merged(lora_model: nn.Module, folder: str | Path, tokenizer: Any = None) -> None:
    """``base + B·A`` merged into plain weights and saved as an ordinary checkpoint (loads
    with ``AutoModelForCausalLM.from_pretrained``, no peft needed). The policy itself is
    left unmerged."""
    merged = copy.deepcopy(lora_model).merge_and_unload()
    merged.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
