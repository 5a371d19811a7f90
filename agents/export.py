"""A trained policy as a Hugging Face model folder: no pickle anywhere.

An SB3 agent zip is a pickle: loading one from a stranger runs their code. The
exported folder is what ``save_pretrained`` writes (``config.json``, safetensors
weights, the tokenizer, the generation config) plus the value head
(``value_head.safetensors``; with a separate critic, its body in ``critic/``) and a
small JSON of what textenv needs to rebuild the policy around it
(``textenv_policy.json``). It loads with
``AutoModelForCausalLM.from_pretrained`` and works with ``generate`` and
``pipeline("text-generation")``; a task can name it as its ``model``;
``load_agent(folder, env)`` (``agents.registry.load_exported_agent``) starts a
textenv agent from it. A LoRA policy is exported
merged (plain weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from stable_baselines3.common.base_class import BaseAlgorithm

from agents.registry import CRITIC_FOLDER, POLICY_FILE, VALUE_HEAD_FILE, load_agent, load_exported_agent  # noqa: F401
from policies.lora import export_merged
from textenv.files import atomic_write_text, plain_modes

# The policy's own arguments that rebuild it around the exported weights (the model path
# becomes the folder; LoRA is merged into it).
EXPORTED_POLICY_ARGUMENTS = ("value_head_init_std", "attn_implementation", "precision", "gradient_checkpointing",
                             "logits_chunk_size", "top_p", "critic", "critic_learning_rate")


def export_policy(agent: BaseAlgorithm | str, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write ``agent``'s policy (an agent, or the path of a saved zip you trust) as a Hugging
    Face model folder plus its value head; returns the folder. The tokenizer defaults to
    the agent's env's, else the one saved with the policy's starting model."""
    if isinstance(agent, (str, Path)):
        agent = load_agent(str(agent))
    policy = agent.policy
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or _tokenizer_of(agent)
    with plain_modes(folder):  # the modes of a plain write (safetensors writes its files 0600)
        if policy.lora is not None:
            export_merged(policy.lm, folder, tokenizer)
        else:
            policy.causal_lm.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        if getattr(policy, "critic_body", None) is not None:  # a separate critic: its body beside the policy
            policy.critic_body.save_pretrained(folder / CRITIC_FOLDER, safe_serialization=True)
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in policy.value_head.state_dict().items()},
                  str(folder / VALUE_HEAD_FILE))
        constructor = {key: value for key, value in policy._get_constructor_parameters().items()
                       if key in EXPORTED_POLICY_ARGUMENTS}
        atomic_write_text(folder / POLICY_FILE, json.dumps({
            "algorithm": getattr(agent, "algorithm_name", None),
            "policy_kwargs": constructor,
            "kl_coef": float(agent.kl_controller.value) if hasattr(agent, "kl_controller") else None,
        }, indent=2))
    return folder


def _tokenizer_of(agent: BaseAlgorithm) -> Any:
    from textenv.models import load_tokenizer

    env = agent.get_env()
    if env is not None:
        try:
            return env.get_attr("tokenizer")[0]
        except AttributeError:
            pass
    return load_tokenizer(agent.policy.model_name_or_path)
