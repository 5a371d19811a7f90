"""Argument checks shared by the console commands: bad input becomes a usage error.

Every check here runs while the arguments are parsed, before any model is
loaded or built, and reports through argparse (``prog: error: ...``, exit code
2, no traceback) with one line that names the fix. The ``type=`` functions raise
``argparse.ArgumentTypeError``; the checks of several arguments together take
the parser and call ``parser.error``.

It lives with the commands rather than in the library because it speaks
argparse; the library's own checks (``agents.registry.check_algorithm_kwargs``)
do the work where there is one. Being inside ``agents``, a command imports that
package (torch, transformers, Stable-Baselines3: a few seconds) before it parses;
no model loads before the arguments pass.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import sys
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable

TEXT_ENTRY_POINT = "textenv.env:TextGenEnv"
ENV_HELP = ("a registered environment id; or MODULE:ID (a module in the current folder or on PYTHONPATH) or "
            "path/to/file.py:ID, imported first to register ID with textenv.register_task")


class DeprecatedAlias(argparse.Action):
    """An old option name that still works, with a one-line notice on stderr naming the new one.

    ``parser.add_argument("--target-kl", dest="kl_target", action=DeprecatedAlias,
    new_option="--kl-target", type=..., help=argparse.SUPPRESS)``
    """

    def __init__(self, option_strings: list[str], dest: str, new_option: str, **kwargs: Any):
        self.new_option = new_option
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.new_option} (same meaning).",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_kl_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kl-coef``, ``--kl-target`` (alias ``--target-kl``, deprecated) and ``--kl-horizon``,
    made from ``agents.settings.KLSettings``' fields (their help is the fields').

    Their defaults are the agents' own (``agents.algorithms.KL_DEFAULTS``, ``default_kl_coef``):
    an option left out is not passed on, so the commands and the Python API run alike.
    ``--kl-target 0`` becomes ``kl_target=None``, a fixed beta (``kl_agent_kwargs``).
    """
    from agents.settings import KLSettings, add_settings_arguments

    add_settings_arguments(parser, KLSettings, ("kl_coef", "kl_target", "kl_horizon"),
                           types={"kl_coef": non_negative_float, "kl_target": non_negative_float,
                                  "kl_horizon": positive_int})
    parser.add_argument("--target-kl", dest="kl_target", type=non_negative_float, action=DeprecatedAlias,
                        new_option="--kl-target", help=argparse.SUPPRESS)


def kl_agent_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The KL options the user gave, as agent keywords (see ``add_kl_arguments``)."""
    kwargs: dict[str, Any] = {}
    if args.kl_coef is not None:
        kwargs["kl_coef"] = args.kl_coef
    if args.kl_target is not None:
        kwargs["kl_target"] = args.kl_target or None  # 0: fixed beta
    if args.kl_horizon is not None:
        kwargs["kl_horizon"] = args.kl_horizon
    return kwargs


def positive_int(text: str) -> int:
    """A count (steps, episodes, parallel envs): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer. Fix: pass a whole number >= 1.")
    return value


def non_negative_int(text: str) -> int:
    """A seed: a whole number >= 0 (NumPy refuses negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer. Fix: pass a whole number >= 0.")
    return value


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None  # no nan, no inf


def positive_float(text: str) -> float:
    """A learning rate: a finite number > 0."""
    value = _float(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number. Fix: pass a number > 0, e.g. 1e-4.")
    return value


def non_negative_float(text: str) -> float:
    """A KL coefficient or target: a finite number >= 0."""
    value = _float(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number. Fix: pass a number >= 0.")
    return value


def fraction(text: str) -> float:
    """A held-out share: strictly between 0 and 1, so both parts are non-empty."""
    value = _float(text)
    if value is None or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction. Fix: pass a number between 0 and 1, e.g. 0.1.")
    return value


def existing_file(text: str) -> str:
    """A path that must name a file now, rather than after the models have loaded."""
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(
            f"no such file: {text!r}. Fix: check the path (relative paths start from {Path.cwd()})."
        )
    return text


def agent_zip(text: str) -> str:
    """An agent saved by ``model.save``: a zip file (SB3 adds a missing ``.zip``)."""
    path = Path(text).expanduser()
    if not path.is_file() and Path(f"{path}.zip").is_file():
        path = Path(f"{path}.zip")
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"no such agent file: {text!r}. Fix: pass the .zip that textenv-train saved "
            "(by default runs/<env>-<algo>-seed<seed>.zip)."
        )
    if not zipfile.is_zipfile(path):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a saved agent (not a zip file). Fix: pass the .zip that textenv-train "
            "or model.save wrote; a model folder goes to --env-kwargs '{\"model\": ...}' instead."
        )
    return text


def json_object(example: str) -> Callable[[str], dict[str, Any]]:
    """A ``type=`` for a JSON object argument; ``example`` shows a valid one in the error."""

    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(
                f"not valid JSON ({error.msg} at column {error.colno}) in {text!r}. "
                f"Fix: write a JSON object with double-quoted keys, in single shell quotes, e.g. '{example}'."
            ) from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(
                f"{text!r} is JSON but not an object. Fix: write a JSON object, e.g. '{example}'."
            )
        return value

    parse.__name__ = "json_object"
    return parse


def _text_env_ids() -> list[str]:
    import gymnasium as gym

    from textenv.env import TextGenEnv

    return sorted(
        env_id for env_id, spec in gym.registry.items() if spec.entry_point in (TEXT_ENTRY_POINT, TextGenEnv)
    )


def env_id(text: str) -> str:
    """A registered environment id, or ``MODULE:ID`` / ``path/to/file.py:ID`` whose module
    registers the id when imported (``import_task_module``).

    Importing ``textenv`` registers the built-in ids without loading any model, so
    the registry answers now. Returns the plain id.
    """
    import gymnasium as gym

    import textenv  # noqa: F401  (registers the textenv/... ids)

    module, _, plain_id = text.rpartition(":")
    if module:
        import_task_module(module, plain_id)
    try:
        gym.spec(plain_id)
    except gym.error.Error:
        registered = _text_env_ids()
        close = difflib.get_close_matches(plain_id, registered, n=1)
        hint = f"did you mean {close[0]!r}? Otherwise use" if close else "use"
        where = f" ({module!r} was imported but did not register it)" if module else ""
        raise argparse.ArgumentTypeError(
            f"unknown environment id {plain_id!r}{where}. Fix: {hint} a registered id such as "
            "textenv/PositiveSentiment-v0, or register yours with textenv.register_task in a module "
            f"and pass --env your_module:{plain_id} or --env path/to/your_module.py:{plain_id} "
            f"(registered: {', '.join(registered)})."
        ) from None
    return plain_id


def import_task_module(module: str, plain_id: str) -> None:
    """Import the module that registers a task, named on the command line.

    ``package.module``: found in the current folder first, then as usual (``PYTHONPATH``,
    installed packages), the order in which ``python -m`` looks. A console script's
    ``sys.path`` starts with its ``bin/`` folder, not the current one: without this lookup
    only ``PYTHONPATH=.`` would find a module beside the user. ``path/to/file.py`` (ends in
    ``.py``): that file, by its path, as the module named by its stem.

    ``sys.path`` is left as it is (``tests/test_layering.py``): the module is located with
    the current folder as its search path and loaded from there. So a module's imports of
    its own neighbours resolve only if they are importable anyway: keep a task of several
    files in a package (a folder with ``__init__.py``; ``--env mytasks.polite:ID``, relative
    imports inside) or put its folder on ``PYTHONPATH``.

    An error inside the module is a usage error (exit 2) printed after its traceback.
    """
    import importlib
    import importlib.machinery
    import importlib.util
    import os

    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise argparse.ArgumentTypeError(
                f"no such file: {module!r} (to register {plain_id!r}). Fix: check the path (relative paths "
                f"start from {Path.cwd()}), or pass MODULE:ID for a module importable from here."
            )
        name = path.stem
        loaded = sys.modules.get(name)
        if loaded is not None:
            if Path(getattr(loaded, "__file__", None) or "").resolve() == path:
                return  # imported already (the same file named twice)
            raise argparse.ArgumentTypeError(
                f"cannot import {module!r} as module {name!r}: a module of that name is already loaded "
                f"({getattr(loaded, '__file__', None) or 'built in'}). Fix: rename the file."
            )
        if not name.isidentifier():
            raise argparse.ArgumentTypeError(
                f"cannot import {module!r}: {name!r} is not a module name. Fix: rename the file to a Python "
                "identifier (letters, digits, underscores), e.g. my_task.py."
            )
        spec = importlib.util.spec_from_file_location(name, path)
    else:
        top = module.partition(".")[0]
        spec = None if top in sys.modules else importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
        name = top
    try:
        if spec is not None:  # a file, or a module or package in the current folder
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            try:
                spec.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[name]
                raise
        if not module.endswith(".py"):
            importlib.import_module(module)  # the rest of a dotted name, or the module from sys.path
    except ModuleNotFoundError as error:
        if module.endswith(".py") or error.name is None or not f"{module}.".startswith(f"{error.name}."):
            raise _error_in_task_module(module, plain_id, error) from None
        raise argparse.ArgumentTypeError(
            f"cannot import {module!r} to register {plain_id!r} ({error}). Fix: run the command from the "
            f"folder that holds {module.replace('.', '/')}.py (or put that folder on PYTHONPATH), or pass "
            f"the file's path: --env path/to/{module.rpartition('.')[2]}.py:{plain_id}."
        ) from None
    except Exception as error:
        raise _error_in_task_module(module, plain_id, error) from None


def _error_in_task_module(module: str, plain_id: str, error: Exception) -> argparse.ArgumentTypeError:
    traceback.print_exception(error, file=sys.stderr)
    fix = "correct that module (its traceback is above)"
    if isinstance(error, ModuleNotFoundError):
        fix = ("install what it imports; for a module of your own beside it, make the two a package (a folder "
               "with __init__.py, relative imports) or put their folder on PYTHONPATH")
    return argparse.ArgumentTypeError(
        f"importing {module!r} to register {plain_id!r} failed: {type(error).__name__}: {error}. Fix: {fix}."
    )


def algorithm_name(text: str) -> str:
    """A name in ``agents.ALGORITHMS`` (any case), returned in lower case."""
    from agents.registry import algorithm_class

    try:
        algorithm_class(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.lower()


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...: parsed by torch, CUDA only where there is a GPU."""
    if text == "auto":
        return text
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device. Fix: pass auto, cpu or cuda.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is visible here. Fix: pass --device cpu (or auto).")
    return text


def check_algorithm_kwargs(
    parser: argparse.ArgumentParser,
    algo: str,
    kwargs: dict[str, Any],
    n_envs: int | None = None,
    set_by_command: dict[str, str] | None = None,
) -> None:
    """Refuse ``--algo-kwargs`` that the algorithm would reject, or that clash with what
    the command passes itself (``set_by_command``: keyword -> the option to use instead)."""
    from agents.registry import check_algorithm_kwargs as check

    set_by_command = {"env": "--env", **(set_by_command or {})}
    for key in kwargs:
        if key in set_by_command:
            parser.error(f"argument --algo-kwargs: {key!r} is set by this command. Fix: use {set_by_command[key]}.")
    try:
        check(algo, kwargs, n_envs=n_envs)
    except ValueError as error:
        parser.error(str(error))


def check_writable(parser: argparse.ArgumentParser, option: str, folder: str | Path) -> None:
    """Refuse an output folder that cannot be written (made if missing) before any work starts."""
    from textenv.files import check_writable_folder

    try:
        check_writable_folder(folder)
    except OSError as error:
        parser.error(f"argument {option}: {error}. Fix: choose a folder you can write to.")


def check_env_kwargs(parser: argparse.ArgumentParser, option: str, env_id: str, kwargs: dict[str, Any]) -> None:
    """Refuse keywords that a text task's constructor would reject (checked for ``TextGenEnv`` ids)."""
    import gymnasium as gym

    from textenv.env import TextGenEnv
    from textenv.task import TextTask

    if gym.spec(env_id).entry_point not in (TEXT_ENTRY_POINT, TextGenEnv):
        return
    known = [name for name in inspect.signature(TextTask.__init__).parameters if name != "self"] + ["render_mode"]
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? Otherwise use" if close else "use"
            parser.error(f"argument {option}: unknown environment argument {key!r}. "
                         f"Fix: {hint} one of {', '.join(known)}.")


def check_gpt2_config(
    parser: argparse.ArgumentParser, option: str, config: dict[str, Any], set_by_command: set[str]
) -> None:
    """Refuse a GPT-2 config that would fail (or silently ignore a typo) when the model is built."""
    from transformers import GPT2Config

    known = [name for name in inspect.signature(GPT2Config.__init__).parameters if name != "self"]
    known += list(GPT2Config.attribute_map)
    for key in config:
        if key in set_by_command:
            parser.error(f"argument {option}: {key!r} is set by this command. Fix: leave it out.")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parser.error(f"argument {option}: unknown GPT-2 config key {key!r}{hint}. Fix: use GPT2Config's "
                         "names, e.g. n_layer, n_embd, n_head, n_positions.")
    try:
        built = GPT2Config(**config)
        n_embd, n_head = int(built.n_embd), int(built.n_head)
        valid = n_embd > 0 and n_head > 0 and n_embd % n_head == 0 and int(built.n_layer) > 0
    except Exception as error:  # transformers validates fields with its own error classes
        reason = " ".join(str(error).split())
        parser.error(f"argument {option}: invalid GPT-2 config ({reason}). Fix: give whole numbers, e.g. "
                     '\'{"n_layer": 2, "n_embd": 64, "n_head": 2}\'.')
    if not valid:
        parser.error(f"argument {option}: n_embd={n_embd} must be a positive multiple of n_head={n_head}, "
                     "and n_layer >= 1. Fix: e.g. '{\"n_layer\": 2, \"n_embd\": 64, \"n_head\": 2}'.")
