"""reasoning-gym's procedurally generated problems as env ids: ``reasoning-gym/<generator>-v0``.

This module owns the bridge from `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_
(the ``games`` extra) to ``TextGenEnv``: one id per generator with its default settings,
whose prompts are the items' ``question`` (records with ``answer`` and the whole item as
``entry``) and whose reward is the generator's own ``score_answer`` (``ReasoningGymScore``;
1.0 is a correct answer, reported as ``accuracy``). The env class is ``TextGenEnv`` itself,
so ``make_text_vec_env`` batches these ids as it batches any.

Why the pieces are as they are: held-out items come from the seeds after the training
items' (``seed + size`` on), with every question seen in training dropped; each id's
``max_prompt_len`` and ``max_new_tokens`` are measured once (``GENERATORS``, re-measured by
``tests/test_reasoning_gym.py``), since the tokenizer is known only when the model loads;
and the records are generated on first use (``ReasoningGymPrompts``), so importing
``textenv`` needs no reasoning-gym. ``register_reasoning_gym_task`` makes an id with other
settings and refuses unknown keys before a model loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import warnings
from functools import cached_property
from typing import Any, Iterator, Mapping, Sequence

from textenv.registration import register_task

ID_PREFIX = "reasoning-gym/"
DEFAULT_SIZE = 1000  # training items
DEFAULT_SEED = 0
HELDOUT_SIZE = 200  # held-out items wanted (fewer where the generator has few distinct questions)
HELDOUT_POOL_FACTOR = 4  # held-out items drawn at most, per item wanted, before giving up on more
CORRECT_SCORE = 1.0  # score_answer's score of a correct answer: the task's full marks
DEFAULT_MODEL = "default"  # the embedded tiny model: it will not solve these; give an instruct model
MAX_NEW_TOKENS_CAP = 512  # the most max_new_tokens in GENERATORS, however long a reference answer is

#: generator -> (max_prompt_len, max_new_tokens): the registered ids. Measured (module doc) with
#: 10% to spare, in multiples of 8: the longest question, and the longest reference answer plus
#: its stop token (at least 16, at most ``MAX_NEW_TOKENS_CAP``; 256 without reference answers).
GENERATORS: dict[str, tuple[int, int]] = {
    "ab": (240, 40), "acre": (344, 16), "advanced_geometry": (144, 32), "aiw": (160, 16), "arc_1d": (624, 72),
    "arc_agi": (17976, 512), "base_conversion": (104, 24), "basic_arithmetic": (88, 32), "bf": (136, 16),
    "binary_alternation": (192, 16), "binary_matrix": (344, 232), "bitwise_arithmetic": (136, 32),
    "boxnet": (1528, 256), "caesar_cipher": (160, 168), "calendar_arithmetic": (96, 16), "chain_sum": (88, 16),
    "circuit_logic": (1424, 16), "color_cube_rotation": (168, 16),
    "complex_arithmetic": (72, 24), "count_bits": (64, 16), "count_primes": (64, 16), "countdown": (160, 40),
    "course_schedule": (256, 16), "cryptarithm": (144, 56), "decimal_arithmetic": (112, 32),
    "decimal_chain_sum": (120, 24), "dice": (136, 24), "emoji_mystery": (1504, 200),
    "family_relationships": (112, 16), "figlet_font": (1560, 16), "fraction_simplification": (88, 32),
    "game_of_life": (360, 256), "gcd": (80, 16), "graph_color": (248, 256), "group_anagrams": (288, 304),
    "gsm_symbolic": (208, 16), "isomorphic_strings": (144, 16), "jugs": (264, 264), "kakurasu": (320, 64),
    "knights_knaves": (184, 48), "largest_island": (368, 16), "lcm": (64, 16), "leg_counting": (136, 16),
    "letter_counting": (88, 16), "letter_jumble": (232, 144), "list_functions": (520, 56),
    "mahjong_puzzle": (1192, 16), "manipulate_matrix": (432, 232), "maze": (232, 16), "mini_sudoku": (176, 48),
    "modulo_grid": (1408, 512), "n_queens": (264, 152), "needle_haystack": (944, 24),
    "number_filtering": (152, 112), "number_format": (208, 32), "number_sequence": (80, 16),
    "number_sorting": (272, 112), "palindrome_generation": (160, 24), "palindrome_partitioning": (160, 512),
    "polynomial_equations": (312, 32), "polynomial_multiplication": (280, 152), "pool_matrix": (384, 448),
    "power_function": (112, 32), "prime_factorization": (80, 56), "products": (72, 24),
    "propositional_logic": (240, 256), "ransom_note": (136, 16), "rearc": (9336, 512),
    "rectangle_count": (1608, 16), "rotate_matrix": (304, 232), "rotten_oranges": (2152, 16),
    "rubiks_cube": (232, 256), "rush_hour": (200, 256), "self_reference": (200, 16),
    "sentence_reordering": (104, 112), "shortest_path": (304, 72), "simple_equations": (72, 16),
    "simple_geometry": (128, 16), "simple_integration": (264, 72), "spell_backward": (56, 24),
    "spiral_matrix": (432, 232), "string_insertion": (288, 32), "string_manipulation": (440, 32),
    "sudoku": (232, 184), "survo": (208, 72), "syllogism": (88, 16), "time_intervals": (128, 24),
    "tsumego": (344, 16), "word_ladder": (96, 72), "word_sequence_reversal": (104, 64), "word_sorting": (152, 88),
}

#: The lengths of a generator registered by hand that ``GENERATORS`` has not measured.
UNMEASURED_LENGTHS = (256, 64)

#: Generators that are not registered, and why (measured with reasoning-gym 0.1.19). The slow
#: ones make every ``gym.make`` wait (seconds for their 1,000 training and 200 held-out items on
#: one core); ``register_reasoning_gym_task(..., size=100)`` registers one with fewer items.
_SLOW = "slow: {} s to generate on one core"
_FEW = "too few distinct questions: {} held-out questions are not among the 1,000 training ones"
LEFT_OUT: dict[str, str] = {
    "codeio": "generating an item runs code snippets from its data (reasoning-gym warns of the risk), and some "
              "write files into the current folder (a sailor_performance.csv appeared)",
    "composite": "needs settings: it mixes other generators, and names none by default",
    "game_of_life_halting": "its scorer gives full marks to any non-empty answer "
                            "(bool(answer) == bool(entry['answer']), and 'False' is non-empty)",
    "string_splitting": _FEW.format(2),
    "string_synthesis": _FEW.format(2),
    "tower_of_hanoi": _FEW.format(0),
    "futoshiki": _SLOW.format(317),
    "intermediate_integration": _SLOW.format(48),
    "knight_swap": _SLOW.format(333),
    "puzzle24": _SLOW.format(116),
    "quantum_lock": _SLOW.format(62),
    "sokoban": _SLOW.format(92),
    "zebra_puzzles": _SLOW.format(112),
}


def env_id(generator: str) -> str:
    """The registered id of a generator: ``reasoning-gym/<generator>-v0``."""
    return f"{ID_PREFIX}{generator}-v0"


def _datasets() -> dict[str, Any]:
    """reasoning-gym's generators: name -> (dataset class, config class); a clear error without it."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ImportError("The reasoning-gym tasks need the reasoning_gym package. Fix: pip install -e \".[games]\" "
                          "(or pip install reasoning-gym).") from None
    return DATASETS


def generator_settings(generator: str) -> list[str]:
    """The config keys of ``generator`` (``size`` and ``seed`` among them), a clear error for an unknown name."""
    datasets = _datasets()
    if generator not in datasets:
        import difflib

        close = difflib.get_close_matches(generator, list(datasets), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"reasoning-gym has no generator {generator!r}.{hint} Fix: use one of "
                         f"{', '.join(sorted(datasets))}.")
    return list(datasets[generator][1].__dataclass_fields__)


def check_settings(generator: str, settings: Mapping[str, Any], size: int = DEFAULT_SIZE,
                   seed: int = DEFAULT_SEED) -> None:
    """Refuse a key that is none of the generator's config keys (naming them), and settings its
    config's own ``validate`` refuses: at registration, before any model loads or item is generated."""
    if not settings:
        return
    valid = [key for key in generator_settings(generator) if key not in ("size", "seed")]
    unknown = [key for key in settings if key not in valid]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"reasoning-gym's {generator!r} has no setting {', '.join(map(repr, unknown))}{hint}, and "
                        f"TextGenEnv takes no such argument. Fix: use its settings ({', '.join(valid) or 'none'}), "
                        "size=, seed=, or an argument of TextGenEnv (model, max_prompt_len, max_new_tokens, ...).")
    config_class = _datasets()[generator][1]
    try:
        config = config_class(size=size, seed=seed, **settings)
        if hasattr(config, "validate"):
            config.validate()
    except (AssertionError, ValueError, TypeError) as error:
        raise ValueError(f"reasoning-gym's {generator!r} refuses the settings {dict(settings)}: {error or 'invalid'}. "
                         f"Fix: give values its config ({config_class.__name__}) accepts.") from None


def _create(generator: str, size: int, seed: int, settings: Mapping[str, Any]) -> Any:
    """``reasoning_gym.create_dataset``: items are generated when indexed."""
    _datasets()  # the clear error when reasoning-gym is missing
    from reasoning_gym import create_dataset

    return create_dataset(generator, size=size, seed=seed, **settings)


class ReasoningGymPrompts:
    """The records of ``generator``'s items ``0 .. size - 1`` from ``seed``, generated on first use.

    ``TextTask`` reads it as it reads a ``datasets.Dataset`` (``column_names``, ``to_list``):
    records ``{"prompt": question, "answer": ..., "entry": item}``. Iterating it yields the
    questions, as iterating a list of prompts does.

    With ``exclude`` (the training records) it is the held-out split: items drawn from
    ``seed`` until ``size`` questions that are neither in ``exclude`` nor repeated are found,
    at most ``HELDOUT_POOL_FACTOR * size`` items (a generator with few distinct questions
    gives fewer; one with none left is refused).
    """

    column_names = ("prompt", "answer", "entry")

    def __init__(self, generator: str, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED,
                 settings: Mapping[str, Any] | None = None, exclude: "ReasoningGymPrompts | None" = None):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a whole number of at least 1, got {size!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be a whole number, got {seed!r}")
        self.generator, self.size, self.seed = generator, size, seed
        self.settings = dict(settings or {})
        self.exclude = exclude

    def __repr__(self) -> str:
        settings = "".join(f", {key}={value!r}" for key, value in self.settings.items())
        split = ", held out" if self.exclude is not None else ""
        return f"ReasoningGymPrompts({self.generator!r}, size={self.size}, seed={self.seed}{settings}{split})"

    def __deepcopy__(self, memo: dict) -> "ReasoningGymPrompts":
        return self  # immutable: gym.make deep-copies its kwargs, and the items are the same

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """The records, generated once."""
        with _quiet():
            items = self._heldout_items() if self.exclude is not None else self._items()
        return [{"prompt": item["question"], "answer": item["answer"], "entry": item} for item in items]

    def _items(self) -> list[dict[str, Any]]:
        dataset = _create(self.generator, self.size, self.seed, self.settings)
        return [dataset[index] for index in _progress(range(self.size), f"reasoning-gym {self.generator}")]

    def _heldout_items(self) -> list[dict[str, Any]]:
        taken = set(self.exclude)  # the training questions
        pool = HELDOUT_POOL_FACTOR * self.size
        dataset = _create(self.generator, pool, self.seed, self.settings)
        items = []
        for index in _progress(range(pool), f"reasoning-gym {self.generator} (held out)"):
            item = dataset[index]
            if item["question"] not in taken:
                taken.add(item["question"])
                items.append(item)
                if len(items) == self.size:
                    break
        if not items:
            raise ValueError(f"reasoning-gym's {self.generator!r} gave no held-out question that is not a training "
                             f"question in {pool} items. Fix: lower size, or change its settings so that it has more "
                             "distinct questions.")
        return items

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(record) for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[str]:
        return (record["prompt"] for record in self.records)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep a generator's own prints (progress dots) and warnings (from the code some of them
    compile and run: invalid escapes, numpy's matrix) out of the user's output: they are
    reasoning-gym's internals, nothing the user can act on."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _progress(indices: range, description: str) -> Any:
    """A progress bar for a slow generator (shown only after two seconds)."""
    from tqdm.auto import tqdm

    return tqdm(indices, desc=description, delay=2.0, leave=False)


class ReasoningGymScore:
    """The reward: ``generator``'s own ``score_answer(answer=completion, entry=item)`` per completion.

    A completion the scorer raises on (some parse the answer and fail on free text) scores
    0.0: it is not a correct answer, and a model's text must never stop a training run.
    """

    def __init__(self, generator: str, settings: Mapping[str, Any] | None = None):
        self.generator, self.settings = generator, dict(settings or {})
        self.__name__ = f"reasoning-gym:{generator}"  # the reward's name in configs and errors

    def __repr__(self) -> str:
        return f"ReasoningGymScore({self.generator!r})"

    def __deepcopy__(self, memo: dict) -> "ReasoningGymScore":
        return self

    @cached_property
    def _dataset(self) -> Any:
        with _quiet():
            return _create(self.generator, 1, DEFAULT_SEED, self.settings)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], entry: Sequence[Mapping[str, Any]]
                 ) -> list[float]:
        with _quiet():
            return [self.score(completion, item) for completion, item in zip(completions, entry)]

    def score(self, completion: str, item: Mapping[str, Any]) -> float:
        """One completion's score (0.0 where the scorer raises)."""
        try:
            return float(self._dataset.score_answer(answer=completion, entry=item))
        except Exception:  # the scorer could not read the completion: not a correct answer
            return 0.0


def _env_arguments() -> list[str]:
    """What ``TextGenEnv`` takes (``TextTask``'s arguments and ``render_mode``)."""
    from textenv.task import TextTask

    return [name for name in inspect.signature(TextTask.__init__).parameters if name != "self"] + ["render_mode"]


def register_reasoning_gym_task(
    env_id: str, generator: str, *, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED,
    heldout_size: int = HELDOUT_SIZE, **kwargs: Any,
) -> None:
    """Register ``generator`` under ``env_id``: ``size`` training items from ``seed``, a held-out
    split (module doc), and ``kwargs``: the generator's own config keys and ``TextGenEnv``
    arguments (``model``, ``max_prompt_len``, ``max_new_tokens``, ``system_prompt``, ...).
    Unknown keys and settings the generator refuses are refused here."""
    environment = set(_env_arguments())
    settings = {key: value for key, value in kwargs.items() if key not in environment}
    env_kwargs = {key: value for key, value in kwargs.items() if key in environment}
    if generator not in GENERATORS:
        generator_settings(generator)  # refuses an unknown generator, naming reasoning-gym's
    check_settings(generator, settings, size, seed)
    if "prompts" in env_kwargs:
        raise TypeError("The prompts of a reasoning-gym task are its generator's items. Fix: drop prompts=, or use "
                        "textenv.register_task for prompts of your own.")
    training = ReasoningGymPrompts(generator, size, seed, settings)
    heldout = ReasoningGymPrompts(generator, heldout_size, seed + size, settings, exclude=training)
    max_prompt_len, max_new_tokens = GENERATORS.get(generator, UNMEASURED_LENGTHS)
    defaults = dict(model=DEFAULT_MODEL, reward=ReasoningGymScore(generator, settings), chat_template="auto",
                    max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens)
    register_task(env_id, heldout_prompts=lambda: heldout, full_marks=CORRECT_SCORE, prompts=training,
                  **{**defaults, **env_kwargs})


def register() -> None:
    """Register ``reasoning-gym/<generator>-v0`` for every generator of ``GENERATORS``, when
    reasoning-gym is installed (it is not imported here: the items are generated on first use)."""
    if importlib.util.find_spec("reasoning_gym") is None:
        return
    for generator in GENERATORS:
        register_reasoning_gym_task(env_id(generator), generator)
