"""The clipped policy-gradient update of SB3's PPO, step by step, with the options PPO's own
``train`` has no place for: the KL to the reference in the loss, and the GRPO-family
losses (``agents.group_methods`` has the papers). RLOO and GRPO update with it, and so
does PPO with ``kl_placement="loss"`` or ``policy_loss="cispo"``; with the defaults and
``beta = 0`` it makes SB3's ``PPO.train``'s update (tests/test_kl_estimators.py).

The policy term per token (``policy_token_losses``) has two options:

- ``policy_loss``: ``"clip"``, PPO's clipped surrogate ``min(A r, A clip(r))`` (Schulman et
  al., 2017), which gives a token whose ratio left the clip range no gradient at all; or
  ``"cispo"`` (MiniMax-M1, 2025, arXiv:2506.13585), ``sg(clip(r)) A log pi``: the importance
  weight is clipped and held constant, so every token keeps the gradient ``clip(r) A
  grad log pi`` (MiniMax-M1 leaves the weight unbounded below: ``clip_range=1``).
- ``importance_level``: ``"token"``, each token's own ratio; or ``"sequence"`` (GSPO, Zheng
  et al., 2025, arXiv:2507.18071; TRL's ``importance_sampling_level="sequence"``), the
  ratio of the whole sequence, the geometric mean of its tokens' ratios
  ``exp(mean_t log r_t)``, given to (and clipped alike for) every token of the sequence.
  A minibatch row must then be a whole episode, as in a group rollout.

The entropy bonus is SB3's: ``ent_coef * -entropy``, aggregated as the other terms.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from agents.kl_penalty import kl_estimate

LossAggregation = Literal["token_mean", "sequence_mean", "sequence_sum_normalized"]
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum_normalized")
PolicyLoss = Literal["clip", "cispo"]
POLICY_LOSSES = ("clip", "cispo")
ImportanceLevel = Literal["token", "sequence"]
IMPORTANCE_LEVELS = ("token", "sequence")


def check_policy_loss(policy_loss: str) -> None:
    """A ``ValueError`` naming the choices for an unknown ``policy_loss``."""
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy_loss must be one of {POLICY_LOSSES} ('clip': PPO's clipped surrogate; 'cispo': "
                         f"MiniMax-M1's clipped importance weight), got {policy_loss!r}. "
                         "Fix: e.g. policy_loss='cispo'.")


def check_importance_level(importance_level: str) -> None:
    """A ``ValueError`` naming the choices for an unknown ``importance_level``."""
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS} ('token': each token's ratio; "
                         f"'sequence': GSPO's sequence ratio), got {importance_level!r}. Fix: e.g. "
                         "importance_level='sequence'.")


def aggregate_token_losses(
    token_losses: torch.Tensor,
    token_rows: torch.Tensor,
    aggregation: LossAggregation = "token_mean",
    max_new_tokens: int | None = None,
) -> torch.Tensor:
    """One loss from per-token terms; ``token_rows[i]`` is token i's sequence in the minibatch
    (``TokenSequences.token_rows``: every row holds at least one token).

    ``"token_mean"``: ``sum / n_tokens`` (DAPO; every token weighs alike). ``"sequence_mean"``:
    each sequence's mean, then their mean (GRPO; a token of a short sequence weighs more).
    ``"sequence_sum_normalized"``: ``sum / (max_new_tokens * n_sequences)`` (Dr. GRPO; a
    constant, so no length bias and no dependence on the minibatch's token count).
    """
    if aggregation == "token_mean":
        return token_losses.mean()
    n_sequences = int(token_rows.max()) + 1
    if aggregation == "sequence_mean":
        sums = torch.zeros(n_sequences, dtype=token_losses.dtype, device=token_losses.device)
        sums = sums.index_add(0, token_rows, token_losses)
        lengths = torch.bincount(token_rows, minlength=n_sequences)
        return (sums / lengths).mean()
    if aggregation == "sequence_sum_normalized":
        if max_new_tokens is None:
            raise ValueError("sequence_sum_normalized divides by max_new_tokens * n_sequences: pass max_new_tokens")
        return token_losses.sum() / (max_new_tokens * n_sequences)
    raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {aggregation!r}")


def clipped_surrogate(
    advantages: torch.Tensor, ratio: torch.Tensor, clip_range: float, clip_range_high: float | None = None
) -> torch.Tensor:
    """Per-token clipped surrogate (to maximise): ``min(A r, A clip(r, 1 - clip_range, 1 + high))``,
    ``high = clip_range_high`` (DAPO's clip-higher) or ``clip_range`` (PPO's symmetric clip)."""
    high = clip_range if clip_range_high is None else clip_range_high
    return torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + high))


def importance_log_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, token_rows: torch.Tensor,
    importance_level: ImportanceLevel = "token",
) -> torch.Tensor:
    """Per-token ``log r``: each token's own ``log pi - log pi_old`` (``"token"``), or its
    sequence's mean of them (``"sequence"``, GSPO: the log of the geometric mean of the
    sequence's ratios, length-normalised so that long and short sequences clip alike)."""
    check_importance_level(importance_level)
    log_ratio = log_prob - old_log_prob
    if importance_level == "token":
        return log_ratio
    n_sequences = int(token_rows.max()) + 1
    sums = torch.zeros(n_sequences, dtype=log_ratio.dtype, device=log_ratio.device).index_add(0, token_rows, log_ratio)
    lengths = torch.bincount(token_rows, minlength=n_sequences).to(log_ratio.dtype)
    return (sums / lengths)[token_rows]


def cispo_surrogate(
    advantages: torch.Tensor, ratio: torch.Tensor, log_prob: torch.Tensor, clip_range: float,
    clip_range_high: float | None = None,
) -> torch.Tensor:
    """Per-token CISPO objective (to maximise): ``sg(clip(r, 1 - clip_range, 1 + high)) * A *
    log pi``. Its gradient is ``clip(r) * A * grad log pi`` for every token: the weight is
    bounded, the update never cut off (MiniMax-M1)."""
    high = clip_range if clip_range_high is None else clip_range_high
    weight = torch.clamp(ratio, 1 - clip_range, 1 + high).detach()
    return weight * advantages * log_prob


def policy_token_losses(
    advantages: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor, token_rows: torch.Tensor,
    clip_range: float, clip_range_high: float | None = None, policy_loss: PolicyLoss = "clip",
    importance_level: ImportanceLevel = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token policy loss (to minimise) and the importance ratio it used, with the
    module doc's ``policy_loss`` and ``importance_level``."""
    check_policy_loss(policy_loss)
    ratio = torch.exp(importance_log_ratio(log_prob, old_log_prob, token_rows, importance_level))
    if policy_loss == "cispo":
        return -cispo_surrogate(advantages, ratio, log_prob, clip_range, clip_range_high), ratio
    return -clipped_surrogate(advantages, ratio, clip_range, clip_range_high), ratio


def clipped_update(
    agent: Any, loss_aggregation: LossAggregation = "token_mean", clip_range_high: float | None = None,
    policy_loss: PolicyLoss = "clip", importance_level: ImportanceLevel = "token", max_new_tokens: int | None = None,
) -> None:
    """SB3's ``PPO.train`` step by step, with the KL to the reference in the loss where the
    agent puts it there (``kl_placement="loss"``), the value term only where the agent has
    a critic (``trains_value_head``), and the GRPO-family options (module doc).

    As SB3's: ``n_epochs`` passes over the rollout in minibatches; the clipped surrogate
    on the advantages, standardised per minibatch only with
    ``advantage_normalization="minibatch"``; the entropy bonus; SB3's value loss (clipped
    with ``clip_range_vf``) for PPO; the ``target_kl`` early stop before the minibatch's
    step; gradient clipping; the same logs. Added: ``beta * KL`` (``kl_estimate`` with the
    agent's estimator, the tokens held fixed, gradient through the current log-prob), the
    aggregation of the per-token terms (policy, entropy, KL) over the minibatch, and the
    policy term's ``policy_loss`` and ``importance_level`` (module doc). With the defaults
    and ``beta = 0`` it makes SB3's ``PPO.train``'s update. ``max_new_tokens``: Dr. GRPO's
    constant (``loss_aggregation="sequence_sum_normalized"`` needs it).
    """
    agent.policy.set_training_mode(True)
    agent._update_learning_rate(agent.policy.optimizer)
    clip_range = agent.clip_range(agent._current_progress_remaining)
    clip_high = clip_range if clip_range_high is None else clip_range_high
    trains_critic = agent.trains_value_head
    if trains_critic and agent.clip_range_vf is not None:
        clip_range_vf = agent.clip_range_vf(agent._current_progress_remaining)
    beta = agent.kl_controller.value
    pg_losses, value_losses, kl_losses, entropy_losses, clip_fractions = [], [], [], [], []
    continue_training = True
    for _ in range(agent.n_epochs):
        approx_kls = []  # as SB3: the logged approx_kl is the last epoch's
        for batch in agent.rollout_buffer.get(agent.batch_size):
            actions = batch.actions.long().flatten()
            values, log_prob, entropy = agent.policy.evaluate_actions(batch.observations, actions)
            rows = batch.observations.token_rows

            def aggregate(token_losses: torch.Tensor) -> torch.Tensor:
                return aggregate_token_losses(token_losses, rows, loss_aggregation, max_new_tokens)

            advantages = batch.advantages
            if agent.normalize_advantage and len(advantages) > 1:  # advantage_normalization="minibatch"
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

            # Clipped surrogate, as SB3's PPO (clip-higher: an upper bound of its own), or CISPO;
            # the ratio of each token or of its sequence (GSPO).
            token_losses, ratio = policy_token_losses(advantages, log_prob, batch.old_log_prob, rows, clip_range,
                                                      clip_range_high, policy_loss, importance_level)
            policy_term = aggregate(token_losses)
            pg_losses.append(policy_term.item())
            if clip_range_high is None:
                clipped = torch.abs(ratio - 1) > clip_range  # SB3's
            else:
                clipped = (ratio < 1 - clip_range) | (ratio > 1 + clip_high)
            clip_fractions.append(torch.mean(clipped.float()).item())
            entropy_loss = aggregate(-entropy)
            entropy_losses.append(entropy_loss.item())

            loss = policy_term + agent.ent_coef * entropy_loss  # SB3's entropy bonus
            if trains_critic:  # SB3's value term (PPO)
                values = values.flatten()
                if agent.clip_range_vf is not None:
                    values = batch.old_values + torch.clamp(values - batch.old_values, -clip_range_vf, clip_range_vf)
                value_loss = F.mse_loss(batch.returns, values)
                value_losses.append(value_loss.item())
                loss = loss + agent.vf_coef * value_loss
            if agent.kl_placement == "loss":  # the KL to the reference in the loss
                kl_loss = aggregate(kl_estimate(log_prob, batch.ref_log_prob, agent.kl_estimator))
                kl_losses.append(kl_loss.item())
                if beta != 0:  # kl_coef=0: no term at all (0 times an overflowing k3 would be NaN)
                    loss = loss + beta * kl_loss

            with torch.no_grad():  # Schulman's estimator of KL(old || new), as SB3's PPO logs it
                log_ratio = log_prob - batch.old_log_prob
                approx_kls.append(torch.mean(torch.exp(log_ratio) - 1 - log_ratio).item())
            if agent.target_kl is not None and approx_kls[-1] > 1.5 * agent.target_kl:
                continue_training = False  # SB3's early stop, before this minibatch's step
                break

            agent.policy.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.policy.parameters(), agent.max_grad_norm)
            agent.policy.optimizer.step()
        agent._n_updates += 1
        if not continue_training:
            break
    agent.logger.record("train/entropy_loss", np.mean(entropy_losses))
    agent.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
    if trains_critic:
        agent.logger.record("train/value_loss", np.mean(value_losses))
        buffer = agent.rollout_buffer
        agent.logger.record("train/explained_variance",
                            explained_variance(buffer.values.flatten(), buffer.returns.flatten()))
    if kl_losses:
        agent.logger.record("train/kl_loss", np.mean(kl_losses))
    agent.logger.record("train/approx_kl", np.mean(approx_kls))
    agent.logger.record("train/clip_fraction", np.mean(clip_fractions))
    agent.logger.record("train/loss", loss.item())
    agent.logger.record("train/n_updates", agent._n_updates, exclude="tensorboard")
    agent.logger.record("train/clip_range", clip_range)
    if clip_range_high is not None:
        agent.logger.record("train/clip_range_high", clip_high)
    if trains_critic and agent.clip_range_vf is not None:
        agent.logger.record("train/clip_range_vf", clip_range_vf)
