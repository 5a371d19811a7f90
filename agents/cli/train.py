"""Train an agent on a text environment.

With no arguments: PPO on ``textenv/PositiveSentiment-v0`` with the embedded
default model (built once on first use, offline), TensorBoard logs under
``runs/``, the agent saved to ``runs/<env>-<algo>-seed<seed>.zip``; the mean task
score before and after training and the final KL are printed, then a summary JSON
that holds the run's resolved configuration (every algorithm, policy and
environment argument; TensorBoard gets it too, under config/ and HPARAMS).

    textenv-train
    textenv-train --algo grpo --env textenv/Arithmetic-v0 --total-timesteps 65536
    torchrun --nproc-per-node 2 scripts/train.py   # data-parallel: one process per GPU (or CPU, gloo)
    torchrun --nproc-per-node 2 scripts/train.py --fsdp   # the same, the training state sharded (FSDP2)

Defaults are the Python API's: an option left out is not passed on, so
``textenv-train --algo ppo`` trains what ``LMPPO(env=make_text_vec_env(id))``
would (beta adapted toward 4 nats of KL per episode). The run itself is
``agents.training_run.train_and_evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agents.cli.arguments import (
    ENV_HELP, add_kl_arguments, algorithm_name, check_algorithm_kwargs, check_writable, device, env_id,
    json_object, kl_agent_kwargs, non_negative_int, positive_float, positive_int,
)
from agents.cli.console import console_main, quiet_libraries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textenv-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", type=env_id, default="textenv/PositiveSentiment-v0",
                        help=ENV_HELP)
    parser.add_argument("--algo", type=algorithm_name, default="ppo", help="algorithm name (see agents.ALGORITHMS)")
    parser.add_argument("--model", default=None, help="policy and reference model: name or path (default: the env's)")
    parser.add_argument("--total-timesteps", type=positive_int, default=24_576, help="generated tokens to train on")
    parser.add_argument("--n-envs", type=positive_int, default=None, help="parallel episodes (default 16)")
    add_kl_arguments(parser)
    parser.add_argument("--learning-rate", type=positive_float, default=None, help="override the algorithm's default")
    parser.add_argument("--group-size", type=positive_int, default=None,
                        help="rloo/grpo: completions per prompt (default 4)")
    parser.add_argument("--algo-kwargs", type=json_object('{"n_epochs": 2}'), default="{}", metavar="JSON",
                        help='more algorithm arguments, e.g. \'{"n_epochs": 2, "clip_range": 0.1}\'')
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--eval-episodes", type=positive_int, default=128, help="episodes for the before/after score")
    parser.add_argument("--tensorboard-log", default="runs", help="TensorBoard folder ('' to disable)")
    parser.add_argument("--save-path", default=None, help="where to save the agent (.zip)")
    parser.add_argument("--device", type=device, default="auto",
                        help="'auto', 'cpu' or 'cuda': the policy and the env's reference and reward models")
    parser.add_argument("--precision", choices=("fp32", "bf16-mixed", "bf16"), default=None,
                        help="fp32 (default): float32 weights; bf16-mixed: float32 master weights, bf16 autocast; "
                             "bf16: bf16 weights")
    parser.add_argument("--lora-r", type=positive_int, default=None,
                        help="train LoRA adapters of this rank (alpha 2r, all linear layers) instead of every "
                             "weight; the reference is the same body with the adapters off")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the weights, gradients and optimizer state over the ranks "
                             "(FSDP2) instead of a whole copy per rank (DDP); see the README's 'Beyond one machine'")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the body's activations in the backward pass (less memory)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the rollout's decode step (compiled on the first rollout; "
                             "on a CPU it pays on small models only: docs/benchmarks.md)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="TOKENS",
                        help="write a checkpoint every TOKENS generated tokens, beside the saved agent in "
                             "<agent>-checkpoints/ (an exact resume point)")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=3, help="newest checkpoints to keep")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' (its newest readable checkpoint, or a fresh start) or a "
                             "checkpoint file; the same arguments as the first start")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Checked here, before any model loads, as make_agent would check them after.
    from agents.envs import DEFAULT_N_ENVS
    from agents.registry import algorithm_keywords

    if args.n_envs is None:
        args.n_envs = DEFAULT_N_ENVS

    if args.group_size is not None and "group_size" not in algorithm_keywords(args.algo):
        parser.error(f"argument --group-size: {args.algo} draws one completion per prompt. "
                     "Fix: drop --group-size, or use --algo rloo or grpo.")
    if args.lora_r is not None and args.algo == "trpo":
        parser.error("argument --lora-r: TRPO cannot train LoRA adapters (sb3-contrib differentiates every "
                     "policy parameter). Fix: drop --lora-r, or use --algo ppo, a2c, rloo, grpo or nlpo.")
    group = {} if args.group_size is None else {"group_size": args.group_size}
    if args.save_path:
        check_writable(parser, "--save-path", Path(args.save_path).expanduser().parent)
    if args.resume not in (None, "auto"):  # 'auto' is looked up when the run starts
        from agents.training_run import find_checkpoint

        try:
            find_checkpoint(args.resume, Path())
        except FileNotFoundError as error:
            parser.error(f"argument --resume: {error}")
    if args.tensorboard_log:
        check_writable(parser, "--tensorboard-log", args.tensorboard_log)
    check_algorithm_kwargs(parser, args.algo, {**group, **args.algo_kwargs}, n_envs=args.n_envs,
                           set_by_command={"seed": "--seed", "tensorboard_log": "--tensorboard-log",
                                           "device": "--device", "precision": "--precision"})
    return args


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train and evaluate, print the summary (JSON, stdout) and return it
    (``{}`` on the ranks other than 0 of a data-parallel run)."""
    args = parse_args(argv)
    quiet_libraries()
    from agents.distributed import distributed_from_environment, is_main_process
    from agents.training_run import train_and_evaluate
    from textenv.task import resolve_device

    agent_kwargs = dict(kl_agent_kwargs(args), verbose=0)
    if args.learning_rate is not None:
        agent_kwargs["learning_rate"] = args.learning_rate
    if args.group_size is not None:
        agent_kwargs["group_size"] = args.group_size
    if args.precision is not None:
        agent_kwargs["precision"] = args.precision
    if args.fsdp:
        agent_kwargs["parallelism"] = "fsdp"
    policy_kwargs = dict(args.algo_kwargs.pop("policy_kwargs", None) or {})
    if args.lora_r is not None:
        policy_kwargs["lora"] = {"r": args.lora_r, "lora_alpha": 2 * args.lora_r}
    if args.gradient_checkpointing:
        policy_kwargs["gradient_checkpointing"] = True
    if args.compile:
        policy_kwargs["compile"] = True
    if policy_kwargs:
        agent_kwargs["policy_kwargs"] = policy_kwargs
    agent_kwargs.update(args.algo_kwargs)
    # Under torchrun: join its process group, one device per rank (agents.distributed).
    with distributed_from_environment(args.device) as context:
        run = train_and_evaluate(
            args.env, args.algo, args.total_timesteps, n_envs=args.n_envs, seed=args.seed,
            env_kwargs=None if args.model is None else {"model": args.model}, eval_episodes=args.eval_episodes,
            tensorboard_log=args.tensorboard_log or None, save_path=args.save_path, progress_bar=not args.quiet,
            print_scores=True, device=str(context.device if context else resolve_device(args.device)),
            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
            **agent_kwargs,
        )
        if not is_main_process():
            return {}
    summary = run.summary()
    if context is not None:
        summary["data_parallel"] = {"world_size": context.world_size, "backend": context.backend,
                                    "parallelism": "fsdp" if args.fsdp else "ddp"}
    print(json.dumps(summary, indent=2))
    if args.tensorboard_log:
        print(f"TensorBoard: tensorboard --logdir {args.tensorboard_log}")
    return summary


main = console_main(__name__, "textenv-train")


if __name__ == "__main__":
    sys.exit(main())
