"""PPO for language models on one page: what textenv's PPO computes, to read top to bottom.

In the spirit of CleanRL's ``ppo.py``: plain PyTorch, every hyperparameter named
and explained in ``Args``, one function per step of the algorithm, in the order
they run, and a ``main`` that trains::

    python scripts/ppo_reference.py                        # the sentiment task with the default model
    python scripts/ppo_reference.py --iterations 50 --kl-coef 0.1

It is the algorithm of ``agents.LMPPO`` (whose defaults are ``Args``' defaults),
with the same per-token math, and it serves the project twice:

- ``tests/test_ppo_reference.py`` feeds one rollout collected by the framework to
  ``ppo_update`` below and finds the parameters the framework's update finds (1e-5);
- ``scripts/benchmark.py`` times it as the floor: the tightest honest loop doing the
  work of one framework PPO iteration and nothing more.

One iteration (``ppo_iteration``), and where the framework does each step:

1. rollout (``collect_rollout``): sample up to ``new_tokens`` tokens for each of
   ``n_episodes`` prompts with a KV cache, keeping each token's log-prob under the
   sampling policy (the "old" log-prob) and the value of the state it was sampled
   in; then the frozen reference model scores every sampled token in one
   teacher-forced pass. Framework: ``agents/rollout.py`` and
   ``policies/decoding.py``; ``textenv/vector.py`` for the reference and the score.
2. rewards (``kl_penalty_rewards``): the task score on each episode's last token,
   and the KL penalty ``-kl_coef * (log pi_old(a|s) - log pi_ref(a|s))`` on every
   token. Framework: ``agents/kl_penalty.py``.
3. advantages (``gae``, ``standardize``): GAE over the tokens of each episode, then
   standardised over the whole rollout. Framework: SB3's
   ``RolloutBuffer.compute_returns_and_advantage`` and
   ``agents.sequence_buffer.normalize_rollout_advantages``.
4. update (``ppo_update``): ``n_epochs`` passes over the rollout in ``minibatches``
   minibatches of whole episodes; per token, SB3's loss: clipped surrogate + vf_coef
   x value MSE - ent_coef x entropy; one optimizer step per minibatch after clipping
   the gradient norm. Framework: SB3's ``PPO.train`` over minibatches of
   ``agents.sequence_buffer.SequenceRolloutBuffer``, evaluated by
   ``LMActorCriticPolicy.evaluate_actions``.

Simpler here than in the framework, on purpose: a rollout is one batch of
episodes that start together and run to their end (the framework steps parallel
environments that restart whenever an episode ends, so its rollouts cut episodes at
their boundaries), the task score is a plain function, and the full-vocabulary
log-softmax of an update is computed in one piece (the framework chunks it to bound
memory).

Tensor layout, as in the environment's observations: ``sequences`` is
``(n, n_prompt + T)``: each prompt left-padded to ``n_prompt`` columns, then the
``T`` sampled tokens, so token ``t`` sits at column ``n_prompt + t`` and was sampled
in the state that ends at column ``n_prompt + t - 1``. Per-token quantities are
``(n, T)``; ``token_mask`` says which of them belong to the episode (an episode
ends at its EOS token; the tokens sampled after it are ignored).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from policies.sampling import sample_tokens  # exact inverse-CDF sampling, as the framework
from textenv.lm.models import load_causal_lm, load_tokenizer  # dropout off, clear errors


@dataclass
class Args:
    # -- the task ------------------------------------------------------------------------
    model: str = "default"
    """Policy and reference start from this causal LM: ``"default"``, a name, or a path."""
    n_prompts: int = 256
    """Training prompts: the first ``n_prompts`` review openings of the sentiment task."""
    max_prompt_len: int = 24
    """Prompts are left-padded (or cut from the left) to this many tokens."""
    new_tokens: int = 20
    """Tokens sampled per episode; an episode ends earlier at EOS."""
    # -- the rollout -----------------------------------------------------------------------
    n_episodes: int = 16
    """Episodes per rollout, decoded together as one batch."""
    iterations: int = 20
    """Rollout + update cycles of ``main``."""
    # -- the rewards and advantages ------------------------------------------------------------
    kl_coef: float = 0.05
    """beta of the per-token KL penalty ``-beta * (log pi_old - log pi_ref)``: how far the
    policy may move from the reference model to raise the score."""
    gamma: float = 1.0
    """Discount per token: 1, since the score arrives at the last token and must reach the
    first undiscounted."""
    gae_lambda: float = 0.95
    """GAE's lambda: 1 gives Monte Carlo returns (no bias, high variance), 0 one-step TD."""
    # -- the update -------------------------------------------------------------------------
    learning_rate: float = 2e-4
    """Adam's step size (small: the body is pretrained)."""
    n_epochs: int = 4
    """Passes over each rollout."""
    minibatches: int = 4
    """Minibatches per epoch, each of whole episodes (one forward pass per episode)."""
    clip_range: float = 0.2
    """PPO's epsilon: a token whose probability ratio left ``[1 - eps, 1 + eps]`` in the
    direction of its advantage gets no more gradient."""
    vf_coef: float = 0.5
    """Weight of the critic's loss (the value head shares the body with the actor)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (the KL penalty already keeps the policy spread)."""
    max_grad_norm: float = 1.0
    """The gradient's global norm is clipped to this before every optimizer step."""
    value_head_init_std: float = 0.01
    """Std of the value head's initial weights (bias 0): small, so that the first value
    estimates do not swamp the advantages."""
    # -- the run ---------------------------------------------------------------------------
    seed: int = 0
    """Seeds the value head's initialisation, the prompt draws and the sampling."""
    device: str = "cpu"
    """Where models and tensors live (``"cuda"`` on a GPU)."""


# -- models and prompts --------------------------------------------------------------------------


def make_models(args: Args) -> tuple[Any, Any, torch.nn.Linear]:
    """The policy (LM body + LM head as the actor, a linear value head as the critic, on the
    same body) and the frozen reference model, both from ``args.model``."""
    policy = load_causal_lm(args.model, args.device)
    reference = load_causal_lm(args.model, args.device).requires_grad_(False)
    value_head = torch.nn.Linear(policy.get_output_embeddings().in_features, 1).to(args.device)
    torch.nn.init.normal_(value_head.weight, std=args.value_head_init_std)
    torch.nn.init.zeros_(value_head.bias)
    return policy, reference, value_head


def make_optimizer(policy: Any, value_head: torch.nn.Linear, args: Args) -> torch.optim.Optimizer:
    """Adam over actor and critic together (SB3's default optimizer for its policies), its step
    fused into one kernel on a CPU or CUDA (as the framework's: ``policies.guarded_optimizer``)."""
    parameters = [*policy.parameters(), *value_head.parameters()]
    return torch.optim.Adam(parameters, lr=args.learning_rate, eps=1e-5, fused=fused_step(parameters))


def fused_step(parameters: Sequence[torch.Tensor]) -> bool:
    """Whether Adam's fused step runs on these weights' device (CPU and CUDA)."""
    return all(p.device.type in ("cpu", "cuda") for p in parameters)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_prompt_len: int, device: Any):
    """Left-padded ``(input_ids, attention_mask)`` of width ``max_prompt_len``."""
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding="max_length", truncation=True,
                      max_length=max_prompt_len)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (the first real token is position 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-prob of each of ``tokens`` under ``logits`` (in float32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


# -- 1. the rollout --------------------------------------------------------------------------------


@torch.no_grad()
def decode(
    policy: Any, value_head: torch.nn.Linear | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    new_tokens: int, eos_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """KV-cached sampling of ``new_tokens`` tokens per row. Returns the tokens and, for each,
    the policy's log-prob of it, the value of the state it was sampled in (``None`` without a
    ``value_head``: the critic-free methods of ``scripts/grpo_reference.py``), and whether it
    belongs to the episode (``(n, new_tokens)`` each).

    One body pass over the prompts, then one per sampled token; both heads read only the
    newest hidden state. Rows whose episode ended at EOS go on decoding with the batch
    (cheaper than shrinking it), and their later tokens are masked out. The last token
    ends every episode (its text is scored), so nothing is decoded after it.
    """
    body, lm_head = policy.base_model, policy.get_output_embeddings()
    cache = DynamicCache(config=policy.config)
    mask, positions = attention_mask, positions_of(attention_mask)
    hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                  use_cache=True).last_hidden_state[:, -1]
    running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens, logps, values, in_episode = [], [], [], []
    for t in range(new_tokens):
        logits = lm_head(hidden).float()
        action = sample_tokens(logits)
        tokens.append(action)
        logps.append(token_logprobs(logits, action))
        if value_head is not None:
            values.append(value_head(hidden.float())[:, 0])
        in_episode.append(running)
        if eos_token_id is not None:
            running = running & (action != eos_token_id)
        if t == new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        hidden = body(input_ids=action[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=True).last_hidden_state[:, -1]
    values_or_none = torch.stack(values, 1) if value_head is not None else None
    return torch.stack(tokens, 1), torch.stack(logps, 1), values_or_none, torch.stack(in_episode, 1)


def teacher_forced_hidden(model: Any, sequences: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """One body pass over whole sequences; the final hidden states of the states in which
    the sampled tokens were sampled (columns ``n_prompt - 1 .. W - 2``): ``(n, T, hidden)``.
    The last column predicts nothing, so it is left out of the pass."""
    hidden = model.base_model(input_ids=sequences[:, :-1], attention_mask=attention_mask[:, :-1],
                              position_ids=positions_of(attention_mask)[:, :-1]).last_hidden_state
    return hidden[:, n_prompt - 1 :]


@torch.no_grad()
def reference_logprobs(reference: Any, sequences: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """The reference's log-prob of every sampled token, in one teacher-forced pass."""
    hidden = teacher_forced_hidden(reference, sequences, attention_mask, n_prompt)
    return token_logprobs(reference.get_output_embeddings()(hidden), sequences[:, n_prompt:])


@dataclass
class Rollout:
    """``n`` episodes: ``n_prompt`` prompt columns + ``T`` sampled tokens each."""

    sequences: torch.Tensor  # (n, n_prompt + T) token ids
    attention_mask: torch.Tensor  # (n, n_prompt + T)
    token_mask: torch.Tensor  # (n, T) bool: the token belongs to the episode
    logp: torch.Tensor  # (n, T) the sampling policy's log-prob of each token (the "old" log-probs)
    values: torch.Tensor  # (n, T) the value of the state each token was sampled in
    ref_logp: torch.Tensor  # (n, T) the reference's log-prob of each token

    @property
    def n_prompt(self) -> int:
        return self.sequences.shape[1] - self.logp.shape[1]


def collect_rollout(
    policy: Any, reference: Any, value_head: torch.nn.Linear, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, new_tokens: int, eos_token_id: int | None = None,
) -> Rollout:
    """KV-cached policy decode with log-probs and values, then one teacher-forced reference pass."""
    tokens, logp, values, token_mask = decode(policy, value_head, input_ids, attention_mask, new_tokens, eos_token_id)
    sequences = torch.cat([input_ids, tokens], 1)
    mask = torch.cat([attention_mask, torch.ones_like(tokens)], 1)
    ref_logp = reference_logprobs(reference, sequences, mask, input_ids.shape[1])
    return Rollout(sequences, mask, token_mask, logp, values, ref_logp)


# -- 2. rewards ------------------------------------------------------------------------------------


def kl_penalty_rewards(rollout: Rollout, scores: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward: ``-kl_coef * (logp - ref_logp)``, plus the score on each episode's
    last token; 0 outside the episodes."""
    rewards = -kl_coef * (rollout.logp - rollout.ref_logp) * rollout.token_mask
    last = rollout.token_mask.sum(1) - 1
    rewards[torch.arange(len(last), device=last.device), last] += scores
    return rewards


# -- 3. advantages ---------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor, gamma: float,
        gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (the critic's targets) by GAE over each episode's tokens.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)``, ``A_t = delta_t + gamma * lambda * A_{t+1}``;
    an episode is over after its last token: nothing is bootstrapped from beyond it."""
    advantages = torch.zeros_like(rewards)
    next_advantage = next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(token_mask[:, t], delta + gamma * gae_lambda * next_advantage, 0.0)
        next_value = torch.where(token_mask[:, t], values[:, t], 0.0)
        advantages[:, t] = next_advantage
    return advantages, advantages + values


def standardize(advantages: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit (unbiased) std over every token of the rollout, once, before the
    update: a minibatch of whole episodes holds too few of them to standardise alone."""
    valid = advantages[token_mask]
    return (advantages - valid.mean()) / (valid.std() + 1e-8)


# -- 4. the update ---------------------------------------------------------------------------------


def evaluate_tokens(
    policy: Any, value_head: torch.nn.Linear, sequences: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The update's forward pass: the current policy's log-prob, value and entropy at every
    sampled token of ``sequences`` (``(n, T)`` each), one teacher-forced pass."""
    hidden = teacher_forced_hidden(policy, sequences, attention_mask, n_prompt)
    logp_all = torch.log_softmax(policy.get_output_embeddings()(hidden).float(), dim=-1)
    logp = logp_all.gather(-1, sequences[:, n_prompt:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, value_head(hidden.float())[..., 0], entropy


def ppo_loss(
    policy: Any, value_head: torch.nn.Linear, rollout: Rollout, rows: torch.Tensor, advantages: torch.Tensor,
    returns: torch.Tensor, args: Args,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SB3's PPO loss over the tokens of the episodes ``rows`` (means over tokens)."""
    logp, values, entropy = evaluate_tokens(
        policy, value_head, rollout.sequences[rows], rollout.attention_mask[rows], rollout.n_prompt
    )
    valid = rollout.token_mask[rows]  # from here on: flat vectors of the minibatch's tokens
    logp, values, entropy = logp[valid], values[valid], entropy[valid]
    old_logp, advantages, returns = rollout.logp[rows][valid], advantages[rows][valid], returns[rows][valid]

    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)  # pi(a|s) / pi_old(a|s): exactly 1 before the first step
    policy_loss = -torch.min(advantages * ratio, advantages * ratio.clamp(1 - args.clip_range, 1 + args.clip_range)).mean()
    value_loss = F.mse_loss(returns, values)
    entropy_loss = -entropy.mean()
    loss = policy_loss + args.ent_coef * entropy_loss + args.vf_coef * value_loss
    with torch.no_grad():
        stats = {
            "policy_gradient_loss": policy_loss.item(),
            "value_loss": value_loss.item(),
            "entropy_loss": entropy_loss.item(),
            "clip_fraction": ((ratio - 1).abs() > args.clip_range).float().mean().item(),
            "approx_kl": ((ratio - 1) - log_ratio).mean().item(),
        }
    return loss, stats


def ppo_update(
    policy: Any, value_head: torch.nn.Linear, optimizer: torch.optim.Optimizer, rollout: Rollout,
    advantages: torch.Tensor, returns: torch.Tensor, args: Args,
    partitions: Sequence[Sequence[torch.Tensor]] | None = None,
) -> dict[str, float]:
    """``n_epochs`` passes over the rollout, each a random partition of its episodes into
    ``minibatches`` minibatches (``partitions``: given ones, one list of row indices per
    epoch); per minibatch: loss, backward, clip the gradient norm, one optimizer step.
    Returns the losses averaged over minibatches (the last epoch's ``approx_kl``), as SB3 logs them."""
    parameters = [*policy.parameters(), *value_head.parameters()]
    n_episodes = rollout.sequences.shape[0]
    logged: dict[str, list[float]] = {}
    for epoch in range(args.n_epochs):
        minibatches = partitions[epoch] if partitions is not None else torch.randperm(n_episodes).chunk(args.minibatches)
        logged["approx_kl"] = []
        for rows in minibatches:
            loss, stats = ppo_loss(policy, value_head, rollout, rows, advantages, returns, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
            for key, value in stats.items():
                logged.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in logged.items()}


# -- one iteration ---------------------------------------------------------------------------------


def ppo_iteration(
    policy: Any, reference: Any, value_head: torch.nn.Linear, optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor, attention_mask: torch.Tensor, score: Callable[[Rollout], torch.Tensor], args: Args,
    eos_token_id: int | None = None,
) -> dict[str, float]:
    """Rollout, rewards, advantages, update (steps 1 to 4 above). ``score(rollout)``: the task
    score of every episode, ``(n,)``."""
    rollout = collect_rollout(policy, reference, value_head, input_ids, attention_mask, args.new_tokens, eos_token_id)
    scores = score(rollout)
    rewards = kl_penalty_rewards(rollout, scores, args.kl_coef)
    advantages, returns = gae(rewards, rollout.values, rollout.token_mask, args.gamma, args.gae_lambda)
    advantages = standardize(advantages, rollout.token_mask)
    stats = ppo_update(policy, value_head, optimizer, rollout, advantages, returns, args)
    kl = ((rollout.logp - rollout.ref_logp) * rollout.token_mask).sum(1).mean().item()
    return {"score": scores.mean().item(), "kl": kl, "tokens": int(rollout.token_mask.sum()), **stats}


# -- main: the sentiment task (textenv/PositiveSentiment-v0's prompts and VADER score) ---------------


def parse_args(argv: Sequence[str] | None = None, args_class: type = Args, description: str | None = None) -> Any:
    """``--learning-rate 1e-4`` and so on, one option per field of ``args_class`` (``Args``),
    its text the help."""
    body = ast.parse(inspect.getsource(args_class)).body[0].body
    docs = {node.target.id: " ".join(text.value.value.split()) for node, text in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(text, ast.Expr)}
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    for field in dataclasses.fields(args_class):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                            help=docs[field.name] + " (default: %(default)s)")
    return args_class(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    args = parse_args(argv)
    import transformers
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from textenv.tasks.corpus import review_openings

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    policy, reference, value_head = make_models(args)
    tokenizer = load_tokenizer(args.model)
    optimizer = make_optimizer(policy, value_head, args)
    prompts = review_openings(args.n_prompts)
    analyzer = SentimentIntensityAnalyzer()

    def vader_score(rollout: Rollout) -> torch.Tensor:
        """VADER's compound score of prompt + completion (without padding, EOS and what follows)."""
        keep = torch.cat([rollout.attention_mask[:, : rollout.n_prompt].bool(), rollout.token_mask], 1)
        texts = [tokenizer.decode(ids[row_keep], skip_special_tokens=True)
                 for ids, row_keep in zip(rollout.sequences.cpu(), keep.cpu())]
        return torch.tensor([analyzer.polarity_scores(text)["compound"] for text in texts], device=args.device)

    history = []
    for iteration in range(1, args.iterations + 1):
        batch = [prompts[i] for i in torch.randint(len(prompts), (args.n_episodes,), generator=generator).tolist()]
        input_ids, attention_mask = tokenize_prompts(tokenizer, batch, args.max_prompt_len, args.device)
        start = time.perf_counter()
        stats = ppo_iteration(policy, reference, value_head, optimizer, input_ids, attention_mask, vader_score, args,
                              eos_token_id=tokenizer.eos_token_id)
        stats["tokens_per_second"] = stats["tokens"] / (time.perf_counter() - start)
        history.append(stats)
        print(f"iteration {iteration:3d}: score {stats['score']:+.3f}  KL {stats['kl']:.3f}  "
              f"policy loss {stats['policy_gradient_loss']:+.4f}  value loss {stats['value_loss']:.4f}  "
              f"clip fraction {stats['clip_fraction']:.3f}  {stats['tokens_per_second']:,.0f} tok/s", flush=True)
    return history


if __name__ == "__main__":
    main()
