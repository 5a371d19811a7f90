"""How much of the update's body pass is padding, on a task whose episodes end early (EOS).

    PYTHONPATH=scripts python -m bench.padding                       # ShortPositive, 2 rollouts
    PYTHONPATH=scripts python -m bench.padding --env textenv/PositiveSentiment-v0

The fast path's PPO agent (the default model, the task's defaults) collects rollouts; each
is cut into the update's minibatches of whole episodes (``rollout_buffer.get``), and for
every minibatch the rows x columns the body computes are counted three ways:

- ``full width``: every row at the observation's width (``max_prompt_len + max_new_tokens``);
- ``right-trimmed``: up to the last column any token reads (``TokenSequences.trimmed``: what
  the update did before issue 24);
- ``both ends trimmed``: also without the columns left of the first real token of any
  episode of the rollout (``SequenceRolloutBuffer.shared_left_padding``: what it does now).

Prints the share of padding in each and the mean episode length. What remains after both
trims is the gap between the episodes of one minibatch (short and long episodes side by
side, and prompts of different lengths): packing them needs attention over several
sequences in one row, which SDPA on a CPU has no kernel for.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def padding_shares(batch, full_width: int, shared_left_padding: int) -> dict[str, float]:
    """The padding share of one minibatch's body pass, three ways (see the module doc)."""
    sequences = batch.observations.trimmed()  # the columns the body computes now
    rows, width = sequences.attention_mask.shape
    real = float(sequences.attention_mask.sum())
    return {"full width": 1 - real / (rows * full_width),
            "right-trimmed": 1 - real / (rows * (width + shared_left_padding)),
            "both ends trimmed": 1 - real / (rows * width)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    from agents import make_agent, make_text_vec_env

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="textenv/ShortPositive-v0")
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = make_text_vec_env(args.env, n_envs=args.n_envs, seed=0)
    agent = make_agent("ppo", env, seed=0, device="cpu")
    _, callback = agent._setup_learn(10**9)
    callback.on_training_start(locals(), globals())
    shares: dict[str, list[float]] = {}
    lengths: list[int] = []
    for _ in range(args.rollouts):
        assert agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps)
        for batch in agent.rollout_buffer.get(agent.batch_size):
            full_width = env.task.max_prompt_len + env.max_new_tokens
            for name, share in padding_shares(batch, full_width, agent.rollout_buffer.shared_left_padding).items():
                shares.setdefault(name, []).append(share)
            lengths += np.bincount(batch.observations.token_rows.cpu().numpy()).tolist()
    means = {name: float(np.mean(values)) for name, values in shares.items()}
    print(f"{args.env}: {args.rollouts} rollouts of {args.n_envs} x {agent.n_steps} tokens, minibatches of "
          f"{agent.batch_size} tokens; mean episode segment {np.mean(lengths):.1f} tokens "
          f"(of at most {env.max_new_tokens})")
    print("| body pass | padding share |")
    print("|---|---|")
    for name, mean in means.items():
        print(f"| {name} | {100 * mean:.1f}% |")
    return means


if __name__ == "__main__":
    main()
