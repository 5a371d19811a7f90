"""``LMActorCriticPolicy``: an SB3 actor-critic on one shared causal-LM body.

The model itself is a ``policies.actor_critic.LMActorCritic`` (``policy.actor_critic``):
the policy loads it, holds its parts under their own names (``lm``, ``lm_head``,
``critic_body``, ``value_head``: the state-dict keys of saved agents), and computes
hidden states, logits and values through it. What is SB3's stays here: observations
and ``TokenSequences``, distributions, chunked log-probs, the optimizer and memory.

- actor: the LM's own output head; its logits over the vocabulary are the
  ``Discrete(V)`` action distribution;
- critic: a linear value head (small init) on the last hidden state;
- both read the hidden state of the last real token of the observation, so a
  single body forward serves both heads. ``critic="separate"`` gives the value head
  a body of its own instead (one more forward per evaluation, its own learning rate).

Differences from SB3's default ``ActorCriticPolicy``, each on purpose:
- no features extractor / MLP extractor: the LM body is the shared extractor;
- ``ortho_init=False``: orthogonal init would overwrite the pretrained weights;
- dropout off through the model's config and modules (``textenv.lm.models.disable_dropout``),
  so train and eval mode compute the same function and the probability ratio is
  exactly 1 before the first update; the body follows SB3's train/eval switch, so
  ``gradient_checkpointing=True`` really checkpoints during the update;
- the update's logits are made in one pass when the minibatch's fit the budget
  (``logits_chunk_size="auto"``: ``LOGITS_BUDGET_BYTES`` for what the backward keeps of
  them), else in checkpointed chunks, each recomputed in the backward pass instead of
  kept, so the update's peak memory follows the chunk, not (tokens in the minibatch x
  vocabulary). Chunks cost time (1.26x the head's one pass at GPT-2-124M's shape,
  ``scripts/bench/update_head.py``), so they are made only when needed;
- ``precision``: the weights are float32 master weights whatever dtype the
  checkpoint was saved in (``"fp32"``, and ``"bf16-mixed"``, which runs the body's
  forward passes under bf16 autocast); ``"bf16"`` keeps bf16 weights (half the
  memory; small updates are lost to rounding);
- observations are cast back to integer ids (SB3 casts every ``Box`` to float;
  exact below 2**24);
- memory between the phases of training: after every optimizer step that was taken
  the gradients are freed (set to ``None``, as SB3's ``zero_grad`` before the next
  backward would), so they never sit beside the next minibatch's activations; with
  ``trim_memory`` on a CPU the C heap's freed memory goes back to the system when an
  update or a rollout starts (``"phases"``, default), or also after every optimizer
  step with glibc's mmap threshold fixed (``"steps"``: less memory, slower;
  ``policies.memory``). The rollout's KV caches are freed after its last step
  (``policies.decoding``).
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any, ContextManager, Literal

import torch
import torch.utils.checkpoint
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from policies.actor_critic import CRITICS, PRECISIONS, Critic, LMActorCritic, Precision  # noqa: F401 (re-exported)
from policies.guarded_optimizer import skipping_non_finite, with_fused_step
from policies.lora import LoraReference
from policies.memory import keep_heap_small, trim_heap
from policies.observations import unpack_observation
from policies.sampling import log_prob_of
from policies.sequences import TokenSequences
from textenv.lm.models import vocab_size_of
from textenv.lm.slot_decoding import last_token_index

if TYPE_CHECKING:
    from policies.decoding import PolicyRolloutDecoder

#: ``trim_memory``: when freed C-heap memory goes back to the system on a CPU (module doc).
TrimMemory = Literal["phases", "steps", False, True]
TRIM_MEMORY_MODES = ("phases", "steps", False, True)

#: ``logits_chunk_size="auto"``: the most memory the update's logits may hold at once.
#: Per token the backward keeps about four float32 (vocabulary)-sized tensors (the
#: log-softmax, the probabilities, their gradients), so 1 GiB is 1,300 tokens at GPT-2's
#: 50k words and 440 at Qwen's 150k.
LOGITS_BUDGET_BYTES = 1 << 30
LOGITS_BYTES_PER_WORD = 4 * 4


def auto_logits_chunk_size(vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """The most states whose logits fit ``budget_bytes`` in the update (at least one)."""
    return max(1, budget_bytes // (vocab_size * LOGITS_BYTES_PER_WORD))


class LMPolicyMixin:
    """The LM actor-critic on top of an SB3 policy base class: ``ActorCriticPolicy``
    (``LMActorCriticPolicy``) or sb3-contrib's ``MaskableActorCriticPolicy``
    (``policies.masked.TopPMaskedLMPolicy``). Arguments: see ``LMActorCriticPolicy``."""

    #: Set by a data-parallel agent (``agents.distributed.DataParallelEvaluation``): the
    #: synchronised ``evaluate_actions`` for evaluations under gradient; ``None``: one process.
    data_parallel: Any = None
    #: A full fine-tune of more trainable parameters than this on a CPU gets a one-time
    #: notice (per process) that LoRA is the path there (``notice_full_fine_tune_on_cpu``).
    cpu_full_fine_tune_notice_parameters: int = 100_000_000
    _cpu_notice_given: bool = False  # class-wide: once per process
    #: ``logits_chunk_size="auto"``: the update's logits in one pass when they fit this.
    logits_budget_bytes: int = LOGITS_BUDGET_BYTES

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        model_name_or_path: str = "default",
        value_head_init_std: float = 0.01,
        attn_implementation: str | None = None,
        precision: Precision = "fp32",
        gradient_checkpointing: bool = False,
        logits_chunk_size: int | Literal["auto"] | None = "auto",
        lora: dict[str, Any] | None = None,
        critic: Critic = "shared",
        critic_model_name_or_path: str | None = None,
        critic_learning_rate: float | None = None,
        trim_memory: TrimMemory = "phases",
        compile: bool = False,
        **kwargs: Any,
    ):
        if critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
        if critic == "shared" and (critic_model_name_or_path is not None or critic_learning_rate is not None):
            raise ValueError("critic_model_name_or_path and critic_learning_rate configure a separate critic. "
                             "Fix: pass critic='separate' as well.")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}. Fix: use 'fp32' (default), "
                             "'bf16-mixed' (fp32 weights, bf16 autocast) or 'bf16' (bf16 weights).")
        if not isinstance(action_space, spaces.Discrete):
            raise TypeError(f"{type(self).__name__} needs a Discrete action space of token ids")
        if not isinstance(observation_space, spaces.Dict) or not {
            "input_ids",
            "attention_mask",
        } <= set(observation_space.spaces):
            raise TypeError(
                f"{type(self).__name__} needs Dict observations with 'input_ids' and "
                "'attention_mask' (as produced by textenv.TextGenEnv)"
            )
        self.model_name_or_path = str(model_name_or_path)
        self.value_head_init_std = value_head_init_std
        self.attn_implementation = attn_implementation
        self.precision = precision
        self.gradient_checkpointing = gradient_checkpointing
        if logits_chunk_size not in (None, "auto") and not (isinstance(logits_chunk_size, int) and logits_chunk_size >= 1):
            raise ValueError(f"logits_chunk_size must be a positive number of tokens, 'auto' or None, "
                             f"got {logits_chunk_size!r}")
        self.logits_chunk_size = logits_chunk_size
        # Whether the update's loss has an entropy term (the agent sets it: a non-zero ent_coef);
        # without one the entropy is computed for the logs only, with no graph to back-propagate.
        self.entropy_gradient = True
        self.lora = None if lora is None else dict(lora)
        self.critic = critic
        self.critic_model_name_or_path = None if critic_model_name_or_path is None else str(critic_model_name_or_path)
        self.critic_learning_rate = critic_learning_rate
        if trim_memory not in TRIM_MEMORY_MODES:
            raise ValueError(f"trim_memory must be one of {TRIM_MEMORY_MODES}, got {trim_memory!r}. Fix: 'phases' "
                             "(default), 'steps' (less memory, slower) or False (glibc left alone).")
        self.trim_memory = "steps" if trim_memory is True else trim_memory  # True: agents saved before "phases"
        self.compile_decode = bool(compile)  # not "compile": that is nn.Module's method
        self._compiled_decode: nn.Module | None = None  # the body's compiled form, made on first use
        kwargs["ortho_init"] = False
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        """Load the actor-critic (``LMActorCritic``: LM body + head, value head; replaces SB3's
        MLP heads) and make the optimizer."""
        actor_critic = LMActorCritic.from_pretrained(
            self.model_name_or_path,
            restore_exported=False,  # a fresh value head on any checkpoint (load_exported_agent restores one)
            check=self._check_vocabulary,
            value_head_init_std=self.value_head_init_std,
            attn_implementation=self.attn_implementation,
            precision=self.precision,
            gradient_checkpointing=self.gradient_checkpointing,
            lora=self.lora,
            critic=self.critic,
            critic_model_name_or_path=self.critic_model_name_or_path,
        )
        # Held outside the module tree (no "actor_critic." prefix in state dicts): its parts are
        # registered here under the names saved agents use, in the order the optimizer's state follows.
        object.__setattr__(self, "actor_critic", actor_critic)
        self.lm = actor_critic.lm
        self.lm_head = actor_critic.lm_head  # the actor's head (an alias, kept in state dicts)
        self.critic_body: nn.Module | None = actor_critic.critic_body
        self.value_head = actor_critic.value_head
        self.initial_learning_rate = lr_schedule(1)
        self.make_optimizer()

    def make_optimizer(self) -> None:
        """The optimizer over the trainable parameters as they are now (FSDP2 sharding,
        ``agents.sharding``, replaces them and makes it again). A NaN/inf gradient skips
        its step instead of poisoning the weights (``policies.guarded_optimizer``)."""
        groups = self._parameter_groups(self.initial_learning_rate)
        kwargs = with_fused_step(self.optimizer_class, self.optimizer_kwargs,
                                 [p for group in groups for p in group["params"]])
        self.optimizer = skipping_non_finite(self.optimizer_class)(groups, lr=self.initial_learning_rate, **kwargs)
        self.release_hook = self.optimizer.register_step_post_hook(
            release_gradients_and_heap if self.trim_memory == "steps" else release_gradients)

    def _check_vocabulary(self, lm: nn.Module) -> None:
        """The policy's LM must have the env's action space as its vocabulary."""
        vocab = vocab_size_of(lm)
        if vocab != self.action_space.n:
            raise ValueError(
                f"The policy model {self.model_name_or_path!r} has a vocabulary of {vocab} "
                f"tokens but the environment's action space has {self.action_space.n} "
                "(its reference model's vocabulary). Policy and reference must share a "
                "tokenizer. Fix: pass the same model to the environment (model=...) and "
                "the policy (policy_kwargs={'model_name_or_path': ...})."
            )

    def set_training_mode(self, mode: bool) -> None:
        """SB3's switch, at the start of every rollout (``False``) and update (``True``). When
        an update starts, the KV caches of this policy's decoders are freed (``release_decoders``;
        a PPO rollout frees its own after its last step, a group rollout does not). With
        ``trim_memory`` on a CPU, the freed heap memory of the phase that ended goes back to
        the system; with ``"steps"`` glibc's mmap threshold is also fixed once
        (``keep_heap_small``). Only a change of phase trims: SB3's ``predict`` switches to
        evaluation at every call."""
        phase_changes = self.training != mode
        super().set_training_mode(mode)
        if mode:  # an update starts: the rollout's KV caches are stale and of no use to it
            self.release_decoders()
        if self.device.type != "cpu":
            return
        self.notice_full_fine_tune_on_cpu()
        if self.trim_memory == "steps":
            keep_heap_small()
        if self.trim_memory and phase_changes:
            trim_heap()

    def notice_full_fine_tune_on_cpu(self) -> None:
        """Once per process, at the first rollout or update on a CPU of a full fine-tune of
        more than ``cpu_full_fine_tune_notice_parameters`` trainable parameters: a notice
        that LoRA is the path on a CPU (measured: ``scripts/benchmark.py --workloads R``)."""
        if self.lora is not None or LMPolicyMixin._cpu_notice_given:
            return
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if trainable <= self.cpu_full_fine_tune_notice_parameters:
            return
        LMPolicyMixin._cpu_notice_given = True
        weights_gb = sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad) / 1e9
        warnings.warn(
            f"Full fine-tuning of {self.model_name_or_path!r} ({trainable / 1e6:.0f}M trainable parameters) on a "
            f"CPU: its weights, their gradients, Adam's two moments and the frozen reference copy take about "
            f"4 x {weights_gb:.2f} GB before any activation, and every update steps every weight. LoRA trains "
            "the adapters alone and its reference is the same weights with the adapters off (no copy): on "
            "SmolLM2-135M-Instruct about half the peak memory and twice the tokens/s of a full fine-tune. "
            "Fix: policy_kwargs={'lora': {'r': 8}} (textenv-train --lora-r 8), or train on a GPU.",
            UserWarning, stacklevel=3)

    def _parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """One group of trainable parameters, or two with a separate critic: its body and
        value head learn at ``critic_learning_rate``, kept as ``lr_scale`` (the ratio to the
        policy's rate) so that it follows the learning-rate schedule (the agent applies it)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.critic_body is None:
            return [{"params": trainable}]
        critic_ids = {id(p) for module in (self.critic_body, self.value_head) for p in module.parameters()}
        critic_lr = self.critic_learning_rate if self.critic_learning_rate is not None else learning_rate
        return [{"params": [p for p in trainable if id(p) not in critic_ids]},
                {"params": [p for p in trainable if id(p) in critic_ids], "lr": critic_lr,
                 "lr_scale": critic_lr / learning_rate}]

    @property
    def causal_lm(self) -> nn.Module:
        """The Hugging Face causal LM (under LoRA: inside the peft model, adapters injected)."""
        return self.actor_critic.causal_lm

    def reference_model(self) -> LoraReference | None:
        """Under LoRA, the frozen reference as the env should use it: this very body with its
        adapters off (``policies.lora.LoraReference``); ``None`` without LoRA."""
        return self.actor_critic.reference_model()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        for unused in ("net_arch", "activation_fn", "ortho_init"):
            data.pop(unused, None)
        data.update(
            model_name_or_path=self.model_name_or_path,
            value_head_init_std=self.value_head_init_std,
            attn_implementation=self.attn_implementation,
            precision=self.precision,
            gradient_checkpointing=self.gradient_checkpointing,
            logits_chunk_size=self.logits_chunk_size,
            lora=self.lora,
            critic=self.critic,
            critic_model_name_or_path=self.critic_model_name_or_path,
            critic_learning_rate=self.critic_learning_rate,
            trim_memory=self.trim_memory,
            compile=self.compile_decode,
        )
        return data

    def compute_context(self) -> ContextManager:
        """Where the body and the LM head run: bf16 autocast under ``"bf16-mixed"``
        (weights stay float32, and so do the gradients the optimizer sees)."""
        return self.actor_critic.compute_context()

    # -- the two heads on one body ---------------------------------------------

    def body_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm: torch.nn.Module | None = None,
        prefix_columns: int = 0,
    ) -> torch.Tensor:
        """Final hidden states of the LM body (``lm``, default the policy's) at every column:
        ``(batch, width, hidden)``; the first ``prefix_columns`` are prompts rows share."""
        return self.actor_critic.hidden_states(input_ids, attention_mask, lm, prefix_columns)

    def last_hidden_state(
        self, obs: dict[str, torch.Tensor] | TokenSequences, lm: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Hidden state at the last token of each evaluated state: ``(n_states, hidden)``.

        For observations (SB3's path) that is one state per row; for
        ``TokenSequences`` (the fast path) every listed token of every row.
        """
        if isinstance(obs, TokenSequences):
            sequences = obs.trimmed()
            hidden = self.body_hidden_states(sequences.input_ids, sequences.attention_mask, lm,
                                             sequences.prefix_columns)
            return hidden[sequences.token_rows, sequences.token_columns]
        input_ids, attention_mask = unpack_observation(obs)
        hidden = self.body_hidden_states(input_ids, attention_mask, lm)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(attention_mask)]

    def action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the vocabulary (the head's matmul autocast like the body)."""
        return self.actor_critic.logits_from_hidden(hidden)

    def critic_hidden_state(self, obs: dict[str, torch.Tensor] | TokenSequences, policy_hidden: torch.Tensor) -> torch.Tensor:
        """What the value head reads at each state: the policy body's hidden state (shared
        critic) or the separate critic body's, at the same states."""
        if self.critic_body is None:
            return policy_hidden
        return self.last_hidden_state(obs, lm=self.critic_body)

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) in float32 under every precision (autocast off: the head is one small matmul)."""
        return self.actor_critic.value_from_hidden(hidden)

    # -- SB3's policy interface --------------------------------------------------

    def forward(
        self, obs: dict[str, torch.Tensor], deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.last_hidden_state(obs)
        logits = self.action_logits(hidden)
        actions = self.action_dist.proba_distribution(action_logits=logits).get_actions(deterministic=deterministic)
        return actions, self.value(self.critic_hidden_state(obs, hidden)), log_prob_of(logits, actions)

    def evaluate_actions(
        self, obs: dict[str, torch.Tensor] | TokenSequences, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values, log-probs and entropies of ``actions``; ``obs`` may be SB3's batch of
        observations or ``TokenSequences`` (one body pass per sequence). In data-parallel
        training (``agents.distributed``), evaluations under gradient go through DDP, so
        their backward synchronises the gradients across ranks."""
        if self.data_parallel is not None and torch.is_grad_enabled():
            return self.data_parallel(obs, actions)
        return self.evaluate_actions_locally(obs, actions)

    def evaluate_actions_locally(
        self, obs: dict[str, torch.Tensor] | TokenSequences, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``evaluate_actions`` in this process alone."""
        hidden = self.last_hidden_state(obs)
        log_prob, entropy = self.chunked_log_prob_entropy(hidden, actions)
        return self.value(self.critic_hidden_state(obs, hidden)), log_prob, entropy

    def chunked_log_prob_entropy(
        self, hidden: torch.Tensor, actions: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log pi(a|s)`` and the entropy of ``pi(.|s)`` for every state, in one pass or
        ``logits_chunk_size`` states at a time (``"auto"``: one pass when they fit
        ``LOGITS_BUDGET_BYTES``). Under autograd each chunk is checkpointed: its ``(chunk, V)``
        logits are freed after the forward and recomputed in the backward, so peak memory
        follows the chunk. ``masks``: allowed actions per state (``False``: logit -inf), for
        masked policies."""
        actions = actions.reshape(-1).long()
        chunk = self.update_logits_chunk(len(actions))
        if len(actions) <= chunk:
            return self._log_prob_entropy(hidden, actions, masks)
        checkpointed = torch.is_grad_enabled() and hidden.requires_grad
        log_probs, entropies = [], []
        for start in range(0, len(actions), chunk):
            part = slice(start, start + chunk)
            args = (hidden[part], actions[part], None if masks is None else masks[part])
            if checkpointed:
                log_prob, entropy = torch.utils.checkpoint.checkpoint(self._log_prob_entropy, *args, use_reentrant=False)
            else:
                log_prob, entropy = self._log_prob_entropy(*args)
            log_probs.append(log_prob)
            entropies.append(entropy)
        return torch.cat(log_probs), torch.cat(entropies)

    def update_logits_chunk(self, n_states: int) -> int:
        """How many states' logits the update makes at once (``n_states``: all in one pass)."""
        if self.logits_chunk_size is None:
            return n_states
        if self.logits_chunk_size == "auto":
            return auto_logits_chunk_size(self.action_space.n, self.logits_budget_bytes)
        return self.logits_chunk_size

    def _log_prob_entropy(
        self, hidden: torch.Tensor, actions: torch.Tensor, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.action_logits(hidden)
        if masks is not None:
            logits = logits.masked_fill(~masks, float("-inf"))
        log_p = torch.log_softmax(logits, dim=-1)  # as log_prob_of: the rollout's and the update's agree bit for bit
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.entropy_gradient):
            # Masked-out actions: 0 * log 0 = 0, in the forward and the backward pass (a
            # torch.where over p * log p would pass NaN gradients from the -inf entries).
            # Without masks every log-prob of finite logits is finite: no mask pass.
            finite_log_p = log_p if masks is None else log_p.masked_fill(~masks, 0.0)
            entropy = -(log_p.exp() * finite_log_p).sum(-1)
        return log_p.gather(1, actions[:, None])[:, 0], entropy

    def get_distribution(self, obs: dict[str, torch.Tensor]) -> CategoricalDistribution:
        hidden = self.last_hidden_state(obs)
        return self.action_dist.proba_distribution(action_logits=self.action_logits(hidden))

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.critic_body is not None:
            return self.value(self.last_hidden_state(obs, lm=self.critic_body))
        return self.value(self.last_hidden_state(obs))

    def decode_body(self) -> nn.Module:
        """The body that the rollout's one-token decode steps run: the LM's own, or with
        ``compile=True`` its ``torch.compile``'d form (static shapes: the slot cache's width is
        fixed), made on first use and kept. Its weights are the body's, so updates reach it."""
        body = self.causal_lm.base_model
        if not self.compile_decode:
            return body
        if self._compiled_decode is None:
            # Not an attribute of the module tree: its weights would appear twice in state dicts.
            object.__setattr__(self, "_compiled_decode", torch.compile(body, dynamic=False))
        return self._compiled_decode

    def rollout_decoder(self, n_envs: int, width: int) -> "PolicyRolloutDecoder":
        """The KV-cached step (``start``/``act``/``observe``) of this policy over ``n_envs``
        episodes: training rollouts, group rollouts and evaluation all decode with it."""
        from policies.decoding import PolicyRolloutDecoder

        return self.tracked_decoder(PolicyRolloutDecoder(self, n_envs, width))

    def tracked_decoder(self, decoder: "PolicyRolloutDecoder") -> "PolicyRolloutDecoder":
        """``decoder``, remembered (weakly) so that every update frees its KV caches first:
        an update makes them stale, and the next ``start`` refills every slot anyway."""
        live = [ref for ref in getattr(self, "_decoders", []) if ref() is not None]
        self._decoders = [*live, weakref.ref(decoder)]
        return decoder

    def release_decoders(self) -> None:
        """Free the KV caches of every decoder of this policy still alive (``tracked_decoder``)."""
        for ref in getattr(self, "_decoders", []):
            decoder = ref()
            if decoder is not None:
                decoder.release()


def release_gradients(optimizer: torch.optim.Optimizer, args: Any = (), kwargs: Any = None) -> None:
    """After a step that was taken (``policies.guarded_optimizer``: a skipped step leaves its
    non-finite gradients to be looked at), free the gradients: the step consumed them, and
    SB3's update calls ``zero_grad()`` (``set_to_none``) only after the next minibatch's
    forward pass, so they would otherwise sit beside its activations (a full copy of the
    trainable weights). The next backward allocates them afresh, as it does anyway."""
    if getattr(optimizer, "consecutive_skips", 0) == 0:
        optimizer.zero_grad(set_to_none=True)


def release_gradients_and_heap(optimizer: torch.optim.Optimizer, args: Any = (), kwargs: Any = None) -> None:
    """``release_gradients``, then the freed C-heap memory (the minibatch's activations and
    gradients) back to the operating system (``policies.memory.trim_heap``)."""
    release_gradients(optimizer)
    trim_heap()


class LMActorCriticPolicy(LMPolicyMixin, ActorCriticPolicy):
    """Actor-critic over token ids for any ``AutoModelForCausalLM``.

    :param model_name_or_path: ``"default"`` (the embedded model), a name, or a path
        loadable by ``AutoModelForCausalLM.from_pretrained``.
    :param value_head_init_std: std of the value head's initial weights (bias 0):
        small, so early value estimates do not swamp the advantages.
    :param attn_implementation: passed to ``from_pretrained`` (e.g. ``"eager"``).
    :param precision: ``"fp32"`` (default), ``"bf16-mixed"`` (float32 master weights,
        forward passes under bf16 autocast) or ``"bf16"`` (bf16 weights); see module doc.
    :param gradient_checkpointing: recompute the body's activations in the backward pass
        (Hugging Face's ``gradient_checkpointing_enable``): less memory, one more forward.
    :param logits_chunk_size: states whose logits the update makes at once, in checkpointed
        chunks: ``"auto"`` (default) makes them in one pass when they fit
        ``LOGITS_BUDGET_BYTES`` (1 GiB) and in chunks of what fits otherwise; a number sets
        the chunk; ``None``: always one pass.
    :param lora: LoRA adapter options (``policies.lora``; e.g. ``{"r": 16}``): only the
        adapters and the value head train; ``None``: full fine-tuning.
    :param critic: ``"shared"`` (default: the value head on the policy's body, the design
        this project started from) or ``"separate"``: the value head on a body of its own,
        as OpenRLHF's critic, so value regression does not pull on the policy's features.
    :param critic_model_name_or_path: the separate critic's starting body (default: the
        policy's start): any checkpoint with the same tokenizer, e.g. a reward model's.
    :param critic_learning_rate: the separate critic's learning rate (default: the
        policy's); it follows the policy's schedule in proportion.
    :param compile: ``torch.compile`` the rollout's decode step (``decode_body``): compiled on
        the first rollout (seconds to a minute on a CPU; it needs a C++ compiler there), then
        the same log-probs within 1e-5. On the 2-core CPU it pays on small models only
        (``scripts/benchmark.py``'s compiled rows), so it is off by default.
    :param trim_memory: on a CPU, when glibc's freed memory goes back to the system
        (``policies.memory``): ``"phases"`` (default) when an update and when a rollout
        starts; ``"steps"`` (``True`` in agents saved before the modes) also after every
        optimizer step, with glibc's mmap threshold fixed at 128 KiB: on SmolLM2-135M 0.6 GB
        less at the peak, but 1.3-1.5x slower (every large tensor a fresh mapping, every
        page faulted in again; ``scripts/benchmark.py --workloads R``); ``False``: the
        allocator left alone.
    """
