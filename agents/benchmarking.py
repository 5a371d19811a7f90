"""Throughput of the framework against bare PyTorch loops doing the same work.

Every figure is generated tokens per second, measured in this process on this
machine, so ratios compare like with like:

- rollout: the agent's ``collect_rollouts`` (policy + reference + env, scoring
  excluded) against a bare KV-cached decode loop of the same two models;
- update: the agent's ``train`` (n_epochs over the rollout) against bare
  forward + backward + AdamW passes over the same token sequences, split into the
  same number of minibatches;
- end to end: full iterations (rollout, scoring, update) of the fast path, of
  SB3's stock path with the same policy, and of a bare PyTorch PPO loop
  (KV-cached sampling, one teacher-forced pass each for reference and old
  log-probs, n_epochs of forward, backward and AdamW over the whole batch).

Workloads use randomly initialised GPT-2 models and a word-level tokenizer built
here (no downloads); prompts are 8-16 random words, and the tokenizer has no EOS
token, so every episode runs its full ``new_tokens``.
"""

from __future__ import annotations

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

    @property
    def max_prompt_len(self) -> int:
        return self.prompt_tokens[1]

    @property
    def tokens_per_iteration(self) -> int:
        return self.n_envs * self.new_tokens


WORKLOADS = {
    "S": Workload("S", n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_envs=16, new_tokens=32),
    "M": Workload("M", n_layer=4, n_embd=256, n_head=4, vocab_size=8000, n_envs=32, new_tokens=64),
    "L": Workload("L", n_layer=12, n_embd=768, n_head=12, vocab_size=50_000, n_envs=64, new_tokens=128),
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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


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


# -- bare PyTorch loops --------------------------------------------------------------------


def _bare_models(model_path: Path, device: torch.device):
    from textenv.models import load_causal_lm

    policy = load_causal_lm(str(model_path), device)
    reference = load_causal_lm(str(model_path), device).requires_grad_(False)
    value_head = torch.nn.Linear(policy.config.n_embd, 1).to(device)
    return policy, reference, value_head


def _prompt_batch(workload: Workload, model_path: Path, prompts: list[str], device: torch.device):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts[: workload.n_envs], return_tensors="pt", padding="max_length",
                      max_length=workload.max_prompt_len)
    return tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def bare_generate(policy, reference, value_head, input_ids, attention_mask, new_tokens: int):
    """KV-cached sampling of ``new_tokens`` for every row, with the policy's and the
    reference's log-prob of each sampled token and the policy's value."""
    from policies.sampling import sample_tokens
    from transformers import DynamicCache

    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    caches = [DynamicCache(config=policy.config), DynamicCache(config=reference.config)]
    mask = attention_mask
    policy_out = policy(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=caches[0],
                        use_cache=True, output_hidden_states=True)
    ref_out = reference(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=caches[1], use_cache=True)
    tokens, logps, ref_logps, values = [], [], [], []
    position = positions[:, -1:]
    for _ in range(new_tokens):
        logits = policy_out.logits[:, -1].float()
        action = sample_tokens(logits)
        logps.append(torch.log_softmax(logits, -1).gather(1, action[:, None])[:, 0])
        ref_logps.append(torch.log_softmax(ref_out.logits[:, -1].float(), -1).gather(1, action[:, None])[:, 0])
        values.append(value_head(policy_out.hidden_states[-1][:, -1]).flatten())
        tokens.append(action)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        step_ids = action[:, None]
        policy_out = policy(input_ids=step_ids, attention_mask=mask, position_ids=position, cache=caches[0],
                            use_cache=True, output_hidden_states=True)
        ref_out = reference(input_ids=step_ids, attention_mask=mask, position_ids=position, cache=caches[1], use_cache=True)
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(ref_logps, 1), torch.stack(values, 1)


def time_iterations(run: Callable[[], Any], workload: Workload, device: torch.device, iterations: int) -> Measurement:
    """One untimed warm-up call (allocations, caches), then ``iterations`` timed calls."""
    run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    synchronize(device)
    return Measurement(time.perf_counter() - start, workload.tokens_per_iteration * iterations)


def measure_bare_decode(workload: Workload, model_path: Path, prompts: list[str], device: torch.device, iterations: int) -> Measurement:
    policy, reference, value_head = _bare_models(model_path, device)
    _, input_ids, attention_mask = _prompt_batch(workload, model_path, prompts, device)
    return time_iterations(
        lambda: bare_generate(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens),
        workload, device, iterations,
    )


def _sequence_logprobs_values(policy, value_head, sequences, mask, n_prompt: int):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = policy(input_ids=sequences, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    logits = out.logits[:, n_prompt - 1 : -1].float()
    logp_all = torch.log_softmax(logits, -1)
    actions = sequences[:, n_prompt:]
    logp = logp_all.gather(2, actions[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    values = value_head(out.hidden_states[-1][:, n_prompt - 1 : -1]).squeeze(-1)
    return logp, values, entropy


def _bare_ppo_epochs(policy, value_head, optimizer, sequences, mask, n_prompt, old_logp, advantages, returns,
                     n_epochs: int, minibatches: int) -> None:
    """Clipped PPO loss with value and entropy terms, forward + backward + AdamW."""
    rows = sequences.shape[0]
    for _ in range(n_epochs):
        for index in torch.randperm(rows).chunk(minibatches):
            logp, values, entropy = _sequence_logprobs_values(policy, value_head, sequences[index], mask[index], n_prompt)
            adv = advantages[index]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            ratio = torch.exp(logp - old_logp[index])
            policy_loss = -torch.min(adv * ratio, adv * ratio.clamp(0.8, 1.2)).mean()
            loss = policy_loss + 0.5 * ((values - returns[index]) ** 2).mean() - 0.0 * entropy.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()


def measure_bare_update(workload: Workload, model_path: Path, prompts: list[str], device: torch.device, iterations: int) -> Measurement:
    """n_epochs of forward + backward + AdamW over one rollout's sequences, in the same
    number of minibatches as the framework."""
    policy, reference, value_head = _bare_models(model_path, device)
    _, input_ids, attention_mask = _prompt_batch(workload, model_path, prompts, device)
    tokens, old_logp, _, old_values = bare_generate(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    sequences = torch.cat([input_ids, tokens], 1)
    mask = torch.cat([attention_mask, torch.ones_like(tokens)], 1)
    optimizer = torch.optim.AdamW([*policy.parameters(), *value_head.parameters()], lr=1e-5)
    advantages = torch.randn_like(old_logp)
    returns = old_values + advantages

    def run() -> None:
        _bare_ppo_epochs(policy, value_head, optimizer, sequences, mask, workload.max_prompt_len, old_logp,
                         advantages, returns, workload.n_epochs, workload.minibatches)

    return time_iterations(run, workload, device, iterations)


def measure_bare_ppo(workload: Workload, model_path: Path, prompts: list[str], device: torch.device, iterations: int) -> Measurement:
    """The same work as one framework iteration, written as one plain PyTorch loop."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    policy, reference, value_head = _bare_models(model_path, device)
    tokenizer, input_ids, attention_mask = _prompt_batch(workload, model_path, prompts, device)
    optimizer = torch.optim.AdamW([*policy.parameters(), *value_head.parameters()], lr=1e-5)
    n_prompt = workload.max_prompt_len

    def iteration() -> None:
        with torch.no_grad():
            tokens, _, _, _ = bare_generate(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
            sequences = torch.cat([input_ids, tokens], 1)
            mask = torch.cat([attention_mask, torch.ones_like(tokens)], 1)
            old_logp, old_values, _ = _sequence_logprobs_values(policy, value_head, sequences, mask, n_prompt)
            ref_logp, _, _ = _sequence_logprobs_values(reference, value_head, sequences, mask, n_prompt)
            texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
            scores = torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts], device=old_logp.device)
            rewards = -0.05 * (old_logp - ref_logp)
            rewards[:, -1] += scores
            advantages = torch.zeros_like(rewards)  # GAE, gamma = 1, lambda = 0.95
            last = torch.zeros_like(rewards[:, 0])
            for t in reversed(range(rewards.shape[1])):
                next_value = old_values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
                delta = rewards[:, t] + next_value - old_values[:, t]
                last = delta + 0.95 * last
                advantages[:, t] = last
            returns = advantages + old_values
        _bare_ppo_epochs(policy, value_head, optimizer, sequences, mask, n_prompt, old_logp, advantages, returns,
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
    "bare_decode": measure_bare_decode,
    "bare_update": measure_bare_update,
    "bare_ppo": measure_bare_ppo,
}


def run_measurement(kind: str, workload_name: str, folder: str, device: str, iterations: int, autocast: bool) -> dict[str, Any]:
    """Entry point of a child process: returns the measurement and the process's peak memory."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    workload = WORKLOADS[workload_name]
    torch_device = torch.device(device)
    model_path, prompts = build_assets(workload, Path(folder))
    gc.collect()
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    context = torch.autocast(torch_device.type, dtype=torch.bfloat16) if autocast else _NullContext()
    with context:
        if kind in MEASUREMENTS:
            result = MEASUREMENTS[kind](workload, model_path, prompts, torch_device, iterations)
        else:
            result = measure_framework(workload, model_path, prompts, kind == "fast", torch_device, iterations)
    return {"seconds": result.seconds, "tokens": result.tokens, "parts": result.parts,
            "peak_mb": peak_memory_mb(torch_device)}


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
