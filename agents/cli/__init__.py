"""The console commands (``[project.scripts]`` in pyproject.toml), one module each.

| command | module | what it runs |
|---|---|---|
| ``textenv-train`` | ``train`` | ``agents.training_run.train_and_evaluate`` |
| ``textenv-evaluate`` | ``evaluate`` | ``agents.evaluation.compare_with_reference`` |
| ``textenv-compare`` | ``compare`` | ``agents.comparison.run_comparison`` |
| ``textenv-sft`` | ``sft`` | ``textenv.training.sft.fine_tune_and_save`` |
| ``textenv-train-reward-model`` | ``train_reward_model`` | ``textenv.training.reward_model.train_and_save_reward_model`` |
| ``textenv-pipeline`` | ``pipeline`` | the four above in turn: SFT, reward model, PPO, evaluation |
| ``textenv-export`` | ``export`` | ``agents.saving.export_policy``: a Hugging Face model folder, no pickle |

Each module parses and checks its arguments (``arguments``: bad input is a usage
error before any model loads) and calls the library function in the right-hand
column; none holds training logic of its own. Each has ``run(argv)``, which does the
work, prints the results (stdout, or files) and returns them to Python callers, and
``main(argv)``, the console entry point, which returns the exit status (0 on success;
``console`` has what they share: ``console_main``, which makes ``main`` from ``run``,
quiet libraries, notes on stderr). ``python -m agents.cli.train`` is ``textenv-train``.
This sub-package is the top of ``agents`` and of the installed packages: it may import
the agents and ``textenv``, nothing in the library imports it.
"""
