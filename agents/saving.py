"""Saving and loading agents: SB3 zips, and the exported folder (no pickle anywhere).

An SB3 agent zip is a pickle: loading one from a stranger runs their code. The exported
folder is what ``policies.actor_critic.LMActorCritic.save_pretrained`` writes (that module
owns the format): a Hugging Face model folder (``config.json``, safetensors weights, the
tokenizer, the generation config), the value head (``value_head.safetensors``; with a
separate critic, its body in ``critic/``) and a small JSON of what textenv needs to
rebuild the policy around it (``textenv_policy.json``). It loads with
``AutoModelForCausalLM.from_pretrained``, works with ``generate`` and
``pipeline("text-generation")``, a task can name it as its ``model``,
``LMActorCritic.from_pretrained(folder)`` restores the actor-critic, and
``load_agent(folder, env)`` (``load_exported_agent``) starts a textenv agent from it.
A LoRA policy is exported merged (plain weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.type_aliases import GymEnv

from agents import distributed
from agents.envs import resolve_env
from agents.registry import algorithm_class, make_agent
from agents.sharding import policy_sharding, shards_folder
from policies.actor_critic import CRITIC_FOLDER, OPTIONS, VALUE_HEAD_FILE, exported_settings, is_exported_folder
from policies.lm_policy import LMPolicyMixin

# The policy's own arguments that rebuild it around the exported weights (the model path
# becomes the folder; LoRA is merged into it).
EXPORTED_POLICY_ARGUMENTS = ("value_head_init_std", "attn_implementation", "precision", "gradient_checkpointing",
                             "logits_chunk_size", "top_p", "critic", "critic_learning_rate", "compile")


def load_agent(
    path: str, env: GymEnv | str | None = None, algo: str | None = None, **kwargs: Any
) -> BaseAlgorithm:
    """Load a saved agent with the algorithm it was trained with, or continue with another.

    ``path`` may also be a folder written by ``export_policy`` (no pickle): then
    ``load_exported_agent``.

    ``algo=None``: the saved agent as it was (optimizer and KL-controller state included).
    ``algo="a2c"`` (say) for an agent saved by PPO: a new agent of that algorithm whose
    policy (LM body, heads) carries the saved weights; the optimizer starts afresh,
    since its state belongs to the old algorithm's update rule. ``kwargs`` go to the
    new agent (``kl_coef``, ``learning_rate``, ...); its ``policy_kwargs`` are the saved
    ones, under the new class's ``policy_defaults`` (TRPO's eager attention), under the
    ``policy_kwargs`` passed here: what the caller passes wins. ``env`` may be a
    ``VecEnv``, a Gymnasium env or an env id, as for the agent classes.
    """
    if Path(path).is_dir():
        if env is None:
            raise ValueError(f"Starting an agent from the exported folder {path} needs its env: pass env=...")
        return load_exported_agent(path, env, algo, **kwargs)
    data, params, _ = load_from_zip_file(path, load_data=True, custom_objects=kwargs.get("custom_objects"))
    name = (data or {}).get("algorithm_name")
    if name is None:
        raise ValueError(
            f"{path} was not saved by a textenv agent (no algorithm_name). Fix: load it with its own "
            "SB3 class, e.g. stable_baselines3.PPO.load."
        )
    if "policy" not in params and (data or {}).get("parallelism") == "fsdp" and not distributed.is_distributed():
        raise ValueError(f"{path} is a checkpoint of a sharded (FSDP2) run: its weights are in "
                         f"{shards_folder(path)}, which only as many ranks as wrote it can read. Fix: "
                         "resume it with torchrun (as many processes, --fsdp), or load the agent that run saved at "
                         "its end (it holds the whole weights).")
    env = resolve_env(env)
    if algo is None or algo.lower() == name:
        return algorithm_class(name).load(path, env=env, **kwargs)
    target = algorithm_class(algo)
    if env is None:
        raise ValueError(f"Continuing {name} as {algo} needs the environment to train on: pass env=...")
    if not issubclass(data["policy_class"], LMPolicyMixin):
        raise ValueError(f"{path} holds a {data['policy_class'].__name__}, not a textenv LM policy")
    policy_kwargs = {
        **data.get("policy_kwargs", {}),
        **getattr(target, "policy_defaults", {}),
        **(kwargs.pop("policy_kwargs", None) or {}),
    }
    agent = make_agent(algo, env, policy_kwargs=policy_kwargs, **kwargs)
    # A masking policy's copy (NLPO) exists on one side only: it is refreshed from the weights.
    missing, unexpected = agent.policy.load_state_dict(params["policy"], strict=False)
    stray = [key for key in [*missing, *unexpected] if not key.startswith("mask_lm.")]
    if stray:
        raise ValueError(f"{path}'s policy does not fit a {algo} agent: {stray[:5]}")
    if hasattr(agent.policy, "refresh_mask_model"):
        agent.policy.refresh_mask_model()
    return agent


def load_exported_agent(folder: str | Path, env: GymEnv | str, algo: str | None = None, **kwargs: Any) -> BaseAlgorithm:
    """A textenv agent whose policy starts from an exported folder (its LM and value head);
    ``algo`` defaults to the algorithm it was trained with. The optimizer starts afresh."""
    folder = Path(folder)
    if not is_exported_folder(folder):
        raise FileNotFoundError(f"{folder} has no {VALUE_HEAD_FILE}: not a folder written by export_policy. "
                                "Fix: export the agent with agents.saving.export_policy (or textenv-export).")
    saved = exported_settings(folder)
    algo = algo or saved.get("algorithm") or "ppo"
    policy_kwargs = {**saved.get("policy_kwargs", {}), **(kwargs.pop("policy_kwargs", None) or {}),
                     "model_name_or_path": str(folder)}
    if policy_kwargs.get("critic") == "separate":
        policy_kwargs["critic_model_name_or_path"] = str(folder / CRITIC_FOLDER)
    agent = make_agent(algo, env, policy_kwargs=policy_kwargs, **kwargs)
    agent.policy.actor_critic.load_value_head(folder)
    return agent


def export_policy(agent: BaseAlgorithm | str, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write ``agent``'s policy (an agent, or the path of a saved zip you trust) as a Hugging
    Face model folder plus its value head (``LMActorCritic.save_pretrained``); returns the
    folder. The tokenizer defaults to the agent's env's, else the one saved with the
    policy's starting model."""
    if isinstance(agent, (str, Path)):
        agent = load_agent(str(agent))
    policy = agent.policy
    folder = Path(folder)
    actor_critic = policy.actor_critic
    sharding = policy_sharding(policy)
    if sharding is not None:  # FSDP2: every rank gathers the shards; rank 0 writes them whole
        actor_critic = whole_actor_critic(policy, sharding.full_parameters())
        if actor_critic is None:
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or _tokenizer_of(agent)
    constructor = {key: value for key, value in policy._get_constructor_parameters().items()
                   if key in EXPORTED_POLICY_ARGUMENTS}
    return actor_critic.save_pretrained(
        folder, tokenizer, policy_kwargs=constructor, algorithm=getattr(agent, "algorithm_name", None),
        kl_coef=float(agent.kl_controller.value) if hasattr(agent, "kl_controller") else None)


def whole_actor_critic(policy: Any, parameters: dict[str, Any]) -> Any:
    """On rank 0 (the one that ``full_parameters`` gives tensors), an unsharded actor-critic
    built as the policy's was, holding the gathered weights; ``None`` on the other ranks."""
    if "policy" not in parameters:
        return None
    from policies.actor_critic import LMActorCritic

    actor_critic = policy.actor_critic
    options = {key: actor_critic.settings[key] for key in OPTIONS}
    whole = LMActorCritic.from_pretrained(actor_critic.name_or_path, restore_exported=False, **options)
    parts = ("lm.", "lm_head.", "critic_body.", "value_head.")
    whole.load_state_dict({key: value for key, value in parameters["policy"].items() if key.startswith(parts)})
    return whole


def _tokenizer_of(agent: BaseAlgorithm) -> Any:
    from textenv.lm.models import load_tokenizer

    env = agent.get_env()
    if env is not None:
        try:
            return env.get_attr("tokenizer")[0]
        except AttributeError:
            pass
    return load_tokenizer(agent.policy.model_name_or_path)
