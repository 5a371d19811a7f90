"""Supervised next-token training of a causal LM on plain texts.

Used to build the embedded default model, and meant as the one SFT loop of the
project. Each text is one training sequence ending with EOS, so the model also
learns when to stop (which gives the environment real early terminations).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class SFTResult:
    """Losses are mean next-token cross-entropy (nats per token)."""

    heldout_loss_before: float
    heldout_loss_after: float
    train_loss_last: float
    steps: int


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> list[list[int]]:
    """Token ids of each text followed by EOS, cut to ``max_length``."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(ids + ([eos] if eos is not None else []))[:max_length] for ids in encoded]


def _batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def next_token_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every real token given the ones before it (padding ignored)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel, sequences: list[list[int]], pad_id: int, batch_size: int = 64
) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids, mask = _batch(sequences[start : start + batch_size], pad_id)
        n_targets = int(mask[:, 1:].sum())
        total += float(next_token_loss(model, ids.to(device), mask.to(device))) * n_targets
        count += n_targets
    return total / max(count, 1)


def supervised_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: list[str],
    heldout_texts: list[str],
    steps: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
    description: str = "SFT",
) -> SFTResult:
    """AdamW with linear warm-up and cosine decay; returns held-out loss before and after."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    train = encode_texts(tokenizer, train_texts, max_length)
    heldout = encode_texts(tokenizer, heldout_texts, max_length)
    before = heldout_loss(model, heldout, pad_id)

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=description, disable=not progress)
    for _ in bar:
        ids, mask = _batch(rng.sample(train, min(batch_size, len(train))), pad_id)
        loss = next_token_loss(model, ids.to(device), mask.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    after = heldout_loss(model, heldout, pad_id)
    return SFTResult(before, after, loss_value, steps)
