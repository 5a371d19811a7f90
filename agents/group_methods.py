"""Critic-free methods that compare k completions of the same prompt: RLOO and GRPO.

Owns what makes them group methods: the env in group mode (one prompt per block of
``group_size`` episodes, finished episodes frozen until the next rollout, so a rollout is
exactly one complete episode per slot and needs no critic to bootstrap: ``agents.rollout``
with ``rollout_in_groups``), the group-relative advantage given to every token of an
episode, and the critic-free clipped update (``agents.clipped_update``).

- RLOO (Ahmadian et al., 2024): the return includes the per-token KL penalty, and the
  baseline is the mean return of the *other* k-1 completions (``leave_one_out_advantages``).
- GRPO (Shao et al., 2024): the return is the task score alone, normalised within the
  group (``normalized_group_advantages``); the KL enters the *loss*, per token (k3).

Their options (``agents.settings.GroupSettings``: DAPO's token mean, clip-higher and
dynamic sampling, Dr. GRPO, GSPO, CISPO) are described with their papers in
docs/design.md, "The options in full". A reward's ``None`` leaves that episode out of the
loss and out of its group's baseline (NaN in the returns); a group with a single judged
member has no baseline: its advantage is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv

from agents import distributed
from agents.algorithms import PPO_DEFAULTS, LMAgentMixin
from agents.clipped_update import ImportanceLevel, LossAggregation, PolicyLoss, clipped_update
from agents.sequence_buffer import SequenceRolloutBuffer
from agents.settings import GroupSettings
from textenv.vector import BatchedTokenVecEnv

GROUP_DEFAULTS: dict[str, Any] = {
    **PPO_DEFAULTS,
    "vf_coef": 0.0,  # no critic: the group is the baseline
    "n_epochs": 2,
}


class GroupRolloutMixin(LMAgentMixin):
    """One rollout = one complete episode in every slot, k slots per prompt; a
    critic-free clipped update (the value head is neither trained nor logged).

    :param group_size: completions drawn per prompt (k).
    :param loss_aggregation: ``"token_mean"`` (DAPO, the default), ``"sequence_mean"``
        (GRPO) or ``"sequence_sum_normalized"`` (Dr. GRPO); see ``aggregate_token_losses``.
        Data-parallel training takes ``"token_mean"`` only.
    :param clip_range_high: DAPO's clip-higher upper bound (``1 + clip_range_high``);
        ``None``: ``clip_range``, symmetric.
    :param policy_loss: ``"clip"`` (PPO's clipped surrogate, the default) or ``"cispo"``
        (MiniMax-M1, 2025: the clipped importance weight, a constant, times ``A log pi``).
    :param importance_level: ``"token"`` (each token's ratio, the default) or ``"sequence"``
        (GSPO, Zheng et al., 2025: the sequence's geometric-mean ratio, clipped per sequence).
    :param filter_groups: leave out of the loss the groups whose judged task scores are all
        equal (DAPO's dynamic sampling, Yu et al., 2025); counted in ``rollout/filtered_groups``.
    """

    rollout_in_groups = True  # agents.rollout: one complete episode per slot, k slots per prompt
    default_advantage_normalization = "none"  # advantages are already relative to the group
    trains_value_head = False
    supports_kl_in_loss = True

    def __init__(self, policy: Any = None, env: VecEnv | str | None = None, group_size: int = 4,
                 loss_aggregation: LossAggregation = "token_mean", clip_range_high: float | None = None,
                 policy_loss: PolicyLoss = "clip", importance_level: ImportanceLevel = "token",
                 filter_groups: bool = False, **kwargs: Any):
        self.group_settings = GroupSettings(group_size, loss_aggregation, clip_range_high, policy_loss,
                                            importance_level, filter_groups)
        if loss_aggregation != "token_mean" and distributed.is_distributed():
            # DDP weights each rank's gradient by its share of the tokens: exact for a token mean only.
            raise ValueError(f"loss_aggregation={loss_aggregation!r} is not a mean over the minibatch's tokens, "
                             "which is what data-parallel training combines across ranks exactly. Fix: use "
                             "loss_aggregation='token_mean' under torchrun, or run one process.")
        env = self._resolve_env(env, kwargs)  # an env id becomes the batched env, on the agent's device
        if env is not None:
            self._check_group_env(env)
            if kwargs.get("_init_setup_model", True):  # a new agent: refuse a bad group before the model loads
                self.group_settings.check_divides(env.num_envs, type(self).algorithm_name)
                env.configure_episodes(group_size=group_size, autoreset=False)
            kwargs["n_steps"] = env.max_new_tokens  # every episode ends within max_new_tokens
        kwargs.setdefault("rollout_buffer_class", SequenceRolloutBuffer)
        super().__init__(policy, env, **kwargs)

    # The settings' fields, where the update and the rollout read them.
    group_size = property(lambda self: self.group_settings.group_size)
    loss_aggregation = property(lambda self: self.group_settings.loss_aggregation)
    clip_range_high = property(lambda self: self.group_settings.clip_range_high)
    policy_loss = property(lambda self: self.group_settings.policy_loss)
    importance_level = property(lambda self: self.group_settings.importance_level)
    filter_groups = property(lambda self: self.group_settings.filter_groups)

    def _check_group_env(self, env: VecEnv) -> None:
        if not isinstance(env, BatchedTokenVecEnv):
            raise TypeError(
                f"{type(self).algorithm_name} draws k completions per prompt, which needs the batched "
                "environment. Fix: make it with agents.make_text_vec_env(..., batched=True)."
            )

    def _setup_model(self) -> None:
        """SB3's set-up, then the env into group mode with this agent's ``group_size``. Here
        rather than in ``__init__``: SB3's ``load`` builds the agent without its saved
        arguments and restores them just before this call, so the saved group size is the
        one that configures the env."""
        super()._setup_model()
        if isinstance(self.rollout_buffer, SequenceRolloutBuffer):  # a group's completions share its prompt
            self.rollout_buffer.shares_prompts = True
        if self.env is not None:
            self.env.configure_episodes(group_size=self.group_size, autoreset=False)

    def set_env(self, env: Any, force_reset: bool = True) -> None:
        """SB3's ``set_env``, with the new env in this agent's group mode."""
        super().set_env(env, force_reset)
        self._check_group_env(self.env)
        self.env.configure_episodes(group_size=self.group_size, autoreset=False)

    def set_group_advantages(self, buffer: SequenceRolloutBuffer) -> None:
        """``finish_rollout``'s advantage step: with ``filter_groups``, the groups without signal
        left out first; then every token of an episode gets its episode's group-relative
        advantage (``group_advantages`` of the returns of the group's members in the loss)."""
        if self.filter_groups:
            self._filter_uniform_groups(buffer)
        self._set_group_advantages(buffer)

    def _filter_uniform_groups(self, buffer: SequenceRolloutBuffer) -> None:
        """Leave out of the loss every group whose judged task scores are all equal (no signal:
        DAPO's dynamic sampling, without drawing new groups); log how many, over every rank."""
        scores = np.full(buffer.n_envs, np.nan)
        for (env, _, _), score, in_loss in zip(buffer.segment_spans, buffer.segment_scores, buffer.segment_in_loss):
            if in_loss and score is not None:
                scores[env] = score
        groups = scores.reshape(-1, self.group_size)
        uniform = np.array([np.unique(group[~np.isnan(group)]).size <= 1 for group in groups])
        uniform_envs = np.repeat(uniform, self.group_size)
        buffer.leave_out(np.array([segment for segment, (env, _, _) in enumerate(buffer.segment_spans)
                                   if uniform_envs[env]], dtype=np.int64))
        n_filtered, n_groups = distributed.global_sums([int(uniform.sum()), len(groups)])
        self.logger.record("rollout/filtered_groups", int(n_filtered))
        self.logger.record("rollout/filtered_group_fraction", float(n_filtered / n_groups))

    def _set_group_advantages(self, buffer: SequenceRolloutBuffer) -> None:
        """Every token of an episode gets its episode's group-relative advantage, from the
        returns of the group's members in the loss (NaN for the others: not judged, filtered)."""
        returns = np.full(buffer.n_envs, np.nan)
        for (env, first, last), in_loss in zip(buffer.segment_spans, buffer.segment_in_loss):
            if in_loss:
                returns[env] = buffer.rewards[first : last + 1, env].sum()
        advantages = self.group_advantages(returns.reshape(-1, self.group_size)).reshape(-1)
        buffer.advantages[:] = 0.0
        for env, first, last in buffer.segment_spans:
            buffer.advantages[first : last + 1, env] = advantages[env]
        buffer.returns[:] = buffer.advantages  # unused: there is no critic to regress onto returns

    def _update(self) -> None:
        """SB3's ``PPO.train`` without the value term, plus the KL term where it is in the loss
        (GRPO's default), with this agent's loss options (``clipped_update``)."""
        clipped_update(self, self.loss_aggregation, self.clip_range_high, self.policy_loss, self.importance_level,
                       max_new_tokens=self.env.max_new_tokens)

    def group_advantages(self, returns: np.ndarray) -> np.ndarray:
        """``(n_groups, k)`` episode returns (NaN: a member out of the loss) -> advantages
        (0 for those members), with this agent's options."""
        raise NotImplementedError


def judged_members(returns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``(n_groups, k)`` returns with NaN where a member is out of the loss: which members
    count, how many per group and their sum per group (both ``(n_groups, 1)``)."""
    judged = ~np.isnan(returns)
    return judged, judged.sum(axis=1, keepdims=True), np.where(judged, returns, 0.0).sum(axis=1, keepdims=True)


class LMRLOO(GroupRolloutMixin, PPO):
    """REINFORCE leave-one-out: k completions per prompt, the others' mean as baseline."""

    algorithm_name = "rloo"
    defaults = GROUP_DEFAULTS

    def group_advantages(self, returns: np.ndarray) -> np.ndarray:
        return leave_one_out_advantages(returns)


class LMGRPO(GroupRolloutMixin, PPO):
    """Group-relative policy optimisation: normalised group advantages, KL in the loss.

    :param scale_rewards: divide each group's centred returns by the group's std (GRPO);
        ``False``: centre only (Dr. GRPO).
    """

    algorithm_name = "grpo"
    defaults = GROUP_DEFAULTS
    default_kl_placement = "loss"  # GRPO puts the KL into the loss (k3 unless kl_estimator says otherwise)
    default_kl_coef = 0.3  # per-token k3 KL in the loss: 0.05 let the KL run to ~14 nats/episode here

    def __init__(self, policy: Any = None, env: VecEnv | str | None = None, scale_rewards: bool = True,
                 **kwargs: Any):
        if not isinstance(scale_rewards, bool):
            raise ValueError(f"scale_rewards must be True (GRPO) or False (Dr. GRPO), got {scale_rewards!r}")
        self.scale_rewards = scale_rewards
        super().__init__(policy, env, **kwargs)

    def group_advantages(self, returns: np.ndarray) -> np.ndarray:
        return normalized_group_advantages(returns, scale_rewards=self.scale_rewards)


def leave_one_out_advantages(returns: np.ndarray) -> np.ndarray:
    """RLOO: each judged member's return minus the mean of the group's other judged members
    (``(n_groups, k)``, NaN for members out of the loss, whose advantage is 0)."""
    judged, n_judged, total = judged_members(returns)
    leave_one_out_mean = (total - returns) / np.maximum(n_judged - 1, 1)  # over the other judged members
    return np.where(judged & (n_judged > 1), returns - leave_one_out_mean, 0.0)


def normalized_group_advantages(returns: np.ndarray, scale_rewards: bool = True) -> np.ndarray:
    """GRPO: each judged member's return centred on its group's mean and divided by the group's
    std (``scale_rewards=False``, Dr. GRPO: centred only); NaN members get 0."""
    judged, n_judged, total = judged_members(returns)  # mean and std over the judged members
    centred = np.where(judged, returns - total / np.maximum(n_judged, 1), 0.0)
    if not scale_rewards:  # Dr. GRPO
        return centred
    std = np.sqrt((centred**2).sum(axis=1, keepdims=True) / np.maximum(n_judged - 1, 1))
    return centred / (std + 1e-4)
