"""Throughput of the framework against the tightest honest bare PyTorch loops.

Every figure is generated tokens per second, measured in this process on this
machine, so ratios compare like with like. The bare loops (the "floor") do the
work of one framework PPO iteration and nothing more; a ratio below 1 is what
the framework's generality (Gymnasium env, SB3 buffers and callbacks) costs.

- rollout: the agent's ``collect_rollouts`` (policy decode, env steps, reference
  log-probs, GAE; task scoring excluded) against ``bare_rollout``: a KV-cached policy
  decode that yields each sampled token's log-prob and value, then one
  teacher-forced reference pass over the finished sequences;
- update: the agent's ``train`` against ``bare_ppo_update``: the same n_epochs x
  minibatches of forward + backward + clip_grad_norm + AdamW over the rollout's
  sequences (whole sequences per minibatch, one teacher-forced pass each);
- end to end: full iterations (rollout, scoring, update) of the fast path, of
  SB3's stock path with the same policy, and of the tight bare PPO loop
  (``measure_bare_ppo``): ``bare_rollout``, VADER on the decoded texts, per-token
  rewards ``-0.05 * (logp - ref_logp)`` plus the score on the last token, GAE
  (gamma 1, lambda 0.95), ``bare_ppo_update``. The decode's log-probs and values
  are used as the old log-probs and values, not recomputed (a test checks they
  equal a teacher-forced recomputation).

Workloads use randomly initialised GPT-2 models and a word-level tokenizer built
here (no downloads); prompts are 8-16 random words, and the tokenizer has no EOS
token, so every episode runs its full ``new_tokens``. ``Workload.iterations`` is
the default number of timed iterations: 16,384 generated tokens per variant on S
and L, 8,192 on M (seconds per variant on a 2-core CPU, except SB3's stock path).
"""

from __future__ import annotations

import contextlib
import gc
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Workload:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_envs: int
    new_tokens: int
    prompt_tokens: tuple[int, int] = (8, 16)
    n_epochs: int = 4
    minibatches: int = 4
    iterations: int = 1  # default number of timed iterations

    @property
    def max_prompt_len(self) -> int:
        return self.prompt_tokens[1]

    @property
    def tokens_per_iteration(self) -> int:
        return self.n_envs * self.new_tokens


WORKLOADS = {
    "S": Workload("S", n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_envs=16, new_tokens=32, iterations=32),
    "M": Workload("M", n_layer=4, n_embd=256, n_head=4, vocab_size=8000, n_envs=32, new_tokens=64, iterations=4),
    "L": Workload("L", n_layer=12, n_embd=768, n_head=12, vocab_size=50_000, n_envs=64, new_tokens=128, iterations=2),
    # A seconds-long workload for smoke tests of the benchmark itself.
    "tiny": Workload("tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_envs=4, new_tokens=6, minibatches=2),
}


# -- assets: tokenizer, model, prompts ---------------------------------------------


def build_assets(workload: Workload, folder: Path, seed: int = 0) -> tuple[Path, list[str]]:
    """A word-level tokenizer of ``vocab_size`` words and a random GPT-2, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from textenv.corpus import generate_reviews

    words: list[str] = ["[PAD]", "[UNK]"]
    seen = set(words)
    for review in generate_reviews(2000, seed=seed):
        for word in review.replace(".", " .").replace(",", " ,").split():
            if word not in seen and len(words) < workload.vocab_size:
                seen.add(word)
                words.append(word)
    words += [f"w{i}" for i in range(workload.vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=workload.vocab_size,
        n_positions=workload.max_prompt_len + workload.new_tokens,
        n_embd=workload.n_embd,
        n_layer=workload.n_layer,
        n_head=workload.n_head,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = random.Random(seed)
    low, high = workload.prompt_tokens
    prompts = [" ".join(rng.choices(words[2:], k=rng.randint(low, high))) for _ in range(256)]
    return folder, prompts


# -- timing helpers ---------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedReward:
    """Wraps a reward source and adds up the seconds spent scoring."""

    def __init__(self, source: Callable):
        self.source = source
        self.seconds = 0.0

    def __call__(self, prompts, completions):
        start = time.perf_counter()
        try:
            return self.source(prompts, completions)
        finally:
            self.seconds += time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Measurement:
    seconds: float
    tokens: int
    parts: dict[str, float] = field(default_factory=dict)


# -- the framework ------------------------------------------------------------------------


def make_framework_agent(workload: Workload, model_path: Path, prompts: list[str], fast: bool, device: torch.device):
    from agents import make_agent, make_text_vec_env

    env_kwargs = dict(
        prompts=prompts,
        model=str(model_path),
        reward="vader",
        max_prompt_len=workload.max_prompt_len,
        max_new_tokens=workload.new_tokens,
        device=device,
    )
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=workload.n_envs, seed=0, env_kwargs=env_kwargs, batched=fast)
    timers = []
    for task in {id(t): t for t in env.get_attr("task")}.values():
        task.reward_source = TimedReward(task.reward_source)
        timers.append(task.reward_source)
    batch_size = workload.tokens_per_iteration // workload.minibatches
    agent = make_agent(
        "ppo", env, fast=fast, n_steps=workload.new_tokens, batch_size=batch_size,
        n_epochs=workload.n_epochs, kl_coef=0.05, seed=0, device=device, verbose=0,
    )
    return agent, timers


class PhaseTimer:
    """Wall-clock seconds of each rollout (SB3 callback hooks) inside ``learn``."""

    def __init__(self, device: torch.device):
        from stable_baselines3.common.callbacks import BaseCallback

        timer = self

        class _Callback(BaseCallback):
            def _on_rollout_start(self) -> None:
                synchronize(device)
                timer._start = time.perf_counter()

            def _on_step(self) -> bool:
                return True

            def _on_rollout_end(self) -> None:
                synchronize(device)
                timer.rollout_seconds += time.perf_counter() - timer._start

        self.rollout_seconds = 0.0
        self.callback = _Callback()


def measure_framework(
    workload: Workload, model_path: Path, prompts: list[str], fast: bool, device: torch.device, iterations: int
) -> Measurement:
    """Full PPO iterations through ``learn``, split into rollout, scoring and update."""
    agent, reward_timers = make_framework_agent(workload, model_path, prompts, fast, device)
    agent.learn(workload.tokens_per_iteration)  # warm-up iteration (allocations, caches)
    for timer in reward_timers:
        timer.seconds = 0.0
    phases = PhaseTimer(device)
    synchronize(device)
    start = time.perf_counter()
    agent.learn(workload.tokens_per_iteration * iterations, callback=phases.callback, reset_num_timesteps=False)
    synchronize(device)
    total = time.perf_counter() - start
    scoring = sum(t.seconds for t in reward_timers)
    parts = {"rollout": phases.rollout_seconds - scoring, "scoring": scoring, "update": total - phases.rollout_seconds}
    return Measurement(total, workload.tokens_per_iteration * iterations, parts)


# -- the tight floor: bare PyTorch loops ---------------------------------------------------
#
# The same work as one framework iteration and nothing more: each quantity is computed once.
# The decode's log-probs and values serve as the old log-probs and values (a test checks
# they equal a teacher-forced recomputation); the reference scores the finished sequences
# in one teacher-forced pass; LM and value heads run only where a token is predicted.


def bare_models(model_path: Path, device: torch.device) -> tuple[Any, Any, torch.nn.Linear]:
    """Policy LM, frozen reference LM (both loaded from ``model_path``) and a linear value head."""
    from textenv.models import load_causal_lm

    policy = load_causal_lm(str(model_path), device)
    reference = load_causal_lm(str(model_path), device).requires_grad_(False)
    value_head = torch.nn.Linear(policy.get_output_embeddings().in_features, 1).to(device)
    return policy, reference, value_head


def prompt_batch(workload: Workload, model_path: Path, prompts: list[str], device: torch.device):
    """The tokenizer and one left-padded batch of ``n_envs`` prompts, ``max_prompt_len`` wide."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts[: workload.n_envs], return_tensors="pt", padding="max_length",
                      max_length=workload.max_prompt_len)
    return tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (the first real token is position 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-prob of each of ``tokens`` under ``logits`` (in float32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


@torch.no_grad()
def decode_with_logprobs_values(
    policy: Any, value_head: torch.nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KV-cached sampling of ``new_tokens`` tokens per row. Returns the tokens and, for each,
    the policy's log-prob of it and the value of the state it was sampled in (``(n, new_tokens)``).

    One body pass over the prompts, then one per sampled token; both heads read only the
    newest hidden state. The last token ends the episode (the text is scored there), so
    nothing is decoded after it.
    """
    from policies.sampling import sample_tokens
    from transformers import DynamicCache

    body, lm_head = policy.base_model, policy.get_output_embeddings()
    cache = DynamicCache(config=policy.config)
    mask, positions = attention_mask, positions_of(attention_mask)
    hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                  use_cache=True).last_hidden_state[:, -1]
    tokens, logps, values = [], [], []
    for t in range(new_tokens):
        logits = lm_head(hidden).float()
        action = sample_tokens(logits)
        tokens.append(action)
        logps.append(token_logprobs(logits, action))
        values.append(value_head(hidden.float())[:, 0])
        if t == new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        hidden = body(input_ids=action[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=True).last_hidden_state[:, -1]
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(values, 1)


def teacher_forced_hidden(model: Any, sequences: torch.Tensor, mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """One body pass over whole sequences; the final hidden states of the states in which
    the generated tokens were sampled (columns ``n_prompt - 1 .. W - 2``): ``(n, T, hidden)``.
    The last column predicts nothing, so it is left out of the pass."""
    hidden = model.base_model(input_ids=sequences[:, :-1], attention_mask=mask[:, :-1],
                              position_ids=positions_of(mask)[:, :-1]).last_hidden_state
    return hidden[:, n_prompt - 1 :]


@torch.no_grad()
def reference_logprobs(reference: Any, sequences: torch.Tensor, mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """The reference's log-prob of every generated token, in one teacher-forced pass."""
    hidden = teacher_forced_hidden(reference, sequences, mask, n_prompt)
    return token_logprobs(reference.get_output_embeddings()(hidden), sequences[:, n_prompt:])


def evaluate_tokens(
    policy: Any, value_head: torch.nn.Linear, sequences: torch.Tensor, mask: torch.Tensor, n_prompt: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The update's forward pass: log-probs, values and entropies of every generated token
    of ``sequences`` (``(n, T)`` each), one teacher-forced pass."""
    hidden = teacher_forced_hidden(policy, sequences, mask, n_prompt)
    logp_all = torch.log_softmax(policy.get_output_embeddings()(hidden).float(), dim=-1)
    logp = logp_all.gather(-1, sequences[:, n_prompt:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, value_head(hidden.float())[..., 0], entropy


@dataclass
class BareRollout:
    """One rollout: ``n`` sequences of ``n_prompt`` prompt columns + ``T`` generated tokens."""

    sequences: torch.Tensor  # (n, n_prompt + T) token ids
    mask: torch.Tensor  # (n, n_prompt + T) attention mask
    logp: torch.Tensor  # (n, T) policy log-prob of each generated token (the "old" log-probs)
    values: torch.Tensor  # (n, T) value of the state each token was sampled in
    ref_logp: torch.Tensor  # (n, T) reference log-prob of each generated token


def bare_rollout(
    policy: Any, reference: Any, value_head: torch.nn.Linear, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, new_tokens: int,
) -> BareRollout:
    """The rollout floor: KV-cached policy decode with log-probs and values, then one
    teacher-forced reference pass over the finished sequences."""
    tokens, logp, values = decode_with_logprobs_values(policy, value_head, input_ids, attention_mask, new_tokens)
    sequences = torch.cat([input_ids, tokens], 1)
    mask = torch.cat([attention_mask, torch.ones_like(tokens)], 1)
    ref_logp = reference_logprobs(reference, sequences, mask, input_ids.shape[1])
    return BareRollout(sequences, mask, logp, values, ref_logp)


def kl_penalty_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward: ``-kl_coef * (logp - ref_logp)``, plus the score on the last token."""
    rewards = -kl_coef * (logp - ref_logp)
    rewards[:, -1] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns with gamma = 1; the episode ends after the last token (value 0)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + next_value - values[:, t]
        last = delta + gae_lambda * last
        advantages[:, t] = last
    return advantages, advantages + values


def bare_ppo_update(
    policy: Any, value_head: torch.nn.Linear, optimizer: torch.optim.Optimizer, rollout: BareRollout,
    advantages: torch.Tensor, returns: torch.Tensor, n_epochs: int, minibatches: int,
    clip_range: float = 0.2, vf_coef: float = 0.5, ent_coef: float = 0.0, max_grad_norm: float = 1.0,
) -> None:
    """``n_epochs`` passes over the rollout in ``minibatches`` minibatches of whole sequences:
    forward, clipped PPO loss (+ value and entropy terms, as SB3), backward,
    clip_grad_norm, AdamW step. Advantages come standardised over the rollout."""
    n_prompt = rollout.sequences.shape[1] - rollout.logp.shape[1]
    parameters = [*policy.parameters(), *value_head.parameters()]
    for _ in range(n_epochs):
        for index in torch.randperm(rollout.sequences.shape[0]).chunk(minibatches):
            logp, values, entropy = evaluate_tokens(policy, value_head, rollout.sequences[index],
                                                    rollout.mask[index], n_prompt)
            adv = advantages[index]
            ratio = torch.exp(logp - rollout.logp[index])
            policy_loss = -torch.min(adv * ratio, adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
            value_loss = ((returns[index] - values) ** 2).mean()
            loss = policy_loss + vf_coef * value_loss - ent_coef * entropy.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()


def make_optimizer(policy: Any, value_head: torch.nn.Linear) -> torch.optim.Optimizer:
    return torch.optim.AdamW([*policy.parameters(), *value_head.parameters()], lr=2e-4)


def time_iterations(run: Callable[[], Any], workload: Workload, device: torch.device, iterations: int) -> Measurement:
    """One untimed warm-up call (allocations, caches), then ``iterations`` timed calls."""
    run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    synchronize(device)
    return Measurement(time.perf_counter() - start, workload.tokens_per_iteration * iterations)


def measure_bare_rollout(workload: Workload, model_path: Path, prompts: list[str], device: torch.device, iterations: int) -> Measurement:
    """The rollout floor (``bare_rollout``): KV-cached policy decode with log-probs and values,
    one teacher-forced reference pass. Compared with the fast path's rollout phase."""
    policy, reference, value_head = bare_models(model_path, device)
    _, input_ids, attention_mask = prompt_batch(workload, model_path, prompts, device)
    return time_iterations(
        lambda: bare_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens),
        workload, device, iterations,
    )


def measure_bare_update(workload: Workload, model_path: Path, prompts: list[str], device: torch.device, iterations: int) -> Measurement:
    """The update floor (``bare_ppo_update``): n_epochs x minibatches of forward + backward
    + clip_grad_norm + AdamW over one rollout's sequences. Compared with the fast path's update."""
    policy, reference, value_head = bare_models(model_path, device)
    _, input_ids, attention_mask = prompt_batch(workload, model_path, prompts, device)
    rollout = bare_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    optimizer = make_optimizer(policy, value_head)
    advantages = torch.randn_like(rollout.logp)
    returns = rollout.values + advantages
    return time_iterations(
        lambda: bare_ppo_update(policy, value_head, optimizer, rollout, advantages, returns,
                                workload.n_epochs, workload.minibatches),
        workload, device, iterations,
    )


def measure_bare_ppo(workload: Workload, model_path: Path, prompts: list[str], device: torch.device, iterations: int) -> Measurement:
    """The end-to-end floor: one framework PPO iteration's work as one plain PyTorch loop."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    policy, reference, value_head = bare_models(model_path, device)
    tokenizer, input_ids, attention_mask = prompt_batch(workload, model_path, prompts, device)
    optimizer = make_optimizer(policy, value_head)

    def iteration() -> None:
        # 1. Rollout: decode with old log-probs and values, one reference pass.
        rollout = bare_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
        # 2. Score: VADER on the decoded texts (prompt + completion, as the framework's "vader").
        texts = tokenizer.batch_decode(rollout.sequences, skip_special_tokens=True)
        scores = torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts], device=device)
        # 3. Rewards with the per-token KL penalty, GAE, advantages standardised over the rollout.
        rewards = kl_penalty_rewards(rollout.logp, rollout.ref_logp, scores, kl_coef=0.05)
        advantages, returns = gae(rewards, rollout.values, gae_lambda=0.95)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        # 4. Update: n_epochs x minibatches of forward + backward + AdamW.
        bare_ppo_update(policy, value_head, optimizer, rollout, advantages, returns,
                        workload.n_epochs, workload.minibatches)

    return time_iterations(iteration, workload, device, iterations)


def measure_sampling(vocab_size: int, n_rows: int, device: torch.device, repeats: int = 200) -> dict[str, float]:
    """Microseconds per call: SB3's Categorical.sample vs inverse-CDF sampling."""
    from policies.sampling import sample_tokens

    logits = torch.randn(n_rows, vocab_size, device=device)
    candidates = {
        "categorical": lambda: torch.distributions.Categorical(logits=logits).sample(),
        "inverse_cdf": lambda: sample_tokens(logits),
    }
    result = {}
    for name, fn in candidates.items():
        fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        result[name] = (time.perf_counter() - start) / repeats * 1e6
    return result


# -- one measurement per child process (its own peak memory) -----------------------------------

MEASUREMENTS: dict[str, Callable[..., Measurement]] = {
    "bare_rollout": measure_bare_rollout,
    "bare_update": measure_bare_update,
    "bare_ppo": measure_bare_ppo,
}


def run_measurement(
    kind: str, workload_name: str, folder: str, device: str, iterations: int, autocast: bool, threads: int | None = None
) -> dict[str, Any]:
    """Entry point of a child process: returns the measurement and the process's peak memory.
    ``kind``: a key of ``MEASUREMENTS``, ``"fast"`` or ``"stock"``."""
    import transformers

    if threads is not None:
        torch.set_num_threads(threads)

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    workload = WORKLOADS[workload_name]
    torch_device = torch.device(device)
    model_path, prompts = build_assets(workload, Path(folder))
    gc.collect()
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    context = torch.autocast(torch_device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        if kind in MEASUREMENTS:
            result = MEASUREMENTS[kind](workload, model_path, prompts, torch_device, iterations)
        else:
            result = measure_framework(workload, model_path, prompts, kind == "fast", torch_device, iterations)
    return {"seconds": result.seconds, "tokens": result.tokens, "parts": result.parts,
            "peak_mb": peak_memory_mb(torch_device)}

