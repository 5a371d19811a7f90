"""Peak memory of one PPO update at a large vocabulary, settings side by side.

    python scripts/update_memory.py                          # 150k vocab; chunked, unchunked, checkpointed, lora
    python scripts/update_memory.py --settings chunked unchunked --vocab 50000
    python scripts/update_memory.py --workload L --settings chunked lora   # GPT-2-small-sized model

Each setting runs in a fresh child process (``python scripts/update_memory.py --one
SETTING``) so that no setting sees another's allocations; the figure is the peak RSS
of one ``agent.train()`` (1 epoch) minus the RSS just before it, so loading the model
and the rollout are excluded (see ``scripts/bench/memory.py``). The update's
``(tokens, vocabulary)`` float32 logits are what the settings differ in: at 150k
words one is 0.6 MB per token in the minibatch.

The policy chunks the logits only when a minibatch's do not fit its budget
(``logits_chunk_size="auto"``, the default: 1 GiB, 441 tokens at 150k words): hence
the default rollout of 32 x 32 = 1,024 tokens in one 1,024-token minibatch, three
chunks. ``--chunk-size`` sets the chunk of the chunked settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTING_NAMES = ("chunked", "unchunked", "checkpointed", "lora")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=positive, default=150_000, help="the model's vocabulary (output rows)")
    parser.add_argument("--n-layer", type=positive, default=2)
    parser.add_argument("--n-embd", type=positive, default=64)
    parser.add_argument("--n-envs", type=positive, default=32, help="episodes in the rollout")
    parser.add_argument("--new-tokens", type=positive, default=32, help="tokens per episode (the rollout's n_steps)")
    parser.add_argument("--batch-size", type=positive, default=1024,
                        help="tokens per minibatch (whole sequences, so at least this many)")
    parser.add_argument("--chunk-size", type=positive, default=None,
                        help="logits_chunk_size of the chunked settings (default: the policy's, 'auto')")
    parser.add_argument("--settings", nargs="+", choices=SETTING_NAMES, default=list(SETTING_NAMES))
    parser.add_argument("--workload", choices=["S", "M", "L"], default=None,
                        help="use this benchmark workload's model (L: 12 layers, 768 dims, 50k vocab) "
                             "instead of --vocab/--n-layer/--n-embd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch threads per child (default 1: on a busy CPU more threads stall each other, "
                             "tens of times slower on a small model; memory barely depends on it)")
    parser.add_argument("--one", choices=SETTING_NAMES, help=argparse.SUPPRESS)  # child: measure this setting
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # child: the model the parent built
    return parser.parse_args(argv)


def child_command(args: argparse.Namespace, setting: str, model_dir: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", setting, "--model-dir", model_dir,
               "--n-envs", str(args.n_envs), "--new-tokens", str(args.new_tokens),
               "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    return command


# glibc serves blocks below its mmap threshold from the heap and keeps them after they
# are freed; the threshold also rises by itself after large frees. Then a tensor can
# reuse heap memory that the RSS before the update already counted, and the update's
# peak hides (a clean CI run saw chunked and unchunked within 1 MB). A fixed threshold
# of 1 MB maps every large tensor on its own: the RSS follows the live tensors.
CHILD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_child(args: argparse.Namespace, setting: str, model_dir: str) -> dict:
    """One setting in a fresh process; its result is the last line it prints (JSON)."""
    done = subprocess.run(child_command(args, setting, model_dir), capture_output=True, text=True,
                          env={**os.environ, **CHILD_ENVIRONMENT})
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"measuring {setting!r} failed (exit code {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    """Build the model once, measure every setting in its own process, print the table;
    returns the results (one dict per setting)."""
    args = parse_args(argv)
    from bench.memory import build_model, format_table, logits_mb, measure_update, model_workload

    if args.one:
        result = measure_update(args.one, args.model_dir, args.n_envs, args.new_tokens, args.batch_size,
                                args.device, args.chunk_size, args.threads)
        print(json.dumps(result))
        return [result]
    spec = model_workload(args.vocab, args.n_layer, args.n_embd, args.n_envs, args.new_tokens, args.workload)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        build_model(spec, Path(folder))
        for setting in args.settings:
            results.append(run_child(args, setting, folder))
            print(f"  measured {setting}", file=sys.stderr, flush=True)
    tokens = max((r["minibatch_tokens"] for r in results if "minibatch_tokens" in r), default=0)
    print(f"\nModel: GPT-2, {spec.n_layer} layers, {spec.n_embd} dims, vocab {spec.vocab_size:,}"
          + (f" (workload {args.workload})" if args.workload else "")
          + f"; rollout {args.n_envs} episodes x {args.new_tokens} tokens, batch_size {args.batch_size}, "
          f"1 epoch; device {args.device}, {args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f}")
    print(f"One float32 logits tensor of a {tokens:,}-token minibatch: {logits_mb(tokens, spec.vocab_size):,.0f} MB\n")
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
