"""Actor-critic policies on a shared language-model body."""

from policies.lm_policy import LMActorCriticPolicy

__all__ = ["LMActorCriticPolicy"]
