"""Throughput of the framework against the tightest honest bare PyTorch loop, the one-page PPO.

Every figure is generated tokens per second, measured in this process on this
machine, so ratios compare like with like. The floors do the work of one
framework PPO iteration and nothing more; a ratio below 1 is what the framework's
generality (Gymnasium env, SB3 buffers and callbacks) costs. They are the
functions of ``scripts/ppo_reference.py`` (whose update is tested to equal the
framework's), with the framework agent's hyperparameters (``ppo_args``):

- rollout: the agent's ``collect_rollouts`` (policy decode, env steps, reference
  log-probs, GAE; task scoring excluded) against ``collect_rollout``: a KV-cached
  policy decode that yields each sampled token's log-prob and value, then one
  teacher-forced reference pass over the finished sequences;
- update: the agent's ``train`` against ``ppo_update``: the same n_epochs x
  minibatches of forward + backward + clip_grad_norm + Adam over the rollout's
  sequences (whole sequences per minibatch, one teacher-forced pass each);
- end to end: full iterations (rollout, scoring, update) of the fast path, of
  SB3's stock path with the same policy, and of ``ppo_iteration``: the rollout,
  VADER on the decoded texts, per-token rewards ``-0.05 * (logp - ref_logp)`` plus
  the score on the last token, GAE (gamma 1, lambda 0.95), standardised
  advantages, the update. The decode's log-probs and values are used as the old
  log-probs and values, not recomputed (a test checks they equal a teacher-forced
  recomputation).

GRPO and RLOO (``scripts/benchmark.py --group``): ``grpo_fast`` and ``rloo_fast`` run the
fast path's ``make_agent("grpo"/"rloo")`` with ``group_size=GROUP_SIZE``, the k3 KL in the
loss at a fixed ``GROUP_KL_COEF``, the workload's epochs and minibatches; ``bare_grpo``
and ``bare_rloo`` the one-page floor (``scripts/grpo_reference.py``) doing the same work
(``tests/test_grpo_reference.py`` checks that its update is the framework's);
``trl_grpo`` TRL's ``GRPOTrainer`` on the same workload (``bench.trl_grpo``).

Variants are named ``fast``, ``stock``, a group variant or a floor (``MEASUREMENTS``), with suffixes:
``_lora`` trains LoRA adapters (``R_LORA``; the floor's reference is then its own body
with the adapters off, as the framework's and TRL's with a ``peft_config``), ``_untrimmed`` runs the framework with
``trim_memory=False`` (glibc left alone: ``policies.memory``). On workload R (the real
checkpoint) prompts are chats, rendered with the model's chat template on both sides.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import grpo_reference
import ppo_reference
from bench.workloads import GROUP_KL_COEF, GROUP_SIZE, R_LORA, Workload, build_assets, workload_named


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedReward:
    """Wraps a reward source and adds up the seconds spent scoring (the task scores through
    ``score_components``; anything else is the source's own)."""

    def __init__(self, source: Callable):
        self.source = source
        self.seconds = 0.0

    def _timed(self, score: Callable, *args, **kwargs):
        start = time.perf_counter()
        try:
            return score(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __call__(self, *args, **kwargs):
        return self._timed(self.source, *args, **kwargs)

    def score_components(self, *args, **kwargs):
        return self._timed(self.source.score_components, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.source, name)


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

KL_COEF = 0.05
GROUP_ALGORITHMS = ("grpo", "rloo")


def make_framework_agent(
    workload: Workload, model_path: Path, prompts: list[str], fast: bool, device: torch.device,
    precision: str = "fp32", policy_kwargs: dict[str, Any] | None = None, algorithm: str = "ppo",
    parallelism: str = "ddp",
):
    """The framework's agent on ``workload``: PPO (``KL_COEF`` in the reward), or GRPO/RLOO
    (``algorithm``: ``GROUP_SIZE`` completions per prompt, ``GROUP_KL_COEF`` k3 in the loss);
    a fixed beta, the workload's epochs and minibatches; under torchrun ``parallelism``."""
    from agents import make_agent, make_text_vec_env

    env_kwargs = dict(
        prompts=prompts,
        model=str(model_path),
        reward="vader",
        max_prompt_len=workload.max_prompt_len,
        max_new_tokens=workload.new_tokens,
        device=device,
    )
    if workload.chat:
        env_kwargs["chat_template"] = True
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=workload.n_envs, seed=0, env_kwargs=env_kwargs, batched=fast)
    timers = []
    for task in {id(t): t for t in env.get_attr("task")}.values():
        task.reward_source = TimedReward(task.reward_source)
        timers.append(task.reward_source)
    batch_size = workload.tokens_per_iteration // workload.minibatches
    common = dict(fast=fast, batch_size=batch_size, n_epochs=workload.n_epochs, kl_target=None, seed=0,
                  parallelism=parallelism,
                  device=device, verbose=0, precision=precision, policy_kwargs=dict(policy_kwargs or {}))
    if algorithm == "ppo":  # a fixed beta, as the floor's (ppo_args: kl_coef=KL_COEF)
        agent = make_agent("ppo", env, n_steps=workload.new_tokens, kl_coef=KL_COEF, **common)
    elif algorithm in GROUP_ALGORITHMS:  # as the floor's (group_args): k3 in the loss, fixed beta
        agent = make_agent(algorithm, env, group_size=GROUP_SIZE, kl_coef=GROUP_KL_COEF, kl_placement="loss",
                           kl_estimator="k3", **common)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
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
    workload: Workload, model_path: Path, prompts: list[str], fast: bool, device: torch.device, iterations: int,
    precision: str = "fp32", policy_kwargs: dict[str, Any] | None = None, algorithm: str = "ppo",
    parallelism: str = "ddp",
) -> Measurement:
    """Full iterations of PPO (or ``algorithm``) through ``learn``, split into rollout, scoring
    and update. In data-parallel training (``bench.data_parallel``) every rank runs ``iterations`` of
    them and the tokens are every rank's (``num_timesteps`` counts them all)."""
    from agents.distributed import world_size

    agent, reward_timers = make_framework_agent(workload, model_path, prompts, fast, device, precision,
                                                policy_kwargs, algorithm, parallelism)
    agent.learn(workload.tokens_per_iteration * world_size())  # warm-up iteration (allocations, caches)
    for timer in reward_timers:
        timer.seconds = 0.0
    phases = PhaseTimer(device)
    timesteps_before = agent.num_timesteps
    synchronize(device)
    start = time.perf_counter()
    agent.learn(workload.tokens_per_iteration * iterations * world_size(), callback=phases.callback,
                reset_num_timesteps=False)
    synchronize(device)
    total = time.perf_counter() - start
    scoring = sum(t.seconds for t in reward_timers)
    parts = {"rollout": phases.rollout_seconds - scoring, "scoring": scoring, "update": total - phases.rollout_seconds}
    return Measurement(total, agent.num_timesteps - timesteps_before, parts)


# -- the floor: the one-page PPO ----------------------------------------------------------------


def ppo_args(workload: Workload, model_path: Path, device: torch.device) -> ppo_reference.Args:
    """The one-page PPO's hyperparameters for ``workload``: the framework agent's."""
    return ppo_reference.Args(
        model=str(model_path), max_prompt_len=workload.max_prompt_len, new_tokens=workload.new_tokens,
        n_episodes=workload.n_envs, n_epochs=workload.n_epochs, minibatches=workload.minibatches,
        kl_coef=KL_COEF, device=str(device),
    )


def bare_models(workload: Workload, model_path: Path, device: torch.device, lora: dict[str, Any] | None = None):
    """Policy LM, frozen reference LM (both loaded from ``model_path``) and the value head.

    ``lora``: the policy is the LM with LoRA adapters injected (``policies.lora``, the
    framework's), its reference the same LM with the adapters off: one copy of the weights."""
    args = ppo_args(workload, model_path, device)
    if lora is None:
        return ppo_reference.make_models(args)
    from policies.lora import LoraReference, add_lora_adapters, causal_lm_of
    from textenv.lm.models import load_causal_lm

    peft_model = add_lora_adapters(load_causal_lm(args.model, args.device), lora)
    policy = causal_lm_of(peft_model)  # the Hugging Face LM, adapters in its linear layers
    value_head = torch.nn.Linear(policy.get_output_embeddings().in_features, 1).to(args.device)
    torch.nn.init.normal_(value_head.weight, std=args.value_head_init_std)
    torch.nn.init.zeros_(value_head.bias)
    return policy, LoraReference(peft_model), value_head


def prompt_batch(workload: Workload, model_path: Path, prompts: list[str], device: torch.device):
    """The tokenizer and one left-padded batch of ``n_envs`` prompts, ``max_prompt_len`` wide
    (chats rendered with the model's chat template, as the env renders them)."""
    from textenv.lm.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_path))
    texts = prompts[: workload.n_envs]
    if workload.chat:
        from textenv.chat import ChatFormat

        chat = ChatFormat(tokenizer)
        texts = [chat.render(chat.messages(text), add_generation_prompt=True) for text in texts]
    input_ids, attention_mask = ppo_reference.tokenize_prompts(tokenizer, texts, workload.max_prompt_len, device)
    return tokenizer, input_ids, attention_mask


def timed_seconds(run: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Seconds of ``calls`` timed calls of ``run``, after one untimed warm-up call
    (allocations, caches)."""
    run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize(device)
    return time.perf_counter() - start


def time_iterations(run: Callable[[], Any], workload: Workload, device: torch.device, iterations: int) -> Measurement:
    """``iterations`` timed PPO iterations (after a warm-up one) as a throughput measurement."""
    return Measurement(timed_seconds(run, device, iterations), workload.tokens_per_iteration * iterations)


def measure_bare_rollout(workload: Workload, model_path: Path, prompts: list[str], device: torch.device,
                         iterations: int, lora: dict[str, Any] | None = None) -> Measurement:
    """The rollout floor (``collect_rollout``): KV-cached policy decode with log-probs and values,
    one teacher-forced reference pass. Compared with the fast path's rollout phase."""
    policy, reference, value_head = bare_models(workload, model_path, device, lora)
    _, input_ids, attention_mask = prompt_batch(workload, model_path, prompts, device)
    return time_iterations(
        lambda: ppo_reference.collect_rollout(policy, reference, value_head, input_ids, attention_mask,
                                              workload.new_tokens),
        workload, device, iterations,
    )


def measure_bare_update(workload: Workload, model_path: Path, prompts: list[str], device: torch.device,
                        iterations: int, lora: dict[str, Any] | None = None) -> Measurement:
    """The update floor (``ppo_update``): n_epochs x minibatches of forward + backward
    + clip_grad_norm + Adam over one rollout's sequences. Compared with the fast path's update."""
    args = ppo_args(workload, model_path, device)
    policy, reference, value_head = bare_models(workload, model_path, device, lora)
    _, input_ids, attention_mask = prompt_batch(workload, model_path, prompts, device)
    rollout = ppo_reference.collect_rollout(policy, reference, value_head, input_ids, attention_mask, workload.new_tokens)
    optimizer = ppo_reference.make_optimizer(policy, value_head, args)
    advantages = torch.randn_like(rollout.logp)
    returns = rollout.values + advantages
    return time_iterations(
        lambda: ppo_reference.ppo_update(policy, value_head, optimizer, rollout, advantages, returns, args),
        workload, device, iterations,
    )


def measure_bare_ppo(workload: Workload, model_path: Path, prompts: list[str], device: torch.device,
                     iterations: int, lora: dict[str, Any] | None = None) -> Measurement:
    """The end-to-end floor: ``ppo_iteration``, one framework PPO iteration's work as one plain loop."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    args = ppo_args(workload, model_path, device)
    policy, reference, value_head = bare_models(workload, model_path, device, lora)
    tokenizer, input_ids, attention_mask = prompt_batch(workload, model_path, prompts, device)
    optimizer = ppo_reference.make_optimizer(policy, value_head, args)

    def vader(rollout: ppo_reference.Rollout) -> torch.Tensor:
        """VADER on the decoded texts (prompt + completion, as the framework's "vader")."""
        texts = tokenizer.batch_decode(rollout.sequences, skip_special_tokens=True)
        return torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts], device=device)

    return time_iterations(
        lambda: ppo_reference.ppo_iteration(policy, reference, value_head, optimizer, input_ids, attention_mask,
                                            vader, args),
        workload, device, iterations,
    )


# -- the GRPO/RLOO floor: the one-page group methods --------------------------------------------


def group_args(workload: Workload, model_path: Path, device: torch.device, method: str) -> grpo_reference.Args:
    """The one-page GRPO/RLOO's hyperparameters for ``workload``: the framework agent's."""
    return grpo_reference.Args(
        model=str(model_path), method=method, max_prompt_len=workload.max_prompt_len,
        new_tokens=workload.new_tokens, n_episodes=workload.n_envs, group_size=GROUP_SIZE,
        kl_coef=GROUP_KL_COEF, n_epochs=workload.n_epochs, minibatches=workload.minibatches, device=str(device),
    )


def measure_bare_group(method: str, workload: Workload, model_path: Path, prompts: list[str], device: torch.device,
                       iterations: int, lora: dict[str, Any] | None = None) -> Measurement:
    """The GRPO/RLOO floor: ``group_iteration`` (``n_envs / GROUP_SIZE`` prompts, each
    ``GROUP_SIZE`` times; VADER on the decoded texts; group advantages; the update)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    args = group_args(workload, model_path, device, method)
    policy, reference, _ = bare_models(workload, model_path, device, lora)  # the value head is not used
    tokenizer, input_ids, attention_mask = prompt_batch(workload, model_path, prompts, device)
    n_prompts = workload.n_envs // GROUP_SIZE
    input_ids, attention_mask = input_ids[:n_prompts], attention_mask[:n_prompts]
    optimizer = grpo_reference.make_optimizer(policy, args)

    def vader(rollout: ppo_reference.Rollout) -> torch.Tensor:
        texts = tokenizer.batch_decode(rollout.sequences, skip_special_tokens=True)
        return torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts], device=device)

    return time_iterations(
        lambda: grpo_reference.group_iteration(policy, reference, optimizer, input_ids, attention_mask, vader, args),
        workload, device, iterations,
    )


def measure_trl(workload: Workload, model_path: Path, prompts: list[str], device: torch.device,
                iterations: int, autocast: bool = False, lora: dict[str, Any] | None = None) -> Measurement:
    """TRL's ``GRPOTrainer`` on ``workload`` (``bench.trl_grpo``), with ``lora`` as its peft config."""
    from bench.trl_grpo import measure_trl_grpo

    result = measure_trl_grpo(workload, model_path, prompts, device, iterations, autocast, lora)
    return Measurement(result["seconds"], result["tokens"])


def measure_sampling(vocab_size: int, n_rows: int, device: torch.device, repeats: int = 200) -> dict[str, float]:
    """Microseconds per call: SB3's Categorical.sample vs inverse-CDF sampling."""
    from policies.sampling import sample_tokens

    logits = torch.randn(n_rows, vocab_size, device=device)
    candidates = {
        "categorical": lambda: torch.distributions.Categorical(logits=logits).sample(),
        "inverse_cdf": lambda: sample_tokens(logits),
    }
    return {name: timed_seconds(fn, device, repeats) / repeats * 1e6 for name, fn in candidates.items()}


# -- one measurement per child process (its own peak memory) -----------------------------------

MEASUREMENTS: dict[str, Callable[..., Measurement]] = {
    "bare_rollout": measure_bare_rollout,
    "bare_update": measure_bare_update,
    "bare_ppo": measure_bare_ppo,
    "bare_grpo": functools.partial(measure_bare_group, "grpo"),
    "bare_rloo": functools.partial(measure_bare_group, "rloo"),
}
#: The framework's variants: ``(algorithm, fast)``.
FRAMEWORK_VARIANTS = {"fast": ("ppo", True), "stock": ("ppo", False), "fast_compiled": ("ppo", True),
                      "fast_steptrimmed": ("ppo", True),
                      **{f"{name}_fast": (name, True) for name in GROUP_ALGORITHMS}}
#: Policy options of a framework variant beyond its algorithm (the compile happens in the
#: untimed warm-up iteration).
FRAMEWORK_POLICY_KWARGS: dict[str, dict[str, Any]] = {"fast_compiled": {"compile": True},
                                                       "fast_steptrimmed": {"trim_memory": "steps"}}


def variant_settings(kind: str) -> tuple[str, dict[str, Any] | None, bool]:
    """``(what runs, LoRA options or None, trim_memory)`` of a variant name (module doc):
    ``"fast_lora_untrimmed"`` -> ``("fast", R_LORA, False)``."""
    base, trim, lora = kind, True, None
    if base.endswith("_untrimmed"):
        base, trim = base[: -len("_untrimmed")], False
    if base.endswith("_lora"):
        base, lora = base[: -len("_lora")], dict(R_LORA)
    known = base in (*MEASUREMENTS, *FRAMEWORK_VARIANTS, "trl_grpo")
    untrimmable = base not in FRAMEWORK_VARIANTS  # only the framework has a trim_memory to switch off
    if not known or (not trim and untrimmable):
        raise ValueError(f"unknown variant {kind!r}")
    return base, lora, trim


def run_measurement(
    kind: str, workload_name: str, folder: str, device: str, iterations: int, autocast: bool, threads: int | None = None
) -> dict[str, Any]:
    """Entry point of a child process: returns the measurement and the process's peak memory.
    ``kind``: a key of ``MEASUREMENTS`` or ``FRAMEWORK_VARIANTS``, or ``"trl_grpo"``, with the
    suffixes of ``variant_settings``."""
    import transformers

    if threads is not None:
        torch.set_num_threads(threads)

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    base, lora, trim = variant_settings(kind)
    workload = workload_named(workload_name)
    torch_device = torch.device(device)
    model_path, prompts = build_assets(workload, Path(folder))
    gc.collect()
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    if base == "trl_grpo":  # TRL's trainer, its own precision setting (bf16 with --autocast)
        result = measure_trl(workload, model_path, prompts, torch_device, iterations, autocast, lora)
    elif base in MEASUREMENTS:  # the bare loop: everything under bf16 autocast
        context = torch.autocast(torch_device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            result = MEASUREMENTS[base](workload, model_path, prompts, torch_device, iterations, lora)
    else:  # the framework as a user runs it: precision="bf16-mixed" (its own autocast, old log-probs recomputed)
        policy_kwargs: dict[str, Any] = dict(FRAMEWORK_POLICY_KWARGS.get(base, {}))
        if not trim:
            policy_kwargs["trim_memory"] = False
        if lora is not None:
            policy_kwargs["lora"] = lora
        algorithm, fast = FRAMEWORK_VARIANTS[base]
        result = measure_framework(workload, model_path, prompts, fast, torch_device, iterations,
                                   precision="bf16-mixed" if autocast else "fp32", policy_kwargs=policy_kwargs,
                                   algorithm=algorithm)
    return {"seconds": result.seconds, "tokens": result.tokens, "parts": result.parts,
            "peak_mb": peak_memory_mb(torch_device)}
