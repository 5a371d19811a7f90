"""Supervised fine-tuning (SFT) of a causal LM: next-token loss on texts or prompt/completion pairs.

The one SFT loop of the project: ``scripts/sft.py`` runs it on a user's corpus,
and the embedded default model and the arithmetic model are built with it.
Every example ends with EOS, so the model also learns when to stop (which gives
the environments real early terminations). For prompt/completion pairs the loss
covers only the completion (and its EOS).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    from tqdm.auto import tqdm

    if not train_examples or not heldout_examples:
        raise ValueError("SFT needs at least one training and one held-out example")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = encode_examples(tokenizer, train_examples, max_length)
    heldout = encode_examples(tokenizer, heldout_examples, max_length)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    before = heldout_loss(model, heldout, pad_id)
    if writer:
        writer.add_scalar("sft/heldout_loss", before, 0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_value = float("nan")
    bar = tqdm(range(1, steps + 1), desc=description, disable=not progress)
    for step in bar:
        model.train()
        ids, mask, targets = _batch(rng.sample(train, min(batch_size, len(train))), pad_id)
        loss = next_token_loss(model, ids.to(device), mask.to(device), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if writer:
            writer.add_scalar("sft/train_loss", loss_value, step)
            writer.add_scalar("sft/learning_rate", scheduler.get_last_lr()[0], step)
            if step % eval_interval == 0 and step < steps:
                writer.add_scalar("sft/heldout_loss", heldout_loss(model, heldout, pad_id), step)
    model.eval()
    after = heldout_loss(model, heldout, pad_id)
    if writer:
        writer.add_scalar("sft/heldout_loss", after, steps)
        writer.close()
    return SFTResult(before, after, loss_value, steps)
