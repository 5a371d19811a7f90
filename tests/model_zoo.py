"""Tiny random-weight checkpoints of real causal-LM architectures, built offline.

The project claims to work with "any causal LM" loaded through ``from_pretrained``;
a single GPT-2 in the tests would not show it. This module saves, in a folder and
without any download, a tiny checkpoint (model, tokenizer, generation config) of
several architectures whose quirks have bitten such code in practice:

* ``gpt2``            GPT-2, byte-level BPE, eos ``<|endoftext|>``, no pad token.
* ``llama-sp``        Llama saved in bfloat16 (loads as bf16), SentencePiece-style
                      tokenizer (``▁`` word marker, BOS added, decoding a
                      continuation alone drops its leading space), no pad token.
* ``qwen2-padded``    Qwen2 whose embedding matrix has more rows than the tokenizer
                      has tokens, eos ``<|im_end|>``, pad ``<|endoftext|>``.
* ``gemma2-softcap``  Gemma2 with a small ``final_logit_softcapping`` (logits are
                      really capped), Gemma tokenizer (``▁`` marker, BOS added, no
                      prefix space: a continuation decoded alone keeps its space).
* ``granite-scaling`` Granite, logits divided by ``logits_scaling``; pad == eos.
* ``multi-eos``       Llama-3 style: generic fast tokenizer, ``generation_config``
                      whose ``eos_token_id`` is a list of two ids.

Tokenizers are trained with the ``tokenizers`` library on a small built-in corpus
and wrapped in the tokenizer class the published checkpoints use, so that loading
goes through the same ``AutoTokenizer`` path. Everything is seeded: a build is
deterministic, and the global torch RNG state is left untouched.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["KINDS", "ZooModel", "corpus", "save_tiny_checkpoint"]

SEED = 0
MAX_POSITIONS = 128
BPE_VOCAB_SIZE = 512
SP_MARKER = "▁"


@dataclass(frozen=True)
class ZooModel:
    """What a test needs to know about a saved checkpoint without loading it."""

    path: Path
    kind: str
    architecture: str  # the model class name
    eos_token_ids: tuple[int, ...]  # every id that should end a generation
    word_start_marker: str | None  # "▁" for SentencePiece-style vocabularies, else None
    pad_token_id: int | None  # the tokenizer's pad token, None when it has none
    vocab_size: int  # config.vocab_size: rows of the embedding matrix / logits width
    tokenizer_size: int  # len(tokenizer); < vocab_size for padded embeddings
    dtype: str  # dtype the weights are saved in ("float32" or "bfloat16")


# ---------------------------------------------------------------------------- corpus

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the old man", "a small bird",
             "the driver", "her brother", "the company", "this phone", "the film", "my sister", "the kids"]
_VERBS = ["likes", "sees", "finds", "wants", "makes", "takes", "reads", "loves", "needs", "buys", "opens",
          "watches", "keeps", "brings"]
_ADJECTIVES = ["good", "new", "red", "big", "quiet", "happy", "cold", "bright", "long", "simple", "great",
               "small", "strange", "warm"]
_NOUNS = ["book", "house", "car", "song", "garden", "window", "letter", "story", "table", "river", "world",
          "battery", "screen", "movie"]
_GREETINGS = ["hello world", "hello there", "hello again", "hello my friend", "good morning world"]


def corpus(n: int = 400, seed: int = SEED) -> list[str]:
    """``n`` short English sentences (deterministic), with "hello world" frequent."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 5 == 0:
            text = f"{rng.choice(_GREETINGS)}, {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} it."
        else:
            text = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} "
                    f"{rng.choice(_NOUNS)}{rng.choice(['.', '!', '?', ' today.', ' again.'])}")
        texts.append(text[0].upper() + text[1:] if i % 2 else text)
    return texts


# ---------------------------------------------------------------------------- tokenizers


def _trained_bpe(
    pre_tokenizer, *, byte_level: bool, normalizer=None, reserved: int = 0
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a BPE trained on the corpus; ids start at ``reserved``.

    Byte-level vocabularies get the 256 byte symbols as alphabet (any text encodes);
    the others only the corpus's characters (byte-fallback pieces cover the rest).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.normalizer = normalizer
    core.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE - reserved,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        show_progress=False,
    )
    core.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(core.to_str())["model"]
    vocab = {token: reserved + i for token, i in model["vocab"].items()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def _byte_fallback_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def _sentencepiece_bpe(specials: list[str], prepend_scheme: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """SentencePiece-like vocab: specials, 256 byte-fallback pieces, then ``▁``-marked BPE pieces."""
    from tokenizers import pre_tokenizers

    head = specials + _byte_fallback_tokens()
    # split=True while training so that no merge crosses a word boundary (as SentencePiece),
    # which makes the merges valid for the unsplit pipelines the transformers classes build.
    vocab, merges = _trained_bpe(
        pre_tokenizers.Metaspace(replacement=SP_MARKER, prepend_scheme=prepend_scheme, split=True),
        byte_level=False,
        reserved=len(head),
    )
    return {**{t: i for i, t in enumerate(head)}, **vocab}, merges


def _gpt2_tokenizer(eos: str, pad: str | None):
    """A byte-level BPE in ``GPT2Tokenizer`` (GPT-2, Granite); ``eos`` (also bos/unk) has id 0."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    vocab, merges = _trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), byte_level=True, reserved=1)
    vocab = {eos: 0, **vocab}
    return GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=eos, bos_token=eos, eos_token=eos, pad_token=pad)


def _qwen2_tokenizer():
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab, merges = _trained_bpe(
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
        byte_level=True,
        normalizer=normalizers.NFC(),
    )
    n = len(vocab)  # special tokens after the BPE pieces, as in Qwen's vocabulary
    vocab.update({"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2})
    return Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def _llama_sp_tokenizer():
    from transformers import LlamaTokenizer

    vocab, merges = _sentencepiece_bpe(["<unk>", "<s>", "</s>"], prepend_scheme="first")
    return LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                          legacy=False, add_prefix_space=True, add_bos_token=True)


def _gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab, merges = _sentencepiece_bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], prepend_scheme="never")
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _llama3_tokenizer():
    """Llama-3 style: a plain ``PreTrainedTokenizerFast`` whose post-processor adds BOS."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    vocab, merges = _trained_bpe(pre, byte_level=True)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    core.pre_tokenizer = pre
    core.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos_id = core.token_to_id("<|begin_of_text|>")
    core.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        ),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


# ---------------------------------------------------------------------------- models

_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=MAX_POSITIONS)


def _build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer("<|endoftext|>", pad=None)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_POSITIONS, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    return GPT2LMHeadModel(config), tokenizer, (eos,), None


def _build_llama_sp():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _llama_sp_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None, tie_word_embeddings=False, **_SMALL)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    return model, tokenizer, (tokenizer.eos_token_id,), SP_MARKER


def _build_qwen2_padded():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _qwen2_tokenizer()
    padded = math.ceil(len(tokenizer) / 64) * 64 + 64
    config = Qwen2Config(vocab_size=padded, num_key_value_heads=1, bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True, use_sliding_window=False, **_SMALL)
    return Qwen2ForCausalLM(config), tokenizer, (tokenizer.eos_token_id,), None


SOFTCAP = 5.0


def _build_gemma2_softcap():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = _gemma_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                          final_logit_softcapping=SOFTCAP, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **_SMALL)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():  # tied embeddings with unit scale: raw logits reach ~15, so the cap of 5 bites
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model, tokenizer, (tokenizer.eos_token_id,), SP_MARKER


LOGITS_SCALING = 4.0


def _build_granite_scaling():
    from transformers import GraniteConfig, GraniteForCausalLM

    tokenizer = _gpt2_tokenizer("<|end_of_text|>", pad="<|end_of_text|>")
    eos = tokenizer.eos_token_id
    config = GraniteConfig(vocab_size=len(tokenizer), num_key_value_heads=1, logits_scaling=LOGITS_SCALING,
                           embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1 / 16,
                           bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True, **_SMALL)
    return GraniteForCausalLM(config), tokenizer, (eos,), None


def _build_multi_eos():
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _llama3_tokenizer()
    eos_ids = [tokenizer.convert_tokens_to_ids("<|end_of_text|>"), tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=eos_ids, pad_token_id=None, tie_word_embeddings=True, **_SMALL)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids)
    return model, tokenizer, tuple(eos_ids), None


_BUILDERS = {
    "gpt2": _build_gpt2,
    "llama-sp": _build_llama_sp,
    "qwen2-padded": _build_qwen2_padded,
    "gemma2-softcap": _build_gemma2_softcap,
    "granite-scaling": _build_granite_scaling,
    "multi-eos": _build_multi_eos,
}
KINDS: tuple[str, ...] = tuple(_BUILDERS)


def save_tiny_checkpoint(kind: str, folder: Path) -> ZooModel:
    """Build the tiny ``kind`` checkpoint (seeded) and save model + tokenizer into ``folder``."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, tokenizer, eos_ids, marker = _BUILDERS[kind]()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ZooModel(
        path=folder,
        kind=kind,
        architecture=type(model).__name__,
        eos_token_ids=tuple(int(i) for i in eos_ids),
        word_start_marker=marker,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=model.config.vocab_size,
        tokenizer_size=len(tokenizer),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_chat_checkpoint(folder: Path) -> ZooModel:
    """A tiny Qwen2-style instruct checkpoint with a ChatML chat template whose end of turn,
    ``<|im_end|>``, is *not* the tokenizer's EOS nor in the generation config (EOS is
    ``<|endoftext|>``): a task must find the turn's end from the template itself."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tokenizer = _qwen2_tokenizer()
        tokenizer.eos_token = "<|endoftext|>"
        tokenizer.chat_template = CHATML_TEMPLATE
        config = Qwen2Config(vocab_size=len(tokenizer), num_key_value_heads=1, bos_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             tie_word_embeddings=True, use_sliding_window=False, **_SMALL)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ZooModel(path=folder, kind="chatml", architecture=type(model).__name__,
                    eos_token_ids=(tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")),
                    word_start_marker=None, pad_token_id=tokenizer.pad_token_id, vocab_size=config.vocab_size,
                    tokenizer_size=len(tokenizer), dtype="float32")


def save_tiny_lm(kind: str, folder: str | Path, vocab_size: int = 64, seed: int = 0) -> str:
    """A 2-layer random GPT-2 (learned positions) or Llama (rotary, grouped-query attention) of
    ``vocab_size`` tokens and no tokenizer, saved to ``folder`` (the unit tests' smallest models)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    return str(folder)
