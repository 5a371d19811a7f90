"""Train an agent on a text environment.

With no arguments: PPO on ``textenv/PositiveSentiment-v0`` with the embedded
default model (built once on first use, offline), TensorBoard logs under
``runs/``, the agent saved to ``runs/<env>-<algo>-seed<seed>.zip``; the mean task
score before and after training and the final KL are printed, then a summary JSON
that holds the run's resolved configuration (every algorithm, policy and
environment argument; TensorBoard gets it too, under config/ and HPARAMS).

Defaults are the Python API's: an option left out is not passed on, so
``python scripts/train.py --algo ppo`` trains what ``LMPPO(env=make_text_vec_env(id))``
would (beta adapted toward 4 nats of KL per episode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import (  # noqa: E402  (after the path set-up)
    add_kl_arguments, algorithm_name, check_algorithm_kwargs, device, env_id, json_object, kl_agent_kwargs,
    non_negative_int, positive_float, positive_int,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", type=env_id, default="textenv/PositiveSentiment-v0",
                        help="registered environment id, or module:id to import the module that registers it")
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
    parser.add_argument("--device", type=device, default="auto", help="'auto', 'cpu' or 'cuda'")
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
    group = {} if args.group_size is None else {"group_size": args.group_size}
    check_algorithm_kwargs(parser, args.algo, {**group, **args.algo_kwargs}, n_envs=args.n_envs)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from stable_baselines3.common.utils import set_random_seed

    from agents import evaluate_agent, make_agent, make_text_vec_env
    from agents.config import resolved_config
    from textenv.task import resolve_device

    set_random_seed(args.seed)
    device = resolve_device(args.device)
    env_kwargs = {} if args.model is None else {"model": args.model}
    env = make_text_vec_env(args.env, n_envs=args.n_envs, seed=args.seed, env_kwargs=env_kwargs)
    eval_env = make_text_vec_env(args.env, n_envs=args.n_envs, seed=args.seed + 10_000, env_kwargs=env_kwargs)
    agent_kwargs = dict(
        **kl_agent_kwargs(args),
        seed=args.seed,
        device=device,
        tensorboard_log=args.tensorboard_log or None,
        verbose=0,
    )
    if args.learning_rate is not None:
        agent_kwargs["learning_rate"] = args.learning_rate
    if args.group_size is not None:
        agent_kwargs["group_size"] = args.group_size
    agent_kwargs.update(args.algo_kwargs)
    model = make_agent(args.algo, env, **agent_kwargs)
    config = resolved_config(model, env)  # learn() writes the same to TensorBoard

    before = evaluate_agent(model, eval_env, args.eval_episodes, seed=args.seed)
    print(f"before training: mean task score {before.task_score:+.3f}, KL {before.kl:.3f}")
    start = time.perf_counter()
    run_name = f"{args.env.replace('/', '-')}-{args.algo}"
    model.learn(args.total_timesteps, tb_log_name=run_name, progress_bar=not args.quiet)
    train_seconds = time.perf_counter() - start
    after = evaluate_agent(model, eval_env, args.eval_episodes, seed=args.seed)

    save_path = args.save_path or str(Path("runs") / f"{run_name}-seed{args.seed}.zip")
    Path(save_path).parent.mkdir(parents=True, exist_ok=True)
    model.save(save_path)

    summary = {
        "env": args.env,
        "algo": args.algo,
        "total_timesteps": args.total_timesteps,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(args.total_timesteps / train_seconds, 1),
        "task_score_before": round(before.task_score, 4),
        "task_score_after": round(after.task_score, 4),
        "kl_before": round(before.kl, 4),
        "kl_after": round(after.kl, 4),
        "kl_coef_final": round(model.kl_controller.value, 5),
        "saved_to": save_path,
        "tensorboard_log": model.logger.dir if args.tensorboard_log else None,
        "config": config,
    }
    print(f"after training:  mean task score {after.task_score:+.3f}, KL {after.kl:.3f} "
          f"(beta now {model.kl_controller.value:.4f})")
    print("samples after training:")
    for prompt, completion, score in after.samples[:4]:
        print(f"  [{score:+.2f}] {prompt}|{completion}")
    print(json.dumps(summary, indent=2))
    if args.tensorboard_log:
        print(f"TensorBoard: tensorboard --logdir {args.tensorboard_log}")
    return summary


if __name__ == "__main__":
    main()
