"""SB3 algorithms set up for language models: ``LMPPO``, ``LMA2C``, ``LMTRPO``, ``LMNLPO``.

The class is the whole API: ``LMPPO(env=...)`` accepts what SB3 accepts as ``env`` (or an
env id: ``agents.envs.resolve_env``) and starts its policy from the environment's
reference model unless ``policy_kwargs["model_name_or_path"]`` says otherwise; the user's
arguments win over the class's ``defaults`` and ``policy_defaults``.

``LMAgentMixin`` owns what every textenv agent adds to its SB3 algorithm: its options
parsed into ``agents.settings`` (the KL penalty, the rollout), the KL coefficient's
controller (an attribute, so that ``save`` stores its state), the fast path's rollout
and post-rollout steps (``agents.rollout``), one ``train`` guard around the algorithm's
update, defaults suited to token-level RL (``gamma=1``: the score arrives at the last
token and must reach the first undiscounted; a small learning rate for a pretrained
body), atomic saves, and the resolved configuration written to TensorBoard at every
``learn`` (``agents.config``). Advantages are standardised over the whole rollout by
default, not per minibatch as SB3 does: a minibatch of whole sequences holds only a few
episodes, and with a score at the last token the best of any three always looks good.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from sb3_contrib import TRPO, MaskablePPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv

from agents import distributed
from agents.clipped_update import PolicyLoss, check_policy_loss, clipped_update
from agents.config import env_id_of, log_config
from agents.envs import env_device, resolve_env
from agents.kl_penalty import KLEstimator, KLPenaltyCallback
from agents.rollout import RolloutMixin
from agents.settings import AdvantageNormalization, KLPlacement, KLSettings, RolloutSettings, settings_fields
from agents.progress import TokenProgressBar
from agents.sequence_buffer import SequenceRolloutBuffer
from agents.sharding import (
    Parallelism, ShardedEvaluation, all_gathered, check_parallelism, policy_sharding, shard_reference,
)
from policies import LMActorCriticPolicy
from policies.lm_policy import LMPolicyMixin
from policies.masked import TopPMaskedLMPolicy
from textenv.files import atomic_write
from textenv.rewards import is_skipped
from textenv.vector import BatchedTokenVecEnv

# The KL penalty's defaults, one set for the Python API and the scripts (which pass
# only what their user gives), from ``KLSettings``: beta adapted toward 4 nats of KL per
# episode, from 0.05 (an algorithm may start elsewhere: ``default_kl_coef``), moving by
# about exp(+-0.2) in every twentieth of the run (``agents.kl_control``; kl_horizon=N: per
# N episodes, Ziegler et al.'s horizon).
KL_DEFAULTS: dict[str, Any] = {name: settings_fields(KLSettings)[name] for name in ("kl_coef", "kl_target", "kl_horizon")}

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


# SB3 keywords that textenv agents replace with their own, and what replaces them.
REPLACED_KEYWORDS = {
    "normalize_advantage": "advantage_normalization='minibatch' for SB3's behaviour ('rollout', the "
    "default, standardises over the whole rollout; 'none' not at all)",
}


def reference_model_of(env: VecEnv) -> str:
    """The name or path of the environment's reference model (where the policy starts),
    or a ``ValueError`` naming the fix when the environment cannot say."""
    try:
        name = env.get_attr("model_name_or_path")[0]
    except AttributeError:
        raise ValueError(
            "The environment does not say which model it scores with (no model_name_or_path), so the "
            "policy cannot start from it. Fix: pass policy_kwargs={'model_name_or_path': <name or path>}."
        ) from None
    if not name:
        raise ValueError(
            "The environment's reference model was given as an instance, so the "
            "policy cannot start from it by name. Fix: pass "
            "policy_kwargs={'model_name_or_path': <name or path>}."
        )
    return str(name)


def warn_if_env_elsewhere(env: VecEnv | None, device: torch.device) -> None:
    """A policy on the GPU with its env's reference model on the CPU still trains (each step's
    observation is copied over) but the reference decode runs on the CPU: say so, with the fix."""
    where = env_device(env) if env is not None else None
    if where is not None and where.type != device.type:
        warnings.warn(
            f"The environment runs its reference and reward models on {where} while the policy is on {device}. "
            f"Fix: build the env with device={device.type!r} (make_text_vec_env(..., env_kwargs={{'device': "
            f"{device.type!r}}})), or pass the env id and let the agent build it.",
            UserWarning,
            stacklevel=3,
        )


def stores_sequences(fast: bool, kwargs: dict[str, Any]) -> bool:
    """Whether the agent's rollout buffer will be the fast path's ``SequenceRolloutBuffer``
    (whole sequences, the reference's log-probs, segments that can be left out of the loss)."""
    buffer_class = kwargs.get("rollout_buffer_class") or (SequenceRolloutBuffer if fast else None)
    return isinstance(buffer_class, type) and issubclass(buffer_class, SequenceRolloutBuffer)


def contains_callback(callback: Any, kind: type) -> bool:
    """Whether ``callback`` is a ``kind``, or a ``CallbackList`` holding one."""
    if isinstance(callback, kind):
        return True
    return any(contains_callback(child, kind) for child in getattr(callback, "callbacks", []))


def adopt_flat_settings(agent: Any) -> None:
    """Settings given as flat attributes (SB3's ``load(path, env, deferred_reference=False)``
    puts its keywords into the agent's ``__dict__``, as it does an agent saved before the
    settings were dataclasses) go into the agent's settings, checked again."""
    for name in ("kl_settings", "rollout_settings", "group_settings"):
        settings = agent.__dict__.get(name)
        if settings is None:
            continue
        given = {item.name: agent.__dict__.pop(item.name) for item in fields(settings) if item.name in agent.__dict__}
        if given:
            agent.__dict__[name] = replace(settings, **given)


def refuse_replaced_keywords(kwargs: dict[str, Any]) -> None:
    """A clear error for an SB3 keyword that a textenv agent replaces (``REPLACED_KEYWORDS``)."""
    for key in kwargs:
        if key in REPLACED_KEYWORDS:
            raise ValueError(f"textenv agents do not take SB3's {key}. Fix: pass {REPLACED_KEYWORDS[key]}.")


class LMAgentMixin(RolloutMixin):
    """What every textenv agent adds to its SB3 algorithm (see the module doc).

    :param env: a ``VecEnv``, a Gymnasium env or an env id (``agents.envs.resolve_env``).
    :param kl_coef: the KL coefficient beta (its initial value when adaptive); ``None``:
        the algorithm's ``default_kl_coef`` (0.05; GRPO 0.3).
    :param kl_target: the per-episode KL that the adaptive controller steers beta toward
        (``KL_DEFAULTS``); ``None`` keeps beta fixed.
    :param kl_horizon: the adaptive controller's horizon in episodes, as Ziegler et al.'s;
        ``None`` (``KL_DEFAULTS``): a twentieth of the run's tokens (``agents.kl_control``).
    :param kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``, the per-token estimator of
        KL(pi || ref) (``agents.kl_penalty.kl_estimate``: their biases and gradients);
        ``None``: k1 in the reward, k3 in the loss.
    :param kl_placement: ``"reward"`` (a per-token penalty in the rewards, Ziegler et al.)
        or ``"loss"`` (``beta * KL`` added to the update's loss, as GRPO); ``None``: the
        algorithm's ``default_kl_placement`` (GRPO "loss", the others "reward"). "loss"
        needs an update with a place for it (``supports_kl_in_loss``) and the fast path.
    :param fast: the KV-cached rollout and whole-sequence update (``False``: SB3's own path).
    :param advantage_normalization: ``"rollout"``, ``"minibatch"`` or ``"none"`` (module doc);
        ``None``: the algorithm's default.
    :param precision: the policy's ``"fp32"`` (default), ``"bf16-mixed"`` or ``"bf16"``
        (``policies.lm_policy``); the same as ``policy_kwargs={"precision": ...}``.
    :param critic: ``"shared"`` (the value head on the policy's body, default) or
        ``"separate"`` (its own body: PPO and A2C); the same as ``policy_kwargs={"critic": ...}``,
        where ``critic_model_name_or_path`` and ``critic_learning_rate`` configure it.
    :param recompute_old_log_probs: after each rollout, replace the KV-cached decode's
        log-probs with one teacher-forced pass (``SequenceRolloutBuffer.recompute_log_probs``);
        ``None``: on under bf16 precisions (where the two paths differ by bf16 rounding,
        up to 0.06 in log-prob), off under fp32 (they agree within 1e-5). Fast path only.
    :param deferred_reference: on the fast path with the batched env, score the reference
        in one teacher-forced pass after each rollout instead of decoding it token by token
        alongside the policy (``agents.rollout``); the rewards are the same.
    :param parallelism: under ``torchrun``, ``"ddp"`` (default: a whole copy of the weights,
        gradients and optimizer state per rank, ``agents.distributed``) or ``"fsdp"`` (FSDP2
        shards of them, ``agents.sharding``); one process ignores it.
    :param kwargs: the SB3 algorithm's own arguments, over the class's ``defaults``;
        ``policy_kwargs`` over the class's ``policy_defaults``.
    """

    algorithm_name: str
    defaults: dict[str, Any] = {}
    policy_defaults: dict[str, Any] = {}  # under the user's policy_kwargs (TRPO: eager attention)
    default_advantage_normalization: AdvantageNormalization = "rollout"
    default_kl_placement: KLPlacement = "reward"
    #: Whether the update has a place for ``kl_placement="loss"``: PPO and the group methods
    #: (``agents.clipped_update``); A2C, TRPO and NLPO run their library's update.
    supports_kl_in_loss = False
    default_kl_coef = KL_DEFAULTS["kl_coef"]
    default_policy_class: type = LMActorCriticPolicy
    #: Trains data-parallel under torchrun (``agents.distributed``); TRPO's line search and
    #: NLPO's masked update are not synchronised across ranks.
    supports_data_parallel = True
    trains_value_head = True  # False for critic-free methods: DDP must then expect unused parameters
    supports_separate_critic = False  # policy_kwargs={"critic": "separate"}: PPO and A2C

    def __init__(
        self,
        policy: Any = None,
        env: GymEnv | str | None = None,
        kl_coef: float | None = None,
        kl_target: float | None = KL_DEFAULTS["kl_target"],
        kl_horizon: int | None = KL_DEFAULTS["kl_horizon"],
        kl_estimator: KLEstimator | None = None,
        kl_placement: KLPlacement | None = None,
        fast: bool = True,
        advantage_normalization: AdvantageNormalization | None = None,
        precision: str | None = None,
        critic: str | None = None,
        recompute_old_log_probs: bool | None = None,
        deferred_reference: bool = True,
        parallelism: Parallelism = "ddp",
        **kwargs: Any,
    ):
        check_parallelism(parallelism)
        self.parallelism = parallelism
        if distributed.is_distributed():
            kwargs = self._data_parallel_kwargs(fast, kwargs)
        refuse_replaced_keywords(kwargs)
        # The flat keywords, parsed once into the settings (agents.settings), which check them.
        self.kl_settings = KLSettings.with_defaults(kl_coef, kl_target, kl_horizon, kl_estimator, kl_placement,
                                                    self.default_kl_coef, self.default_kl_placement)
        self.rollout_settings = RolloutSettings(
            fast=fast, advantage_normalization=advantage_normalization or self.default_advantage_normalization,
            recompute_old_log_probs=recompute_old_log_probs, deferred_reference=deferred_reference)
        self._check_settings(kwargs)
        self.kl_controller = self.kl_settings.controller()
        # An instance attribute, so that save() stores it and load_agent() finds the class.
        self.algorithm_name = type(self).algorithm_name
        policy = policy or self.default_policy_class
        env = self._resolve_env(env, kwargs)
        # Saved with the agent, so that textenv-evaluate finds the task it was trained on
        # (load() puts the saved id over this one).
        self.env_id = env_id_of(env)
        if distributed.is_distributed() and env is not None and kwargs.get("seed") is not None:
            # Each rank its own samples; SB3 seeds env i with seed + i, so rank r's envs get the
            # seeds of envs r*n_envs ... of one process running all ranks' envs (as make_text_vec_env).
            kwargs["seed"] = kwargs["seed"] + distributed.rank() * env.num_envs
        if precision is not None:
            kwargs["policy_kwargs"] = {**(kwargs.get("policy_kwargs") or {}), "precision": precision}
        if critic is not None:
            kwargs["policy_kwargs"] = {**(kwargs.get("policy_kwargs") or {}), "critic": critic}
        if kwargs.get("_init_setup_model", True):  # (load() restores the saved policy_kwargs instead)
            kwargs["policy_kwargs"] = self._resolve_policy_kwargs(policy, env, kwargs.get("policy_kwargs"))
            if kwargs["policy_kwargs"].get("critic", "shared") != "shared" and not self.supports_separate_critic:
                raise ValueError(f"{type(self).algorithm_name} cannot use a separate critic (it has no critic to "
                                 "train on its own, or its update trains the value head alone). Fix: use "
                                 "critic='separate' with ppo or a2c, or leave critic='shared'.")
        kwargs = {**self.defaults, **kwargs}
        if fast:  # the fast path is a choice of rollout buffer; SB3's own otherwise
            kwargs.setdefault("rollout_buffer_class", SequenceRolloutBuffer)
        # The SB3 algorithm's own arguments as resolved, for agents.config.resolved_config.
        self._init_kwargs = {key: value for key, value in kwargs.items() if not key.startswith("_")}
        # SB3's own switch standardises each minibatch; the rollout-wide one is ours.
        kwargs["normalize_advantage"] = self.advantage_normalization == "minibatch"
        super().__init__(policy, env, **kwargs)
        warn_if_env_elsewhere(self.env, self.device)

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        """SB3's ``set_env``; the agent trains on this env from now on, so its id is saved."""
        super().set_env(env, force_reset)
        self.env_id = env_id_of(self.env) or self.env_id

    @staticmethod
    def _resolve_env(env: GymEnv | str | None, kwargs: dict[str, Any]) -> VecEnv | None:
        """``env`` as a ``VecEnv`` (``agents.envs.resolve_env``); an env id is built with the
        agent's seed and on the agent's ``device``, so its reference and reward models sit
        where the policy does."""
        return resolve_env(env, seed=kwargs.get("seed"), verbose=kwargs.get("verbose", 0),
                           device=kwargs.get("device", "auto"))

    def _check_settings(self, kwargs: dict[str, Any]) -> None:
        """Refuse, naming the fix, settings this algorithm's update cannot run (the settings'
        own values are checked where they are made, ``agents.settings``)."""
        name = type(self).algorithm_name
        if self.kl_placement == "loss" and not self.supports_kl_in_loss:
            raise ValueError(f"{name} runs its library's own update, which has no place for a KL term. Fix: use "
                             "kl_placement='reward' (any kl_estimator), or ppo, rloo or grpo for the KL in the loss.")
        if self.kl_placement == "loss" and not stores_sequences(self.rollout_settings.fast, kwargs):
            raise ValueError("kl_placement='loss' needs the reference's log-prob of each token in the update, which "
                             "only the fast path's buffer keeps. Fix: drop fast=False (and rollout_buffer_class).")

    # The settings' fields, read where the agent's code and SB3's callbacks look for them.
    kl_placement = property(lambda self: self.kl_settings.kl_placement)
    kl_estimator = property(lambda self: self.kl_settings.kl_estimator)
    advantage_normalization = property(lambda self: self.rollout_settings.advantage_normalization)
    recompute_old_log_probs = property(lambda self: self.rollout_settings.recompute_old_log_probs)
    deferred_reference = property(lambda self: self.rollout_settings.deferred_reference)

    def _data_parallel_kwargs(self, fast: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Under torchrun: refuse what is not synchronised across ranks; only rank 0 prints."""
        name = type(self).algorithm_name
        if not self.supports_data_parallel:
            raise ValueError(f"{name} does not train data-parallel (its update is not synchronised across ranks). "
                             "Fix: use ppo, a2c, rloo or grpo under torchrun, or run one process.")
        if not fast:
            raise ValueError("Data-parallel training runs the fast path only. Fix: drop fast=False under torchrun.")
        if kwargs.get("target_kl") is not None:
            raise ValueError("target_kl stops an epoch early on one rank's own estimate, which would leave the "
                             "ranks running different numbers of updates. Fix: drop target_kl under torchrun.")
        kwargs = dict(kwargs)
        if not distributed.is_main_process():
            kwargs["verbose"] = 0
        return kwargs

    def _resolve_policy_kwargs(self, policy: Any, env: VecEnv | None, policy_kwargs: dict | None) -> dict[str, Any]:
        """The user's ``policy_kwargs`` over the class's ``policy_defaults``; an LM policy
        starts from the environment's reference model unless they name a model."""
        if not (isinstance(policy, type) and issubclass(policy, LMPolicyMixin)):
            return dict(policy_kwargs or {})  # not an LM policy: SB3's business
        policy_kwargs = {**self.policy_defaults, **(policy_kwargs or {})}
        if "model_name_or_path" not in policy_kwargs and env is not None:
            policy_kwargs["model_name_or_path"] = reference_model_of(env)
        return policy_kwargs

    def train(self) -> None:
        """The algorithm's update (``_update``; none when every episode was left out of the
        loss); then how many of its steps were skipped for NaN/inf gradients so far
        (``policies.guarded_optimizer``)."""
        if self._has_samples_to_train():
            if isinstance(self.policy, LMPolicyMixin):  # no entropy term in the loss: no graph for it
                self.policy.entropy_gradient = float(getattr(self, "ent_coef", 0.0)) != 0.0
            self._update()
        self.logger.record("train/skipped_updates", getattr(self.policy.optimizer, "skipped_steps", 0))

    def _update(self) -> None:
        """One update on the stored rollout: the SB3 algorithm's own ``train``."""
        super().train()  # type: ignore[misc]

    def _has_samples_to_train(self) -> bool:
        """Whether the rollout holds segments in the loss on every rank (a reward's ``None``
        and group filtering leave episodes out: ``agents.sequence_buffer``). Where a rank has
        none, every rank skips the update, so that they run the same backward passes."""
        if not isinstance(self.rollout_buffer, SequenceRolloutBuffer):
            return True
        return distributed.global_min(len(self.rollout_buffer.trained_segments())) > 0

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: Any = None) -> None:
        """SB3's episode statistics, after refusing a sample the reward could not judge (its
        ``None``) where the rollout storage cannot leave it out of the loss: SB3's own
        per-transition buffer (``fast=False``) would train on the step's placeholder 0."""
        if not isinstance(self.rollout_buffer, SequenceRolloutBuffer) and any(map(is_skipped, infos)):
            raise ValueError("The reward returned None for a completion (it could not judge it), and SB3's own "
                             "rollout buffer (fast=False) cannot leave that sample out of the loss. Fix: drop "
                             "fast=False (the fast path leaves it out), or make the reward return a number for "
                             "every completion.")
        super()._update_info_buffer(infos, dones)  # type: ignore[misc]

    def _update_learning_rate(self, optimizers: Any) -> None:
        """SB3's schedule, then each parameter group's ``lr_scale`` (a separate critic's own
        learning rate, ``policies.lm_policy``), which SB3's update would overwrite."""
        super()._update_learning_rate(optimizers)  # type: ignore[misc]
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] *= group.get("lr_scale", 1.0)

    def save(self, path: Any, exclude: Any = None, include: Any = None, *, whole_weights: bool = True) -> None:
        """SB3's ``save``, written atomically (``textenv.files.atomic_write``): a crash or a
        full disk during the write leaves the previous file whole. ``path`` without a suffix
        gets ``.zip``, as in SB3; a file object is written as SB3 writes it. In data-parallel
        training only rank 0 writes (every rank holds the same weights). Under
        ``parallelism="fsdp"`` every rank must call it: the shards are gathered into whole
        weights on rank 0, so the file loads in one process as any agent's; a checkpoint
        (``whole_weights=False``) leaves them out, its shards written beside it
        (``agents.checkpoints``)."""
        sharding = policy_sharding(self.policy)
        self._full_parameters = sharding.full_parameters() if sharding is not None and whole_weights else {}
        try:
            if not distributed.is_main_process():
                return
            if not isinstance(path, (str, os.PathLike)):
                return super().save(path, exclude=exclude, include=include)  # type: ignore[misc]
            target = Path(path)
            if target.suffix == "":
                target = target.with_suffix(".zip")
            atomic_write(target, lambda temporary: super(LMAgentMixin, self).save(temporary, exclude=exclude,
                                                                                  include=include))
        finally:
            del self._full_parameters

    def get_parameters(self) -> dict[str, dict]:
        """SB3's (the policy's and its optimizer's state dicts); under ``parallelism="fsdp"``
        the whole ones that ``save`` gathered (none for a checkpoint: its shards hold them)."""
        if policy_sharding(self.policy) is None:
            return super().get_parameters()  # type: ignore[misc]
        return getattr(self, "_full_parameters", {})

    def set_parameters(self, load_path_or_dict: Any, exact_match: bool = True, device: Any = "auto") -> None:
        """SB3's; under ``parallelism="fsdp"`` whole weights go into this rank's shards, and a
        checkpoint's zip (no weights) leaves them to its shards (``agents.checkpoints.resume_agent``)."""
        sharding = policy_sharding(self.policy)
        if sharding is not None and isinstance(load_path_or_dict, dict):
            if "policy" not in load_path_or_dict:  # a checkpoint's zip (agents.saving.load_agent refuses it elsewhere)
                return None
            return sharding.load_full_parameters(load_path_or_dict)
        return super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)  # type: ignore[misc]

    def _setup_model(self) -> None:
        """SB3's set-up; then, for a LoRA policy on the batched env, the policy's own body
        with its adapters off becomes the env's reference (no second copy of the weights)."""
        adopt_flat_settings(self)
        super()._setup_model()  # type: ignore[misc]
        reference = self.policy.reference_model() if isinstance(self.policy, LMPolicyMixin) else None
        if reference is not None and isinstance(self.env, BatchedTokenVecEnv):
            self.env.use_reference(reference)
        self.reference_sharding = None
        if distributed.is_distributed() and isinstance(self.policy, LMPolicyMixin):
            if self.parallelism == "fsdp":  # FSDP2 shards of the policy and the reference (agents.sharding)
                self.policy.data_parallel = ShardedEvaluation(self.policy)
                if reference is None:  # under LoRA the reference is the policy's own (sharded) body
                    self.reference_sharding = shard_reference(self._env_reference(), self.policy.precision)
            else:
                # DDP around the policy's evaluation of actions (it broadcasts rank 0's weights).
                self.policy.data_parallel = distributed.DataParallelEvaluation(
                    self.policy, find_unused_parameters=not self.trains_value_head)
            # Every rank forms as many minibatches per epoch (agents.distributed).
            if isinstance(self.rollout_buffer, SequenceRolloutBuffer):
                self.rollout_buffer.agree_on_minibatch_count = distributed.agree_on_minibatch_count
                self.rollout_buffer.agree_on_prompt_sharing = distributed.every_rank_agrees

    def _env_reference(self) -> torch.nn.Module:
        """The training env's frozen reference LM, to shard (``parallelism="fsdp"``)."""
        if not isinstance(self.env, BatchedTokenVecEnv):
            raise ValueError("parallelism='fsdp' shards the reference of the batched env, and this agent's env is a "
                             f"{type(self.env).__name__}. Fix: make the env with make_text_vec_env (batched, the "
                             "default), or use parallelism='ddp'.")
        return self.env.task.reference

    def weights_gathered(self) -> Any:
        """A context in which the policy and the reference are whole on every rank, under
        ``parallelism="fsdp"`` (``agents.sharding``: a rollout, an evaluation, an export run
        inside one; every rank enters it together); otherwise it does nothing."""
        return all_gathered(policy_sharding(self.policy), getattr(self, "reference_sharding", None))

    def _setup_learn(self, total_timesteps: int, callback: Any = None, reset_num_timesteps: bool = True,
                     tb_log_name: str = "run", progress_bar: bool = False):
        """SB3's set-up (it makes the logger, and resets the env unless the run goes on), then
        the resolved configuration into the logger: TensorBoard gets it at the run's first
        dump (``agents.config.log_config``). Ranks other than 0 of a data-parallel run log
        nowhere. When SB3 resets the env, the KL summed over the episodes it discards goes
        with them: the new episodes start from zero (``episode_kl_sums``)."""
        if not distributed.is_main_process():  # only rank 0 writes TensorBoard and the console log
            self.tensorboard_log, self.verbose = None, 0
        if reset_num_timesteps or self._last_obs is None:  # SB3's condition for env.reset()
            self.kl_episode_sums = None
        with self.weights_gathered():  # SB3's env.reset() starts the reference on the prompts
            total_timesteps, callback = super()._setup_learn(  # type: ignore[misc]
                total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        self.kl_controller.start_run(total_timesteps)  # the whole run's tokens, a resumed one's too
        if self.env is not None:
            self.episode_kl_sums(self.env.num_envs)
        log_config(self.logger, self, self.env)
        return total_timesteps, callback

    def _init_callback(self, callback: Any, progress_bar: bool = False) -> Any:
        """SB3's callback set-up, with the KL penalty first on SB3's stock path (the fast path
        applies it after the rollout: ``agents.rollout``), and a progress bar that counts the
        tokens the agent generated (``TokenProgressBar``) rather than ``n_envs`` per step: a
        group rollout's finished episodes wait without generating."""
        callbacks = callback if isinstance(callback, list) else [callback] if callback is not None else []
        if any(contains_callback(given, KLPenaltyCallback) for given in callbacks):
            raise ValueError("The agent applies the KL penalty itself, so a KLPenaltyCallback passed to learn "
                             "would apply it twice. Fix: drop KLPenaltyCallback from the callbacks.")
        if not isinstance(self.rollout_buffer, SequenceRolloutBuffer):
            callbacks = [KLPenaltyCallback(), *callbacks]
        if progress_bar:
            callbacks = [*callbacks, TokenProgressBar()]
        return super()._init_callback(callbacks, progress_bar=False)  # type: ignore[misc]

    def learn(self, total_timesteps: int, callback: Any = None, **kwargs: Any):
        """SB3's ``learn``; every rollout is logged, and the TensorBoard run is named after the
        algorithm (``grpo_1``, not SB3's class name ``PPO_1``) unless ``tb_log_name`` says otherwise."""
        # A rollout of an LM is expensive: log every one (SB3's A2C default is every 100th).
        kwargs.setdefault("log_interval", 1)
        kwargs.setdefault("tb_log_name", self.algorithm_name)
        return super().learn(total_timesteps, callback=callback, **kwargs)  # type: ignore[misc]


class LMPPO(LMAgentMixin, PPO):
    """PPO with the per-token KL penalty toward the reference model (or, with
    ``kl_placement="loss"``, the KL term in the loss).

    :param policy_loss: ``"clip"``, PPO's clipped surrogate (Schulman et al., 2017), or
        ``"cispo"``, the clipped importance weight held constant, so that every token keeps
        a gradient (MiniMax-M1, 2025; ``agents.clipped_update``). ``"cispo"`` runs on the
        fast path.
    """

    algorithm_name = "ppo"
    defaults = PPO_DEFAULTS
    supports_separate_critic = True
    supports_kl_in_loss = True

    def __init__(self, policy: Any = None, env: GymEnv | str | None = None, policy_loss: PolicyLoss = "clip",
                 **kwargs: Any):
        check_policy_loss(policy_loss)
        if policy_loss != "clip" and not stores_sequences(kwargs.get("fast", True), kwargs):
            raise ValueError(f"policy_loss={policy_loss!r} runs in agents.clipped_update, which reads the fast "
                             "path's whole sequences. Fix: drop fast=False (and rollout_buffer_class).")
        self.policy_loss = policy_loss
        super().__init__(policy, env, **kwargs)

    def _update(self) -> None:
        """SB3's ``PPO.train``; with ``kl_placement="loss"`` or ``policy_loss="cispo"``, the
        same update with ``beta * KL`` in the loss or CISPO's policy term
        (``agents.clipped_update``: SB3's loss has no place for either)."""
        if self.kl_placement == "reward" and self.policy_loss == "clip":
            return super()._update()
        clipped_update(self, policy_loss=self.policy_loss)


class LMA2C(LMAgentMixin, A2C):
    """A2C with the per-token KL penalty toward the reference model."""

    algorithm_name = "a2c"
    defaults = A2C_DEFAULTS
    supports_separate_critic = True
    default_advantage_normalization = "none"  # SB3's A2C default: raw advantages


class LMTRPO(LMAgentMixin, TRPO):
    """TRPO (sb3-contrib) with the per-token KL penalty toward the reference model.

    The natural-gradient step needs Hessian-vector products, i.e. a double backward
    through the LM: the agent therefore loads the body with ``eager`` attention
    (PyTorch's fused SDPA kernels have no second derivative) unless the user's
    ``policy_kwargs`` name another ``attn_implementation``. The shared body moves
    only with the trust-region step; the critic's updates touch the value head only
    (sb3-contrib drops their gradients on actor parameters).
    """

    algorithm_name = "trpo"
    defaults = TRPO_DEFAULTS
    supports_data_parallel = False
    policy_defaults = {"attn_implementation": "eager"}

    def __init__(self, *args: Any, **kwargs: Any):
        if (kwargs.get("policy_kwargs") or {}).get("lora") is not None:
            raise ValueError(
                "TRPO cannot train LoRA adapters: sb3-contrib's TRPO differentiates the KL with respect to every "
                "policy parameter, the frozen base weights included. Fix: use ppo, a2c, rloo, grpo or nlpo with "
                "LoRA, or drop lora for TRPO."
            )
        super().__init__(*args, **kwargs)


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
    supports_data_parallel = False
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
