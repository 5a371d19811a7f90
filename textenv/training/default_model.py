"""The embedded default model: a small GPT-2-style LM and tokenizer, built offline.

Nothing is downloaded: the byte-level BPE tokenizer is trained with the
``tokenizers`` library on the project's own review corpus
(``textenv.tasks.corpus``), and the LM is trained on that corpus with the
project's SFT (``textenv.training.sft``), with a fixed seed. The result is saved
with ``save_pretrained`` in a cache folder (``$TEXTENV_HOME``, default
``~/.cache/textenv``) and loaded through ``from_pretrained`` like any user model.
The build runs once, on first use, with a progress bar.
"""

from __future__ import annotations

from pathlib import Path

import torch

from textenv.lm.cache import cache_root, ensure_built
from textenv.tasks.corpus import generate_reviews
from textenv.training.sft import supervised_finetune

# Bump when the recipe changes, so old caches are not mistaken for the new model.
DEFAULT_MODEL_VERSION = "v1"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
TOKENIZER_VOCAB_SIZE = 1024
N_TRAIN_REVIEWS = 20_000
N_HELDOUT_REVIEWS = 500
SFT_STEPS = 900
SEED = 0


def default_model_dir() -> Path:
    return cache_root() / f"default-lm-{DEFAULT_MODEL_VERSION}"


def ensure_default_model(progress: bool = True) -> Path:
    """The folder of the default model, building it first (about a minute) if needed."""
    return ensure_built(default_model_dir().name, build_default_model, "the default model", progress)


def train_default_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer (any text encodes) wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def build_default_model(folder: Path, progress: bool = True) -> None:
    """Train tokenizer and LM from the built-in corpus and save both into ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = generate_reviews(N_TRAIN_REVIEWS + N_HELDOUT_REVIEWS, seed=SEED)
    train_texts, heldout_texts = texts[:N_TRAIN_REVIEWS], texts[N_TRAIN_REVIEWS:]
    tokenizer = train_default_tokenizer(train_texts)
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=128,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    result = supervised_finetune(
        model,
        tokenizer,
        train_texts,
        heldout_texts,
        steps=SFT_STEPS,
        batch_size=32,
        learning_rate=3e-3,
        max_length=64,
        seed=SEED,
        progress=progress,
        description="default model",
    )
    if progress:
        print(
            f"textenv: default model held-out loss {result.heldout_loss_before:.2f} -> "
            f"{result.heldout_loss_after:.2f} nats/token"
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
