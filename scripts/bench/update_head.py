"""What the update's output head costs: one minibatch's forward and backward, side by side.

    PYTHONPATH=scripts python -m bench.update_head                    # workload L (GPT-2-124M's shape), 5 repeats
    PYTHONPATH=scripts python -m bench.update_head --workload M --repeats 9

The fast path's agent collects one rollout of the workload; then one minibatch of it (the
workload's minibatch, ``tokens_per_iteration / minibatches`` tokens) is evaluated and
back-propagated (``policy.evaluate_actions``, the PPO loss's terms, ``backward``) under
each setting in turn, the settings interleaved repeat by repeat so that the machine's
drift falls on all alike. Settings:

- ``entropy graph``: the entropy back-propagated with a zero weight (before issue 24: SB3's
  loss adds ``ent_coef * entropy`` whatever ``ent_coef``);
- ``no entropy graph``: the entropy computed for the logs only (``entropy_gradient=False``,
  what the agents do when ``ent_coef`` is 0);
- each of them with the logits in checkpointed chunks (each recomputed in the backward)
  and in one pass (``None``). The chunks are 256 tokens, so that the workload's minibatch
  is split as a minibatch over 512 tokens was before issue 24 (the chunk was 512; the
  policy's ``"auto"`` now makes L's minibatch in one pass, as its logits fit 1 GiB).

Prints the median milliseconds per minibatch and each setting's ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.measure import make_framework_agent
from bench.workloads import build_assets, workload_named

SETTINGS = {  # name: (entropy_gradient, logits_chunk_size)
    "entropy graph, chunks of 256": (True, 256),
    "no entropy graph, chunks of 256": (False, 256),
    "entropy graph, one pass": (True, None),
    "no entropy graph, one pass": (False, None),
}


def minibatch_seconds(agent, batch, entropy_gradient: bool, chunk: int | None) -> float:
    policy = agent.policy
    policy.entropy_gradient, policy.logits_chunk_size = entropy_gradient, chunk
    policy.zero_grad(set_to_none=True)
    start = time.perf_counter()
    values, log_prob, entropy = policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
    loss = -(log_prob * batch.advantages).mean() - 0.0 * entropy.mean() + ((values.flatten() - batch.returns) ** 2).mean()
    loss.backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="L")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = workload_named(args.workload)
    with tempfile.TemporaryDirectory() as folder:
        model_path, prompts = build_assets(workload, Path(folder))
        agent, _ = make_framework_agent(workload, model_path, prompts, fast=True, device=torch.device("cpu"))
        _, callback = agent._setup_learn(10**9)  # one rollout, as learn collects it
        callback.on_training_start(locals(), globals())
        assert agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps)
        batch = next(agent.rollout_buffer.get(workload.tokens_per_iteration // workload.minibatches))
        agent.policy.set_training_mode(True)
        seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for repeat in range(args.repeats + 1):  # the first round warms up, untimed
            for name, (entropy_gradient, chunk) in SETTINGS.items():
                elapsed = minibatch_seconds(agent, batch, entropy_gradient, chunk)
                if repeat:
                    seconds[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    first = next(iter(medians.values()))
    print(f"Workload {workload.name}: one minibatch of {len(batch.actions)} tokens, vocabulary {workload.vocab_size}, "
          f"{args.threads} threads, median of {args.repeats}")
    print("| setting | ms per minibatch | ratio to the first |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {1000 * median:.0f} | {median / first:.2f} |")
    return medians

if __name__ == "__main__":
    main()
