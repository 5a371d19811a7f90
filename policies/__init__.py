"""Actor-critic policies on a shared language-model body.

``LMActorCritic`` (``policies.actor_critic``) is the model as a plain ``torch.nn.Module``,
usable without Stable-Baselines3; ``LMActorCriticPolicy`` (``policies.lm_policy``) is the
SB3 policy built on it, imported on first use so that the module alone needs no SB3.
"""

from typing import Any

from policies.actor_critic import LMActorCritic

__all__ = ["LMActorCritic", "LMActorCriticPolicy"]


def __getattr__(name: str) -> Any:
    if name == "LMActorCriticPolicy":
        from policies.lm_policy import LMActorCriticPolicy

        return LMActorCriticPolicy
    raise AttributeError(f"module 'policies' has no attribute {name!r}")
