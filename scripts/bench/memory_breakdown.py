"""Where the memory of a PPO run on the real checkpoint goes: a breakdown, phase by phase.

    python scripts/bench/memory_breakdown.py                      # full fine-tune and LoRA r=8, 8 x 8 tokens
    python scripts/bench/memory_breakdown.py --settings full --new-tokens 64 --n-envs 4
    python scripts/bench/memory_breakdown.py --model default      # the embedded tiny model (seconds)

Each setting runs in a fresh child process (``--one SETTING``), so that no setting sees
another's allocations. The child builds the env (``textenv/TextGen-v0`` with
``model="smollm2-135m-instruct"``, ``chat_template=True``, four prompts, a length reward),
the agent (``make_agent("ppo", env, ...)``), and runs ``learn`` for ``--iterations``
rollouts + updates. How each figure is measured:

- **RSS** (``/proc/self/status``: ``VmRSS``, split into anonymous and file-backed pages)
  and the **peak RSS of each phase** (the high-water mark is reset at the start of every
  phase through ``/proc/self/clear_refs``, then read from ``VmHWM``). Phases: imports, env
  built, agent built, first reset, each rollout, and inside each update every minibatch's
  forward, backward and optimizer step (marked by a wrapper of the policy's own
  ``evaluate_actions`` and by ``torch.optim``'s step hooks; nothing of a library is
  patched). At every mark the garbage collector runs first.
- **Tensors**: every ``torch.Tensor`` that ``gc.get_objects()`` finds, counted once per
  storage, each attributed to the first of: policy weights, reference weights (the
  env's ``task.reference``; shared storage with the policy counts as the policy's),
  gradients, optimizer state, the policy's rollout KV cache (``agent._decoder``), the
  env's reference KV cache, the rollout buffer, other. Tensors held only by autograd's
  graph are invisible to ``gc``: the **activations saved for the backward pass** are
  counted exactly instead, by ``torch.autograd.graph.saved_tensors_hooks`` around each
  minibatch's forward (parameters excluded, once per storage), as
  ``tests/test_precision_and_memory.py`` counts them.
- **Allocator**: glibc's ``mallinfo2`` (heap in use, and freed heap bytes glibc keeps
  instead of returning them; memory-mapped blocks).
- **Rollout buffer** arrays: the ``nbytes`` of its numpy arrays (not tensors).

The table lists, for the phase with the highest peak RSS, what is live at its start
(attributed) and what the phase adds on top (its peak minus its start), and a
"budget" row: weights + gradients + optimizer state + reference + one minibatch's
saved activations (the largest measured), the sum the peak is compared with.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MB = 2**20
REAL_MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Tell me a short joke about cats.",
    "Explain gravity to a child in two sentences.",
]
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"lora": {"r": 8}},
}
CATEGORIES = ("policy weights", "reference weights", "gradients", "optimizer state", "policy KV cache",
              "reference KV cache", "rollout buffer", "saved activations", "other tensors")


# -- reading the process's memory ---------------------------------------------------------------


def status_mb() -> dict[str, float]:
    """``VmRSS``, ``VmHWM`` (peak), ``RssAnon``, ``RssFile`` of this process, in MB."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in wanted:
                values[key] = int(rest.split()[0]) / 1024
    return values


def reset_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mallinfo_mb() -> dict[str, float] | None:
    """glibc's heap: bytes in use, freed bytes kept, memory-mapped blocks (MB); ``None``
    where glibc (>= 2.33) is not the allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return {"heap_in_use": info.uordblks / MB, "heap_free_kept": info.fordblks / MB, "mmapped": info.hblkhd / MB}


# -- attributing tensors ------------------------------------------------------------------------


def _storage_key(tensor) -> tuple[int, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.device.type == "meta" or storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


def _cache_tensors(decoder) -> list:
    """Keys and values of every ``SlotCache`` a decoder object holds (policy, critic, mask slots)."""
    tensors = []
    for slots_name in ("slots", "critic_slots", "mask_slots"):
        slots = getattr(decoder, slots_name, decoder if slots_name == "slots" and hasattr(decoder, "cache") else None)
        cache = getattr(slots, "cache", None)
        for layer in getattr(cache, "layers", []):
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    return tensors


def tensor_inventory(agent, env, saved: dict[int, int] | None = None) -> dict[str, float]:
    """MB of live tensors per category (module doc), each storage counted once; ``saved``:
    the storages autograd saved in the last forward pass (``saved_activation_bytes``)."""
    import numpy as np
    import torch

    policy = agent.policy
    owners: dict[int, str] = {}

    def claim(category: str, tensors) -> None:
        for tensor in tensors:
            if tensor is None:
                continue
            key = _storage_key(tensor)
            if key is not None:
                owners.setdefault(key[0], category)

    claim("policy weights", policy.parameters())
    claim("policy weights", policy.buffers())
    reference = getattr(env, "task", None) and env.task.reference
    if reference is not None and hasattr(reference, "parameters"):
        claim("reference weights", reference.parameters())
    claim("gradients", (p.grad for p in policy.parameters()))
    for state in policy.optimizer.state.values():
        claim("optimizer state", (v for v in state.values() if torch.is_tensor(v)))
    decoder = getattr(agent, "_decoder", None)
    if decoder is not None:
        claim("policy KV cache", _cache_tensors(decoder))
    stepwise = getattr(env, "_stepwise_reference", None)  # textenv.reference_scoring.StepwiseReference
    if stepwise is not None and stepwise._decoder is not None:
        claim("reference KV cache", _cache_tensors(stepwise._decoder))
        claim("reference KV cache", [stepwise.next_log_probs])
    buffer = getattr(agent, "rollout_buffer", None)
    if buffer is not None:
        claim("rollout buffer", [v for v in vars(buffer).values() if torch.is_tensor(v)])
        for name in ("segment_ids", "segment_masks"):
            claim("rollout buffer", getattr(buffer, name, []))
    for pointer in saved or {}:
        owners.setdefault(pointer, "saved activations")
    sizes: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
        except ReferenceError:
            continue
        key = _storage_key(obj)
        if key is not None:
            sizes[key[0]] = max(sizes.get(key[0], 0), key[1])
    # Parameters and caches are all reachable through gc too; attribute every storage found.
    result = dict.fromkeys(CATEGORIES, 0.0)
    for pointer, nbytes in sizes.items():
        result[owners.get(pointer, "other tensors")] += nbytes / MB
    if buffer is not None:
        result["rollout buffer"] += sum(v.nbytes for v in vars(buffer).values() if isinstance(v, np.ndarray)) / MB
    return result


def saved_activation_bytes(weights: set[int] = frozenset()):
    """A context manager counting the bytes autograd saves for the backward pass, each storage
    once, leaving out the storages ``weights`` (data pointers of the parameters: a saved
    view of a weight, e.g. its transpose, is no activation): ``with counter as c: ...; c.total``."""
    import torch

    class Counter:
        def __init__(self) -> None:
            self.storages: dict[int, int] = {}

        @property
        def total(self) -> int:
            return sum(self.storages.values())

        def pack(self, tensor):
            key = _storage_key(tensor)
            if key is not None and key[0] not in weights:
                self.storages[key[0]] = key[1]
            return tensor

        def __enter__(self):
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
            self._hooks.__enter__()
            return self

        def __exit__(self, *exc):
            return self._hooks.__exit__(*exc)

    return Counter()


# -- the measured run ---------------------------------------------------------------------------


class Recorder:
    """Marks phases: at each mark, what the phase that ends reached (peak RSS) and what is
    live now (RSS, tensors, heap); then the peak is reset for the next phase."""

    def __init__(self) -> None:
        self.phases: list[dict[str, Any]] = []
        self.agent = self.env = None
        self.activations_mb: list[float] = []
        self.saved: dict[int, int] | None = None  # the last forward's saved storages, until its backward
        self.minibatch_tokens: list[int] = []
        reset_peak()
        self._start = status_mb()

    def mark(self, name: str) -> None:
        peak = status_mb()["VmHWM"]  # before anything this mark allocates
        gc.collect()
        now = status_mb()
        phase = {"phase": name, "peak_mb": peak, "start_rss_mb": self._start["VmRSS"], "rss_mb": now["VmRSS"],
                 "anon_mb": now.get("RssAnon", 0.0), "file_mb": now.get("RssFile", 0.0), "heap": mallinfo_mb()}
        if self.agent is not None:
            phase["tensors"] = tensor_inventory(self.agent, self.env, self.saved)
        self.phases.append(phase)
        reset_peak()
        self._start = status_mb()


def build_env(model: str, n_envs: int, new_tokens: int, device: str):
    from agents import make_text_vec_env

    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model=model, chat_template="auto", reward=lambda p, c: [float(len(x)) / 100 for x in c],
        max_prompt_len=48, max_new_tokens=new_tokens, device=device))


def measure(setting: str, model: str, n_envs: int, new_tokens: int, batch_size: int, n_epochs: int,
            iterations: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    """One setting, in this process: the phases (``Recorder``) of building and training."""
    recorder = Recorder()
    import torch
    import transformers

    import textenv  # noqa: F401  (registers the envs and the built-in models)
    from agents import make_agent
    from textenv.lm.models import resolve_model_path

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    resolve_model_path(model)  # convert once (outside the measured phases)
    recorder.mark("imports (python, torch, transformers, SB3, textenv)")
    env = build_env(model, n_envs, new_tokens, device)
    recorder.env = env
    recorder.mark("env built (tokenizer, reference model)")
    agent = make_agent("ppo", env, n_steps=new_tokens, batch_size=batch_size, n_epochs=n_epochs, seed=0,
                       device=device, verbose=0, policy_kwargs=dict(SETTINGS[setting]))
    recorder.agent = agent
    recorder.mark("agent built (policy, optimizer)")

    policy = agent.policy
    evaluate_actions = policy.evaluate_actions
    state = {"minibatch": 0, "iteration": 0}

    def recorded_evaluate_actions(obs, actions):  # the policy's own method, for this run only
        if not torch.is_grad_enabled():
            return evaluate_actions(obs, actions)
        state["minibatch"] += 1
        weights = {_storage_key(p)[0] for p in policy.parameters() if _storage_key(p) is not None}
        with saved_activation_bytes(weights) as counter:
            result = evaluate_actions(obs, actions)
        recorder.activations_mb.append(counter.total / MB)
        recorder.minibatch_tokens.append(int(actions.numel()))
        recorder.saved = counter.storages
        recorder.mark(f"update {state['iteration']}: forward, minibatch {state['minibatch']}")
        return result

    policy.evaluate_actions = recorded_evaluate_actions
    def after_backward(*_):
        recorder.saved = None  # the backward pass freed them
        recorder.mark(f"update {state['iteration']}: backward, minibatch {state['minibatch']}")

    policy.optimizer.register_step_pre_hook(after_backward)
    policy.optimizer.register_step_post_hook(
        lambda *_: recorder.mark(f"update {state['iteration']}: optimizer step, minibatch {state['minibatch']}"))

    from stable_baselines3.common.callbacks import BaseCallback

    class Phases(BaseCallback):
        def _on_training_start(self) -> None:
            recorder.mark("learn set up (env reset: reference prefill)")

        def _on_rollout_start(self) -> None:
            state["iteration"] += 1
            state["minibatch"] = 0
            if state["iteration"] > 1:
                recorder.mark(f"update {state['iteration'] - 1}: end")

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            pass

    tokens = new_tokens * n_envs * iterations
    start = time.perf_counter()
    original_train = agent.train

    def train_after_rollout_mark():
        recorder.mark(f"rollout {state['iteration']} (decode, reference pass, GAE)")
        original_train()

    agent.train = train_after_rollout_mark
    agent.learn(tokens, callback=Phases())
    seconds = time.perf_counter() - start
    recorder.mark(f"update {state['iteration']}: end")
    return {"setting": setting, "model": model, "n_envs": n_envs, "new_tokens": new_tokens,
            "batch_size": batch_size, "n_epochs": n_epochs, "iterations": iterations, "threads": threads,
            "seconds": seconds, "tokens": agent.num_timesteps, "phases": recorder.phases,
            "activations_mb": recorder.activations_mb, "minibatch_tokens": recorder.minibatch_tokens,
            "process_peak_mb": max(p["peak_mb"] for p in recorder.phases),
            "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in policy.parameters())}


# -- the table ----------------------------------------------------------------------------------


def budget_mb(result: dict[str, Any]) -> dict[str, float]:
    """What the peak is compared with: the largest weights / gradients / optimizer state /
    reference figures of any phase, plus the largest minibatch's saved activations."""
    tensors = [p["tensors"] for p in result["phases"] if "tensors" in p]
    most = {c: max(t[c] for t in tensors) for c in CATEGORIES}
    parts = {
        "policy weights": most["policy weights"],
        "gradients": most["gradients"],
        "optimizer state": most["optimizer state"],
        "reference weights": most["reference weights"],
        "activations of one minibatch (saved for backward)": max(result["activations_mb"], default=0.0),
    }
    parts["budget (sum)"] = sum(parts.values())
    return parts


def peak_phase(result: dict[str, Any]) -> dict[str, Any]:
    return max(result["phases"], key=lambda p: p["peak_mb"])


def format_phases(result: dict[str, Any]) -> str:
    lines = ["| phase | peak RSS MB | RSS after MB (anon / file) | tensors MB | heap kept free MB |",
             "|---|---|---|---|---|"]
    for p in result["phases"]:
        tensors = sum(p["tensors"].values()) if "tensors" in p else 0.0
        heap = f"{p['heap']['heap_free_kept']:,.0f}" if p.get("heap") else "n/a"
        lines.append(f"| {p['phase']} | {p['peak_mb']:,.0f} | {p['rss_mb']:,.0f} ({p['anon_mb']:,.0f} / "
                     f"{p['file_mb']:,.0f}) | {tensors:,.0f} | {heap} |")
    return "\n".join(lines)


def format_breakdown(results: list[dict[str, Any]]) -> str:
    """One column per setting: what is live at the start of the peak phase, what the phase
    adds, the peak, the budget and the peak / budget ratio."""
    header = "| MB | " + " | ".join(r["setting"] for r in results) + " |"
    lines = [header, "|---|" + "---|" * len(results)]
    rows: dict[str, list[str]] = {}

    def add(label: str, values: list[float] | list[str]) -> None:
        rows[label] = [v if isinstance(v, str) else f"{v:,.0f}" for v in values]

    imports = [r["phases"][0]["rss_mb"] for r in results]
    peaks = [peak_phase(r) for r in results]
    before = [_phase_before(r, p) for r, p in zip(results, peaks)]
    add("peak phase", [p["phase"] for p in peaks])
    add("libraries and interpreter (RSS after imports)", imports)
    for category in CATEGORIES:
        add(f"{category} (live at the phase's start)", [b["tensors"][category] if "tensors" in b else 0.0
                                                         for b in before])
    add("heap kept free by glibc at the phase's start", [b["heap"]["heap_free_kept"] if b.get("heap") else 0.0
                                                       for b in before])
    add("rest of the RSS at the phase's start (Python objects, tokenizer, allocator)",
        [b["rss_mb"] - i - sum(b.get("tensors", {}).values()) - (b["heap"]["heap_free_kept"] if b.get("heap") else 0)
         for b, i in zip(before, imports)])
    add("added during the phase (its peak minus its start)", [p["peak_mb"] - p["start_rss_mb"] for p in peaks])
    add("**process peak RSS**", [r["process_peak_mb"] for r in results])
    budgets = [budget_mb(r) for r in results]
    for key in budgets[0]:
        add(f"budget: {key}", [b[key] for b in budgets])
    add("**peak / budget**", [f"**{r['process_peak_mb'] / b['budget (sum)']:.2f}x**" for r, b in zip(results, budgets)])
    add("**peak without libraries / budget**",
        [f"**{(r['process_peak_mb'] - i) / b['budget (sum)']:.2f}x**" for r, b, i in zip(results, budgets, imports)])
    add("generated tokens / s (loaded machine: compare within one run only)",
        [f"{r['tokens'] / r['seconds']:.2f}" for r in results])
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows.items()]
    return "\n".join(lines)


def _phase_before(result: dict[str, Any], phase: dict[str, Any]) -> dict[str, Any]:
    """The mark that opened ``phase`` (its live memory is the phase's start)."""
    phases = result["phases"]
    index = phases.index(phase)
    return phases[index - 1] if index > 0 else phase


# -- command line -------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--model", default=REAL_MODEL, help=f"the env's and the policy's model (default {REAL_MODEL})")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8, help="new tokens per episode (the rollout's n_steps)")
    parser.add_argument("--batch-size", type=int, default=64, help="PPO's batch_size (tokens per minibatch)")
    parser.add_argument("--n-epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=2, help="rollouts + updates")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phases", action="store_true", help="print every phase of each setting too")
    parser.add_argument("--one", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_command(args: argparse.Namespace, setting: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--one", setting, "--model", args.model,
            "--n-envs", str(args.n_envs), "--new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size),
            "--n-epochs", str(args.n_epochs), "--iterations", str(args.iterations), "--threads", str(args.threads)]


def run_child(args: argparse.Namespace, setting: str) -> dict[str, Any]:
    done = subprocess.run(child_command(args, setting), capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"measuring {setting!r} failed (exit code {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.one:
        result = measure(args.one, args.model, args.n_envs, args.new_tokens, args.batch_size, args.n_epochs,
                         args.iterations, args.threads)
        print(json.dumps(result))
        return [result]
    load_before = os.getloadavg()[0]
    results = []
    for setting in args.settings:
        results.append(run_child(args, setting))
        print(f"  measured {setting}", file=sys.stderr, flush=True)
    first = results[0]
    print(f"\nModel {args.model}: {first['parameters']:,} parameters; PPO, {args.n_envs} episodes x {args.new_tokens} "
          f"new tokens per rollout, batch_size {args.batch_size}, {args.n_epochs} epochs, {args.iterations} "
          f"iterations, {args.threads} torch threads; load average before / after {load_before:.1f} / "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for result in results:
        print(f"{result['setting']}: {result['trainable_parameters']:,} trainable parameters; minibatches of "
              f"{max(result['minibatch_tokens'], default=0)} tokens at most")
    print()
    print(format_breakdown(results))
    if args.phases:
        for result in results:
            print(f"\nPhases ({result['setting']}):\n")
            print(format_phases(result))
    return results


if __name__ == "__main__":
    main()
