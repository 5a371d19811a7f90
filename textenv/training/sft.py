"""Supervised fine-tuning (SFT) of a causal LM: next-token loss on texts or prompt/completion pairs.

``textenv-sft`` runs it on a user's corpus (``fine_tune_and_save``), and the embedded default model and
the arithmetic model are built with it. Every example ends with EOS, so the model
also learns when to stop (which gives the environments real early terminations).
For prompt/completion pairs the loss covers only the completion (and its EOS).

This module owns the data and the loss; the optimisation loop is the one shared
with reward-model training (``textenv.training.loop``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.lm.models import load_causal_lm, load_tokenizer
from textenv.training.loop import save_model_and_tokenizer, split_heldout, train_loop, warmup_cosine


@dataclass(frozen=True)
class SFTExample:
    """``prompt`` is conditioned on (no loss); ``completion`` is learned. Plain text: prompt ``""``."""

    prompt: str
    completion: str


ExampleLike = Union[SFTExample, str]


@dataclass
class SFTResult:
    """Losses are mean next-token cross-entropy over learned tokens (nats per token)."""

    heldout_loss_before: float
    heldout_loss_after: float
    train_loss_last: float
    steps: int


def load_sft_examples(path: str | Path) -> list[SFTExample]:
    """A .txt file (one text per line) or .jsonl (``{"prompt", "completion"}`` or ``{"text"}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT corpus {str(path)!r} does not exist. Fix: pass a .txt or .jsonl file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [SFTExample("", line) for line in lines]
    examples = []
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        if "completion" in record:
            examples.append(SFTExample(record.get("prompt", ""), record["completion"]))
        elif "text" in record:
            examples.append(SFTExample("", record["text"]))
        else:
            raise ValueError(
                f"{path}:{number} needs 'prompt' and 'completion' fields, or a 'text' field. "
                'Fix: write lines like {"prompt": "2+2=", "completion": "4"}.'
            )
    return examples


def _as_examples(items: Sequence[ExampleLike]) -> list[SFTExample]:
    return [item if isinstance(item, SFTExample) else SFTExample("", item) for item in items]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[ExampleLike], max_length: int
) -> list[tuple[list[int], int]]:
    """``(token ids + EOS, index of the first learned token)`` per example, cut to ``max_length``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = []
    for example in _as_examples(examples):
        prompt = tokenizer(example.prompt)["input_ids"] if example.prompt else []
        completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        ids = (prompt + completion + eos)[:max_length]
        encoded.append((ids, max(len(prompt), 1)))
    return encoded


def _batch(sequences: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and targets (``-100`` where nothing is learned)."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    learned = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, first_learned) in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        learned[row, first_learned : len(seq)] = True
    targets = ids.masked_fill(~learned, -100)
    return ids, mask, targets


def next_token_loss(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of every learned token given the ones before it."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    shifted = targets[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel, sequences: list[tuple[list[int], int]], pad_id: int, batch_size: int = 64
) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids, mask, targets = _batch(sequences[start : start + batch_size], pad_id)
        n_targets = int((targets[:, 1:] != -100).sum())
        total += float(next_token_loss(model, ids.to(device), mask.to(device), targets.to(device))) * n_targets
        count += n_targets
    return total / max(count, 1)


def supervised_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[ExampleLike],
    heldout_examples: Sequence[ExampleLike],
    steps: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
    description: str = "SFT",
    log_dir: str | Path | None = None,
    eval_interval: int = 100,
) -> SFTResult:
    """AdamW with linear warm-up and cosine decay; held-out loss before, during and after.

    With ``log_dir``, TensorBoard gets ``sft/train_loss``, ``sft/learning_rate`` and
    ``sft/heldout_loss``.
    """
    if not train_examples or not heldout_examples:
        raise ValueError("SFT needs at least one training and one held-out example")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = encode_examples(tokenizer, train_examples, max_length)
    heldout = encode_examples(tokenizer, heldout_examples, max_length)

    def batch_loss(rng) -> torch.Tensor:
        ids, mask, targets = _batch(rng.sample(train, min(batch_size, len(train))), pad_id)
        return next_token_loss(model, ids.to(device), mask.to(device), targets.to(device))

    result = train_loop(
        model, batch_loss, lambda: heldout_loss(model, heldout, pad_id),
        steps=steps, learning_rate=learning_rate, lr_factor=warmup_cosine(steps), seed=seed,
        progress=progress, description=description, log_dir=log_dir, tag="sft", metric="loss",
        eval_interval=eval_interval,
    )
    return SFTResult(result.heldout_before, result.heldout_after, result.train_loss_last, steps)


def fine_tune_and_save(
    model_name_or_path: str,
    output_dir: str | Path,
    examples: Sequence[ExampleLike],
    heldout_fraction: float = 0.05,
    steps: int = 500,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    max_length: int = 64,
    seed: int = 0,
    **finetune_kwargs,
) -> dict:
    """Load a causal LM by name or path, hold out a shuffled ``heldout_fraction`` of the
    examples, fine-tune on the rest and save model and tokenizer to ``output_dir``.
    Returns a JSON-ready summary; ``textenv-sft`` and the RLHF pipeline both run this.

    The defaults suit an already trained checkpoint (a gentle ``learning_rate``);
    ``finetune_kwargs`` go to ``supervised_finetune`` (``progress``, ``log_dir``, ...)."""
    train, heldout = split_heldout(_as_examples(examples), heldout_fraction, seed, "examples")
    tokenizer = load_tokenizer(model_name_or_path)
    model = load_causal_lm(model_name_or_path)
    result = supervised_finetune(
        model, tokenizer, train, heldout, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, max_length=max_length, seed=seed, **finetune_kwargs,
    )
    save_model_and_tokenizer(model, tokenizer, output_dir)
    return {
        "examples": len(train),
        "heldout_examples": len(heldout),
        "heldout_loss_before": round(result.heldout_loss_before, 4),
        "heldout_loss_after": round(result.heldout_loss_after, 4),
        "saved_to": str(output_dir),
    }
