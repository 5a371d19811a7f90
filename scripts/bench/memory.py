"""Peak memory of one PPO update (``agent.train()``, not the rollout), one setting per process.

Why a fresh process per setting: RSS grows and the allocator keeps freed memory, so
a second measurement in the same process would see the first one's leftovers.

What is measured, in ``measure_update``: the agent is built and one rollout collected
(as ``learn`` would), the RSS high-water mark is reset to the current RSS
(``/proc/self/clear_refs``, so model loading and the rollout are excluded), the RSS
is read, ``agent.train()`` runs once, and the figure is the peak RSS
(``ru_maxrss``) minus the RSS read before. On CUDA ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` is reported too, and what it adds to the memory
allocated before the update.

The model is a random GPT-2 with a large vocabulary (``model_workload``), so the
update's ``(tokens, vocabulary)`` logits dominate and chunking them shows.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import resource
from pathlib import Path
from typing import Any

import torch

from bench.workloads import WORKLOADS, Workload, build_assets

# Each setting's policy keywords; the chunk size (None: the policy's default) is added
# to the chunked ones when given.
SETTINGS: dict[str, dict[str, Any]] = {
    "chunked": {},
    "unchunked": {"logits_chunk_size": None},
    "checkpointed": {"gradient_checkpointing": True},
    "lora": {"lora": {"r": 16}},
}
BASELINE = "unchunked"


def policy_kwargs_for(setting: str, chunk_size: int | None = None) -> dict[str, Any]:
    """The setting's ``policy_kwargs``; ``chunk_size`` overrides the policy's default
    ``logits_chunk_size`` except in ``unchunked``, which is the point of that setting."""
    kwargs = dict(SETTINGS[setting])
    if chunk_size is not None and "logits_chunk_size" not in kwargs:
        kwargs["logits_chunk_size"] = chunk_size
    return kwargs


def model_workload(vocab: int, n_layer: int, n_embd: int, n_envs: int, new_tokens: int,
                   workload: str | None = None) -> Workload:
    """The model to measure and the rollout's shape; ``workload`` (a ``WORKLOADS`` name)
    takes that workload's model instead of ``vocab``/``n_layer``/``n_embd``."""
    if workload is not None:
        return dataclasses.replace(WORKLOADS[workload], n_envs=n_envs, new_tokens=new_tokens)
    return Workload("memory", n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=vocab,
                    n_envs=n_envs, new_tokens=new_tokens)


def build_model(spec: Workload, folder: Path) -> Path:
    """The random GPT-2 and its word-level tokenizer (no EOS: every episode runs its full
    budget), saved to ``folder`` with the prompts, for the child processes to load."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    folder, prompts = build_assets(spec, Path(folder))
    (folder / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    return folder


def logits_mb(tokens: int, vocab: int) -> float:
    """One float32 ``(tokens, vocab)`` logits tensor, in MB."""
    return tokens * vocab * 4 / 2**20


def current_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (and so ``ru_maxrss``) to the current RSS (Linux >= 4.0):
    without it a peak during loading or the rollout would hide the update's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def collect_one_rollout(agent) -> None:
    """One rollout into the agent's buffer, as ``learn`` would collect it (no update)."""
    _, callback = agent._setup_learn(10**6)
    callback.on_training_start(locals(), globals())
    assert agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps)


def measure_update(setting: str, model_dir: str, n_envs: int, new_tokens: int, batch_size: int,
                   device: str = "cpu", chunk_size: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Build the agent, collect one rollout, then measure one ``agent.train()`` in this
    process. Returns ``{"unavailable": reason}`` when the policy does not take the
    ``lora`` keyword (LoRA not implemented yet)."""
    import transformers

    from agents import make_agent, make_text_vec_env

    if threads is not None:
        torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch_device = torch.device(device)
    prompts = json.loads((Path(model_dir) / "prompts.json").read_text(encoding="utf-8"))
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=dict(
        prompts=prompts, model=str(model_dir), reward=lambda p, c: [float(len(x)) for x in c],
        max_prompt_len=16, max_new_tokens=new_tokens, device=device,
    ))
    policy_kwargs = policy_kwargs_for(setting, chunk_size)
    try:
        agent = make_agent("ppo", env, n_steps=new_tokens, batch_size=batch_size, n_epochs=1, seed=0,
                           device=device, verbose=0, policy_kwargs=policy_kwargs)
    except (TypeError, ValueError) as error:
        if "lora" in policy_kwargs and "lora" in str(error).lower():
            return {"setting": setting, "unavailable": str(error).splitlines()[0]}
        raise
    collect_one_rollout(agent)

    # The minibatch sizes the update really evaluates (whole sequences per minibatch).
    policy = agent.policy
    evaluated: list[int] = []
    evaluate_actions = policy.evaluate_actions

    def recording_evaluate_actions(obs, actions):
        evaluated.append(actions.numel())
        return evaluate_actions(obs, actions)

    policy.evaluate_actions = recording_evaluate_actions

    gc.collect()
    peak_until_now = peak_rss_mb()  # loading and the rollout: part of the whole run's peak
    reset = reset_peak_rss()
    rss_before = current_rss_mb()
    peak_before = peak_rss_mb()  # == rss_before when the reset worked
    cuda_before = 0.0
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
        torch.cuda.reset_peak_memory_stats(torch_device)
        cuda_before = torch.cuda.memory_allocated(torch_device) / 2**20
    agent.train()
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
    peak = peak_rss_mb()
    result: dict[str, Any] = {
        "setting": setting,
        "policy_kwargs": policy_kwargs,
        "vocab": int(env.action_space.n),
        "rollout_tokens": n_envs * new_tokens,
        "minibatch_tokens": max(evaluated),
        "minibatches": len(evaluated),
        "logits_chunk_size": policy.logits_chunk_size,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "update_peak_mb": peak - rss_before,
        # The whole process (models, reference, rollout, update): what a run needs in all.
        "process_peak_mb": max(peak_until_now, peak),
        # The high-water mark could not be reset and was already above the RSS: the
        # update's own peak is hidden below it (only a lower bound is known).
        "peak_hidden": (not reset) and peak_before > rss_before + 1,
    }
    if torch_device.type == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated(torch_device) / 2**20
        result.update(cuda_peak_mb=cuda_peak, cuda_update_peak_mb=cuda_peak - cuda_before)
    return result


def logits_rows_at_once(result: dict[str, Any]) -> int:
    chunk = result["logits_chunk_size"]
    return result["minibatch_tokens"] if chunk is None else min(chunk, result["minibatch_tokens"])


def format_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the measured settings, the ratio to ``unchunked`` in the device's
    figure (CUDA's when on CUDA), then a line for each setting that was not available."""
    measured = [r for r in results if "unavailable" not in r]
    on_cuda = any("cuda_peak_mb" in r for r in measured)
    key = "cuda_update_peak_mb" if on_cuda else "update_peak_mb"
    baseline = next((r[key] for r in measured if r["setting"] == BASELINE), None)
    lines = [
        "| setting | tokens per minibatch | logits rows at once | peak update memory MB (RSS delta) "
        "| process peak MB (whole run) | CUDA peak MB (max allocated; above pre-update) | ratio to unchunked |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in measured:
        cuda = f"{r['cuda_peak_mb']:,.0f}; +{r['cuda_update_peak_mb']:,.0f}" if "cuda_peak_mb" in r else "n/a"
        ratio = f"{r[key] / baseline:.2f}" if baseline else "n/a"
        rss = f"{r['update_peak_mb']:,.0f}" + (" (hidden: lower bound)" if r["peak_hidden"] else "")
        lines.append(f"| {r['setting']} | {r['minibatch_tokens']:,} | {logits_rows_at_once(r):,} | {rss} "
                     f"| {r['process_peak_mb']:,.0f} | {cuda} | {ratio} |")
    lines += [f"\n{r['setting']}: not available ({r['unavailable']})" for r in results if "unavailable" in r]
    return "\n".join(lines)
