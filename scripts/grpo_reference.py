"""GRPO and RLOO for language models on one page: what textenv's group methods compute.

The sibling of ``scripts/ppo_reference.py`` (whose decode, teacher-forced passes and
prompt handling it reuses), for the critic-free methods that compare ``group_size``
completions of the same prompt::

    python scripts/grpo_reference.py                         # GRPO on the sentiment task, default model
    python scripts/grpo_reference.py --method rloo --iterations 50

It is the algorithm of ``agents.LMGRPO`` / ``agents.LMRLOO`` as the benchmark runs them
(``kl_placement="loss"``, k3, a fixed beta, token-mean aggregation), and
``scripts/benchmark.py --group`` times it as their floor: the tightest honest loop doing
the work of one iteration and nothing more.

One iteration (``group_iteration``):

1. rollout (``ppo_reference.collect_rollout`` without a value head): each prompt repeated
   ``group_size`` times (``repeat_groups``, consecutive rows), ``new_tokens`` tokens sampled
   per row with a KV cache, the sampling policy's log-prob of each kept as the "old"
   log-prob; then the frozen reference scores every token in one teacher-forced pass.
   Every completion runs its full length (no EOS stop), as in the benchmark's workloads.
2. scores and group advantages: one score per completion; GRPO (Shao et al., 2024):
   ``(R - mean) / (std + 1e-4)`` within the group (unbiased std, as the framework's);
   RLOO (Ahmadian et al., 2024): ``R`` minus the mean of the group's *other* k-1 scores.
   Every token of a completion gets its completion's advantage.
3. update (``group_update``): no value head; ``n_epochs`` passes in ``minibatches``
   minibatches of whole completions; per token the clipped surrogate plus
   ``kl_coef * k3``, ``k3 = exp(ref - logp) - (ref - logp) - 1`` (Schulman's estimator,
   gradient through the current log-prob), averaged over the minibatch's tokens; backward,
   clip the gradient norm, one Adam step per minibatch.

Tighter than the framework on purpose, as a floor should be: the update's forward
computes only what the loss needs (the sampled tokens' log-probs; no entropy, whose
coefficient is 0, and no value head).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

import ppo_reference
from ppo_reference import Rollout, collect_rollout, teacher_forced_hidden, token_logprobs, tokenize_prompts
from textenv.lm.models import load_causal_lm, load_tokenizer

METHODS = ("grpo", "rloo")


@dataclass
class Args:
    # -- the task ------------------------------------------------------------------------
    model: str = "default"
    """Policy and reference start from this causal LM: ``"default"``, a name, or a path."""
    method: str = "grpo"
    """``"grpo"`` (normalised group advantages) or ``"rloo"`` (leave-one-out baseline)."""
    n_prompts: int = 256
    """Training prompts: the first ``n_prompts`` review openings of the sentiment task."""
    max_prompt_len: int = 24
    """Prompts are left-padded (or cut from the left) to this many tokens."""
    new_tokens: int = 20
    """Tokens sampled per completion, all of them (no EOS stop)."""
    # -- the rollout -----------------------------------------------------------------------
    n_episodes: int = 16
    """Completions per rollout (``n_episodes / group_size`` prompts), decoded as one batch."""
    group_size: int = 4
    """Completions per prompt (k): the group that is each completion's baseline."""
    iterations: int = 20
    """Rollout + update cycles of ``main``."""
    # -- the update -------------------------------------------------------------------------
    kl_coef: float = 0.04
    """beta of the per-token k3 KL to the reference in the loss (fixed)."""
    learning_rate: float = 2e-4
    """Adam's step size."""
    n_epochs: int = 4
    """Passes over each rollout."""
    minibatches: int = 4
    """Minibatches per epoch, each of whole completions."""
    clip_range: float = 0.2
    """PPO's epsilon of the clipped surrogate."""
    max_grad_norm: float = 1.0
    """The gradient's global norm is clipped to this before every optimizer step."""
    # -- the run ---------------------------------------------------------------------------
    seed: int = 0
    """Seeds the prompt draws and the sampling."""
    device: str = "cpu"
    """Where models and tensors live (``"cuda"`` on a GPU)."""


def make_models(args: Args) -> tuple[Any, Any]:
    """The policy and the frozen reference model, both from ``args.model``: no value head."""
    return load_causal_lm(args.model, args.device), load_causal_lm(args.model, args.device).requires_grad_(False)


def make_optimizer(policy: Any, args: Args) -> torch.optim.Optimizer:
    """Adam (SB3's optimizer and eps, fused where it can be, as ``ppo_reference``)."""
    parameters = list(policy.parameters())
    return torch.optim.Adam(parameters, lr=args.learning_rate, eps=1e-5, fused=ppo_reference.fused_step(parameters))


# -- 1. the rollout --------------------------------------------------------------------------------


def repeat_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, group_size: int):
    """Each prompt row ``group_size`` times in a row: rows ``g*k .. g*k + k - 1`` are group ``g``."""
    return input_ids.repeat_interleave(group_size, 0), attention_mask.repeat_interleave(group_size, 0)


# -- 2. group advantages ---------------------------------------------------------------------------


def grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(R - group mean) / (group std + 1e-4)``, std unbiased; ``scores``: ``(n,)``, groups consecutive."""
    groups = scores.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``R`` minus the mean of the group's other ``k - 1`` scores."""
    groups = scores.view(-1, group_size)
    return (groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)).view(-1)


def group_advantages(scores: torch.Tensor, group_size: int, method: str) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return (grpo_advantages if method == "grpo" else rloo_advantages)(scores, group_size)


# -- 3. the update ---------------------------------------------------------------------------------


def current_logprobs(policy: Any, sequences: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """The current policy's log-prob of every sampled token, one teacher-forced pass (``(n, T)``)."""
    hidden = teacher_forced_hidden(policy, sequences, attention_mask, n_prompt)
    return token_logprobs(policy.get_output_embeddings()(hidden), sequences[:, n_prompt:])


def group_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, args: Args
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token mean of ``-min(A r, A clip(r)) + kl_coef * k3`` over ``(rows, T)`` tokens;
    ``advantages``: ``(rows,)``, one per completion."""
    ratio = torch.exp(logp - old_logp)
    advantages = advantages[:, None]
    surrogate = torch.min(advantages * ratio, advantages * ratio.clamp(1 - args.clip_range, 1 + args.clip_range))
    log_ratio_ref = ref_logp - logp
    k3 = torch.exp(log_ratio_ref) - log_ratio_ref - 1
    policy_loss, kl = -surrogate.mean(), k3.mean()
    stats = {"policy_gradient_loss": policy_loss.item(), "kl_loss": kl.item(),
             "clip_fraction": ((ratio - 1).abs() > args.clip_range).float().mean().item()}
    return policy_loss + args.kl_coef * kl, stats


def group_update(
    policy: Any, optimizer: torch.optim.Optimizer, rollout: Rollout, advantages: torch.Tensor, args: Args,
    partitions: Sequence[Sequence[torch.Tensor]] | None = None,
) -> dict[str, float]:
    """``n_epochs`` random partitions of the completions into ``minibatches`` minibatches
    (``partitions``: given ones); per minibatch: loss, backward, clip, one Adam step."""
    logged: dict[str, list[float]] = {}
    for epoch in range(args.n_epochs):
        if partitions is None:
            minibatches = torch.randperm(len(advantages)).chunk(args.minibatches)
        else:
            minibatches = partitions[epoch]
        for rows in minibatches:
            logp = current_logprobs(policy, rollout.sequences[rows], rollout.attention_mask[rows], rollout.n_prompt)
            loss, stats = group_loss(logp, rollout.logp[rows], rollout.ref_logp[rows], advantages[rows], args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            for key, value in stats.items():
                logged.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in logged.items()}


# -- one iteration ---------------------------------------------------------------------------------


def group_iteration(
    policy: Any, reference: Any, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, score: Callable[[Rollout], torch.Tensor], args: Args,
) -> dict[str, float]:
    """Rollout of ``group_size`` completions per prompt row of ``input_ids``, scores, group
    advantages, update (steps 1 to 3 above). ``score(rollout)``: one score per completion."""
    input_ids, attention_mask = repeat_groups(input_ids, attention_mask, args.group_size)
    rollout = collect_rollout(policy, reference, None, input_ids, attention_mask, args.new_tokens)
    scores = score(rollout)
    advantages = group_advantages(scores, args.group_size, args.method)
    stats = group_update(policy, optimizer, rollout, advantages, args)
    kl = (rollout.logp - rollout.ref_logp).sum(1).mean().item()
    return {"score": scores.mean().item(), "kl": kl, "tokens": rollout.logp.numel(), **stats}


# -- main: the sentiment task (the review openings and VADER, as ppo_reference.main) --------------


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    args = ppo_reference.parse_args(argv, Args, __doc__.split("\n\n")[0])
    import transformers
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from textenv.tasks.corpus import review_openings

    if args.n_episodes % args.group_size:
        raise SystemExit(f"--n-episodes ({args.n_episodes}) must be a multiple of --group-size ({args.group_size})")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    policy, reference = make_models(args)
    tokenizer = load_tokenizer(args.model)
    optimizer = make_optimizer(policy, args)
    prompts = review_openings(args.n_prompts)
    analyzer = SentimentIntensityAnalyzer()

    def vader_score(rollout: Rollout) -> torch.Tensor:
        texts = tokenizer.batch_decode(rollout.sequences, skip_special_tokens=True)
        return torch.tensor([analyzer.polarity_scores(text)["compound"] for text in texts], device=args.device)

    history = []
    n_groups = args.n_episodes // args.group_size
    for iteration in range(1, args.iterations + 1):
        batch = [prompts[i] for i in torch.randint(len(prompts), (n_groups,), generator=generator).tolist()]
        input_ids, attention_mask = tokenize_prompts(tokenizer, batch, args.max_prompt_len, args.device)
        start = time.perf_counter()
        stats = group_iteration(policy, reference, optimizer, input_ids, attention_mask, vader_score, args)
        stats["tokens_per_second"] = stats["tokens"] / (time.perf_counter() - start)
        history.append(stats)
        print(f"iteration {iteration:3d}: score {stats['score']:+.3f}  KL {stats['kl']:.3f}  "
              f"policy loss {stats['policy_gradient_loss']:+.4f}  k3 {stats['kl_loss']:.4f}  "
              f"clip fraction {stats['clip_fraction']:.3f}  {stats['tokens_per_second']:,.0f} tok/s", flush=True)
    return history


if __name__ == "__main__":
    main()
