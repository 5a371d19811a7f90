"""``LMActorCritic``: a causal LM (the actor) and a linear value head (the critic) as one
``torch.nn.Module``, usable without Stable-Baselines3.

It is the pair TRL-classic's ``AutoModelForCausalLMWithValueHead`` offered: load by name
or path (``from_pretrained``), run ``forward(input_ids, attention_mask, cache)`` for the
logits, the value of every position and the KV cache, ``generate`` with the LM, and
``save_pretrained``. The SB3 policy (``policies.lm_policy``) is built on this module; its
state-dict names stay those of the parts (``lm``, ``lm_head``, ``critic_body``,
``value_head``).

This module owns the exported folder's format (written by ``save_pretrained``; the agent's
``agents.saving.export_policy`` writes it through here): a Hugging Face causal-LM folder
(a LoRA policy merged into plain weights, and its tokenizer), the value head
(``VALUE_HEAD_FILE``), a separate critic's body (``CRITIC_FOLDER``) and a small JSON of
the options that rebuild the policy around them (``POLICY_FILE``). No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from policies.lora import LoraReference, add_lora_adapters, causal_lm_of, export_merged, is_lora
from textenv.files import atomic_write_text, plain_modes
from textenv.lm.models import load_causal_lm, load_model_body, load_tokenizer
from textenv.lm import shared_prefix
from textenv.lm.slot_decoding import lm_logits, positions_of

#: The exported folder: the value head, the policy's own arguments, a separate critic's body.
VALUE_HEAD_FILE = "value_head.safetensors"
POLICY_FILE = "textenv_policy.json"
CRITIC_FOLDER = "critic"  # a separate critic's body, beside the exported policy

Precision = Literal["fp32", "bf16-mixed", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16-mixed", "bf16")
Critic = Literal["shared", "separate"]
CRITICS: tuple[str, ...] = ("shared", "separate")

#: ``from_pretrained``'s options and their defaults (the SB3 policy's arguments of the same names).
OPTIONS: dict[str, Any] = dict(value_head_init_std=0.01, attn_implementation=None, precision="fp32",
                               gradient_checkpointing=False, lora=None, critic="shared",
                               critic_model_name_or_path=None)
#: The options an exported folder's ``POLICY_FILE`` records by default (LoRA is merged; the
#: critic's start is the folder's ``CRITIC_FOLDER``).
SAVED_OPTIONS = ("value_head_init_std", "attn_implementation", "precision", "gradient_checkpointing", "critic")

#: ``cache`` of ``forward``: the body's KV cache, or ``(actor's, critic's)`` with a separate critic.
ActorCriticCache = Any


def is_exported_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_pretrained`` (it holds a value head)."""
    return (Path(path) / VALUE_HEAD_FILE).is_file()


def exported_settings(folder: str | Path) -> dict[str, Any]:
    """The ``POLICY_FILE`` of an exported folder (``{}`` if it has none): ``algorithm``,
    ``policy_kwargs`` and ``kl_coef``."""
    path = Path(folder) / POLICY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class LMActorCritic(nn.Module):
    """A causal LM and a value head on its body (or, ``critic="separate"``, on a body of its own).

    :param lm: the causal LM (a peft model under LoRA): its output head is the actor.
    :param value_head: ``nn.Linear(hidden, 1)``, the critic, on the last hidden state.
    :param critic_body: a separate critic's body (``AutoModel``), or ``None``: the value
        head reads the LM's own body.
    :param precision: ``"fp32"``, ``"bf16-mixed"`` (forward passes under bf16 autocast) or
        ``"bf16"`` (the weights' dtype): see ``policies.lm_policy``.
    :param name_or_path: where the LM came from (the tokenizer ``save_pretrained`` falls back to).
    :param settings: the ``from_pretrained`` options it was built with.

    Parts: ``lm``, ``lm_head`` (the LM's output head, an alias), ``critic_body``, ``value_head``.
    """

    def __init__(self, lm: nn.Module, value_head: nn.Linear, critic_body: nn.Module | None = None,
                 precision: Precision = "fp32", name_or_path: str | None = None,
                 settings: dict[str, Any] | None = None):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}. Fix: use 'fp32' (default), "
                             "'bf16-mixed' (fp32 weights, bf16 autocast) or 'bf16' (bf16 weights).")
        self.lm = lm
        self.lm_head = causal_lm_of(lm).get_output_embeddings()  # the actor's head (an alias)
        self.critic_body = critic_body
        self.value_head = value_head
        self.precision = precision
        self.name_or_path = name_or_path
        self.settings = {**OPTIONS, "precision": precision, "critic": "shared" if critic_body is None else "separate",
                         **(settings or {})}

    # -- loading -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | PreTrainedModel = "default",
        *,
        restore_exported: bool = True,
        check: Callable[[PreTrainedModel], None] | None = None,
        **options: Any,
    ) -> "LMActorCritic":
        """The LM loaded by ``textenv.lm.models.load_causal_lm`` (``"default"``, a built-in
        name, a folder, a hub name in the local cache, a ``.gguf`` file), dropout off, eval mode.

        ``options`` (defaults in ``OPTIONS``): ``value_head_init_std``, ``attn_implementation``,
        ``precision``, ``gradient_checkpointing``, ``lora`` (peft options, e.g. ``{"r": 16}``),
        ``critic`` (``"shared"`` or ``"separate"``), ``critic_model_name_or_path`` (the
        separate critic's start; default the LM's).

        An exported folder (``is_exported_folder``) with ``restore_exported`` comes back as it
        was saved: the options it recorded (under those passed here), its separate critic's
        body and its value head. ``restore_exported=False``: a fresh value head on any
        checkpoint, as the SB3 policy starts. ``check`` is called on the causal LM as soon
        as it is loaded, before anything else is built.
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"Unknown option{'s' if len(unknown) > 1 else ''} {unknown} of LMActorCritic."
                            f"from_pretrained. Fix: use {sorted(OPTIONS)}.")
        exported = (restore_exported and isinstance(name_or_path, (str, Path))
                    and is_exported_folder(name_or_path))
        saved = {}
        if exported:
            saved = {key: value for key, value in exported_settings(name_or_path).get("policy_kwargs", {}).items()
                     if key in OPTIONS}
        settings = {**OPTIONS, **saved, **options}
        if exported and settings["critic"] == "separate" and settings["critic_model_name_or_path"] is None:
            settings["critic_model_name_or_path"] = str(Path(name_or_path) / CRITIC_FOLDER)
        critic, precision, lora = settings["critic"], settings["precision"], settings["lora"]
        if critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}. Fix: use 'fp32' (default), "
                             "'bf16-mixed' (fp32 weights, bf16 autocast) or 'bf16' (bf16 weights).")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        name = name_or_path if isinstance(name_or_path, PreTrainedModel) else str(name_or_path)

        lm = load_causal_lm(name, attn_implementation=settings["attn_implementation"], dtype=dtype)
        if check is not None:
            check(lm)
        if settings["gradient_checkpointing"]:
            if not lm.supports_gradient_checkpointing:
                raise ValueError(f"{type(lm).__name__} does not support gradient checkpointing. "
                                 "Fix: pass gradient_checkpointing=False.")
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if lora is not None:
                lm.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        if lora is not None:
            lm = add_lora_adapters(lm, lora)  # base weights frozen; see policies.lora
        critic_body = None
        if critic == "separate":  # its own body, by default a copy of the policy's start (OpenRLHF's critic)
            critic_body = load_model_body(settings["critic_model_name_or_path"] or name, dtype=dtype)
        critic_width = critic_body.config.get_text_config().hidden_size if critic_body is not None \
            else causal_lm_of(lm).get_output_embeddings().in_features
        value_head = nn.Linear(critic_width, 1)
        nn.init.normal_(value_head.weight, std=settings["value_head_init_std"])
        nn.init.zeros_(value_head.bias)
        module = cls(lm, value_head, critic_body, precision=precision,
                     name_or_path=None if isinstance(name, PreTrainedModel) else name, settings=settings)
        if exported:
            module.load_value_head(name_or_path)
        return module

    def load_value_head(self, folder: str | Path) -> None:
        """The value head's weights from an exported folder's ``VALUE_HEAD_FILE``."""
        from safetensors.torch import load_file

        path = Path(folder) / VALUE_HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {VALUE_HEAD_FILE}: not a folder written by export_policy. "
                                    "Fix: export the agent with agents.saving.export_policy (or textenv-export), "
                                    "or LMActorCritic.save_pretrained.")
        state = load_file(str(path), device=str(self.value_head.weight.device))
        with torch.no_grad():
            self.value_head.load_state_dict(state)

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None, *, policy_kwargs: dict[str, Any] | None = None,
                        algorithm: str | None = None, kl_coef: float | None = None) -> Path:
        """Write the exported folder (see the module doc); returns it. ``from_pretrained`` on it
        restores this module; ``AutoModelForCausalLM.from_pretrained`` loads its LM alone.

        ``tokenizer`` defaults to the one saved with ``name_or_path``; ``policy_kwargs``
        (what ``POLICY_FILE`` records, default the ``SAVED_OPTIONS`` this module was built
        with), ``algorithm`` and ``kl_coef`` are what an agent exported from here starts with
        (``agents.saving.load_exported_agent``)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if tokenizer is None:
            tokenizer = load_tokenizer(self.name_or_path)
        if policy_kwargs is None:
            policy_kwargs = {key: self.settings[key] for key in SAVED_OPTIONS}
        with plain_modes(folder):  # the modes of a plain write (safetensors writes its files 0600)
            if is_lora(self.lm):
                export_merged(self.lm, folder, tokenizer)
            else:
                self.causal_lm.save_pretrained(folder, safe_serialization=True)
                tokenizer.save_pretrained(folder)
            if self.critic_body is not None:  # a separate critic: its body beside the policy
                self.critic_body.save_pretrained(folder / CRITIC_FOLDER, safe_serialization=True)
            save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.value_head.state_dict().items()},
                      str(folder / VALUE_HEAD_FILE))
            atomic_write_text(folder / POLICY_FILE, json.dumps({
                "algorithm": algorithm,
                "policy_kwargs": policy_kwargs,
                "kl_coef": kl_coef,
            }, indent=2))
        return folder

    # -- parts ---------------------------------------------------------------------

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The Hugging Face causal LM (under LoRA: inside the peft model, adapters injected)."""
        return causal_lm_of(self.lm)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def reference_model(self) -> LoraReference | None:
        """Under LoRA, the frozen reference: this very body with its adapters off
        (``policies.lora.LoraReference``); ``None`` without LoRA."""
        return LoraReference(self.lm) if is_lora(self.lm) else None

    def compute_context(self) -> ContextManager:
        """Where the body and the LM head run: bf16 autocast under ``"bf16-mixed"``
        (weights stay float32, and so do the gradients an optimizer sees)."""
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the two heads on one body ---------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      body: nn.Module | None = None, prefix_columns: int = 0) -> torch.Tensor:
        """Final hidden states of a body (``body``: a causal LM or a body, default the LM's)
        at every column of a left-padded batch: ``(batch, width, hidden)``. The first
        ``prefix_columns`` columns are prompts shared by rows, run once each
        (``textenv.lm.shared_prefix``); 0: one pass over whole rows, no cache."""
        with self.compute_context():
            return shared_prefix.hidden_states(causal_lm_of(body or self.lm).base_model, input_ids, attention_mask,
                                               prefix_columns)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the vocabulary (the head's matmul autocast like the body),
        with the architecture's own logit transform (``textenv.lm.slot_decoding.lm_logits``)."""
        with self.compute_context():
            return lm_logits(self.causal_lm, hidden)

    def value_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) in float32 under every precision (autocast off: the head is one small matmul):
        ``(..., hidden)`` -> ``(..., 1)``."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.value_head(hidden.float())

    def _body_step(self, body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cache: Any) -> tuple[torch.Tensor, Any]:
        positions = positions_of(attention_mask)[:, -input_ids.shape[1]:]
        output = causal_lm_of(body).base_model(input_ids=input_ids, attention_mask=attention_mask,
                                               position_ids=positions, cache=cache, use_cache=True)
        return output.last_hidden_state, output.cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: ActorCriticCache = None) -> tuple[torch.Tensor, torch.Tensor, ActorCriticCache]:
        """``(logits, value, cache)`` at every position of ``input_ids``.

        ``attention_mask`` covers the cached tokens and ``input_ids`` (``(batch, cached +
        new)``; prompts left-padded, positions skip the padding); ``cache``: what the previous
        call returned, or ``None``. ``logits``: ``(batch, new, V)`` float32; ``value``:
        ``(batch, new)`` float32; ``cache``: the body's KV cache (a ``transformers`` cache),
        or ``(actor's, critic's)`` with a separate critic."""
        actor_cache, critic_cache = cache if self.critic_body is not None and cache is not None else (cache, None)
        with self.compute_context():
            hidden, actor_cache = self._body_step(self.lm, input_ids, attention_mask, actor_cache)
            critic_hidden = hidden
            if self.critic_body is not None:
                critic_hidden, critic_cache = self._body_step(self.critic_body, input_ids, attention_mask, critic_cache)
        logits = self.logits_from_hidden(hidden)
        value = self.value_from_hidden(critic_hidden)[..., 0]
        return logits, value, actor_cache if self.critic_body is None else (actor_cache, critic_cache)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The LM's ``generate`` (the value head plays no part)."""
        with self.compute_context():
            return self.lm.generate(*args, **kwargs)
