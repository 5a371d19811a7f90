"""SB3 algorithms set up for language models.

``LMPPO``, ``LMA2C`` and ``LMTRPO`` are stock SB3 ``PPO``/``A2C`` and sb3-contrib's
``TRPO`` with four additions (all in ``LMAgentMixin``):
- the fast path (``fast=True``, the default): KV-cached rollouts
  (``agents.fast_rollout``) and an update that evaluates whole sequences
  (``agents.sequence_buffer``); ``fast=False`` is SB3's own per-transition path;
- ``kl_controller``: the KL coefficient (fixed or adaptive), an attribute of the
  agent so that ``model.save`` stores its state and ``load`` restores it;
- ``learn`` puts the ``KLPenaltyCallback`` first in the callback chain, so every
  stored reward carries the per-token KL penalty;
- ``advantage_normalization``: advantages are standardised once over the whole
  rollout (``"rollout"``, as TRL and OpenRLHF do), not per minibatch as SB3 does
  (``"minibatch"``): a minibatch of whole sequences holds only a few episodes, and
  with a score at the last token the best of any three episodes always looks good;
- defaults suited to token-level RL (``gamma=1``: the score arrives at the last
  token and must reach the first undiscounted; small learning rate for a
  pretrained body).
"""

from __future__ import annotations

from typing import Any, Literal

from sb3_contrib import TRPO, MaskablePPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.vec_env import VecEnv

from agents.fast_rollout import FastRolloutMixin
from agents.kl_control import make_kl_controller
from agents.kl_penalty import KLPenaltyCallback
from agents.sequence_buffer import SequenceRolloutBuffer, normalize_rollout_advantages
from policies import LMActorCriticPolicy
from policies.masked import TopPMaskedLMPolicy

PPO_DEFAULTS: dict[str, Any] = dict(
    learning_rate=2e-4,
    n_steps=64,
    batch_size=64,
    n_epochs=4,
    gamma=1.0,
    gae_lambda=0.95,
    clip_range=0.2,
    ent_coef=0.0,
    vf_coef=0.5,
    max_grad_norm=1.0,
)
A2C_DEFAULTS: dict[str, Any] = dict(
    learning_rate=5e-4,  # one step per rollout; 5e-5 barely moved the default task in 16k tokens
    n_steps=20,
    gamma=1.0,
    gae_lambda=0.95,
    ent_coef=0.0,
    vf_coef=0.5,
    max_grad_norm=1.0,
    # RMSprop (SB3's A2C default) with a pretrained transformer is unstable; use Adam.
    use_rms_prop=False,
)


TRPO_DEFAULTS: dict[str, Any] = dict(
    learning_rate=1e-3,  # the critic's optimizer; the actor moves by the trust-region step
    n_steps=64,
    batch_size=64,
    gamma=1.0,
    gae_lambda=0.95,
    target_kl=0.01,  # trust region: mean per-token KL(old || new) of one update
    cg_max_steps=10,
    n_critic_updates=5,
)


AdvantageNormalization = Literal["rollout", "minibatch", "none"]
ADVANTAGE_NORMALIZATIONS = ("rollout", "minibatch", "none")
# SB3 keywords that textenv agents replace with their own, and what replaces them.
REPLACED_KEYWORDS = {
    "normalize_advantage": "advantage_normalization='minibatch' for SB3's behaviour ('rollout', the "
    "default, standardises over the whole rollout; 'none' not at all)",
}


def refuse_replaced_keywords(kwargs: dict[str, Any]) -> None:
    """A clear error for an SB3 keyword that a textenv agent replaces (``REPLACED_KEYWORDS``)."""
    for key in kwargs:
        if key in REPLACED_KEYWORDS:
            raise ValueError(f"textenv agents do not take SB3's {key}. Fix: pass {REPLACED_KEYWORDS[key]}.")


class LMAgentMixin(FastRolloutMixin):
    """What every textenv agent adds to its SB3 algorithm (see the module doc)."""

    algorithm_name: str
    defaults: dict[str, Any] = {}
    default_advantage_normalization: AdvantageNormalization = "rollout"
    kl_in_reward = True  # the KL penalty goes into the rewards (False: the algorithm's loss has it)
    default_kl_coef = 0.05
    default_policy_class: type = LMActorCriticPolicy

    def __init__(
        self,
        policy: Any = None,
        env: VecEnv | str | None = None,
        kl_coef: float | None = None,
        kl_target: float | None = None,
        kl_horizon: int = 10_000,
        fast: bool = True,
        advantage_normalization: AdvantageNormalization | None = None,
        **kwargs: Any,
    ):
        kl_coef = self.default_kl_coef if kl_coef is None else kl_coef
        self.kl_controller = make_kl_controller(kl_coef, kl_target, kl_horizon)
        # An instance attribute, so that save() stores it and load_agent() finds the class.
        self.algorithm_name = type(self).algorithm_name
        refuse_replaced_keywords(kwargs)
        kwargs = {**self.defaults, **kwargs}
        if advantage_normalization is None:
            advantage_normalization = self.default_advantage_normalization
        if advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(
                f"advantage_normalization must be one of {ADVANTAGE_NORMALIZATIONS}, got {advantage_normalization!r}"
            )
        self.advantage_normalization = advantage_normalization
        # SB3's own switch standardises each minibatch; the rollout-wide one is ours.
        kwargs["normalize_advantage"] = advantage_normalization == "minibatch"
        policy = policy or self.default_policy_class
        if fast:  # the fast path is a choice of rollout buffer; SB3's own otherwise
            kwargs.setdefault("rollout_buffer_class", SequenceRolloutBuffer)
        super().__init__(policy, env, **kwargs)

    def collect_rollouts(self, env: VecEnv, callback: Any, rollout_buffer: Any, n_rollout_steps: int, **kwargs: Any) -> bool:
        """SB3's (or the fast path's) rollout, then the rollout-wide advantage standardisation."""
        if not super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps):
            return False
        self._normalize_advantages(rollout_buffer)
        return True

    def _normalize_advantages(self, rollout_buffer: Any) -> None:
        """With ``advantage_normalization="rollout"``: standardise over the whole rollout."""
        if self.advantage_normalization == "rollout":
            normalize_rollout_advantages(rollout_buffer)

    def learn(self, total_timesteps: int, callback: Any = None, **kwargs: Any):
        # A rollout of an LM is expensive: log every one (SB3's A2C default is every 100th).
        kwargs.setdefault("log_interval", 1)
        user_callbacks = callback if isinstance(callback, list) else [callback] if callback else []
        kl_callback = KLPenaltyCallback(add_to_reward=self.kl_in_reward)
        return super().learn(total_timesteps, callback=[kl_callback, *user_callbacks], **kwargs)  # type: ignore[misc]


class LMPPO(LMAgentMixin, PPO):
    """PPO with the per-token KL penalty toward the reference model."""

    algorithm_name = "ppo"
    defaults = PPO_DEFAULTS


class LMA2C(LMAgentMixin, A2C):
    """A2C with the per-token KL penalty toward the reference model."""

    algorithm_name = "a2c"
    defaults = A2C_DEFAULTS
    default_advantage_normalization = "none"  # SB3's A2C default: raw advantages


class LMTRPO(LMAgentMixin, TRPO):
    """TRPO (sb3-contrib) with the per-token KL penalty toward the reference model.

    The natural-gradient step needs Hessian-vector products, i.e. a double backward
    through the LM: ``make_agent`` therefore loads the body with ``eager`` attention
    (PyTorch's fused SDPA kernels have no second derivative). The shared body moves
    only with the trust-region step; the critic's updates touch the value head only
    (sb3-contrib drops their gradients on actor parameters).
    """

    algorithm_name = "trpo"
    defaults = TRPO_DEFAULTS
    policy_defaults = {"attn_implementation": "eager"}


class LMNLPO(LMAgentMixin, MaskablePPO):
    """NLPO: PPO restricted to the top-p tokens of a periodically refreshed masking policy.

    Built on sb3-contrib's ``MaskablePPO`` (its update and masked distributions) with
    ``policies.masked.TopPMaskedLMPolicy``. Masks come from the masking model, in the
    rollout and again in the update, so none is stored (see that module).

    :param mask_update_interval: rollouts between refreshes of the masking policy
        (RL4LMs' ``update_mask_freq``).
    """

    algorithm_name = "nlpo"
    defaults = PPO_DEFAULTS
    default_policy_class = TopPMaskedLMPolicy

    def __init__(self, policy: Any = None, env: VecEnv | str | None = None, mask_update_interval: int = 5,
                 fast: bool = True, **kwargs: Any):
        if not fast:
            raise ValueError("NLPO computes its masks from the masking model on the fast path only: use fast=True")
        if mask_update_interval < 1:
            raise ValueError(f"mask_update_interval must be at least 1, got {mask_update_interval}")
        self.mask_update_interval = mask_update_interval
        self.rollouts_since_mask_update = 0
        super().__init__(policy, env, fast=fast, **kwargs)

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int, use_masking: bool = True) -> bool:
        if self.rollouts_since_mask_update % self.mask_update_interval == 0:
            self.policy.refresh_mask_model()
            self.rollouts_since_mask_update = 0
        self.rollouts_since_mask_update += 1
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
