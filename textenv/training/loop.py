"""The one training loop of the models the project trains itself (SFT and reward models).

``textenv.training.sft`` and ``textenv.training.reward_model`` differ only in what
they pass in, so each keeps that explicit:

- ``batch_loss(rng)``: draw a minibatch with ``rng`` and return its loss
  (next-token cross-entropy; Bradley-Terry's ``-log sigmoid(r_chosen - r_rejected)``);
- ``evaluate()``: one number on held-out data (loss; pairwise accuracy);
- ``lr_factor(step)``: the learning-rate schedule (warm-up then cosine; linear decay).

Everything else is this loop's, the same for both: seeding (``torch`` and the
minibatch ``random.Random``), AdamW with weight decay 0.01, gradient-norm clipping
at 1, a progress bar with the last loss, the held-out number before and after, and
TensorBoard (``<tag>/train_loss`` and ``<tag>/learning_rate`` every step,
``<tag>/heldout_<metric>`` at step 0, every ``eval_interval`` steps and at the end).
The built-in models (``textenv.training.builtin_models``) are trained by it too, so
their builds are reproducible from the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from textenv.files import plain_modes

Item = TypeVar("Item")


@dataclass
class LoopResult:
    heldout_before: float
    heldout_after: float
    train_loss_last: float
    steps: int


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 5% of the steps (at least one), then cosine decay to 0."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def linear_decay(steps: int) -> Callable[[int], float]:
    """From the full learning rate down to 0 at ``steps``."""
    return lambda step: 1.0 - step / steps


def train_loop(
    model: torch.nn.Module,
    batch_loss: Callable[[random.Random], torch.Tensor],
    evaluate: Callable[[], float],
    *,
    steps: int,
    learning_rate: float,
    lr_factor: Callable[[int], float],
    seed: int = 0,
    progress: bool = True,
    description: str = "training",
    log_dir: str | Path | None = None,
    tag: str = "train",
    metric: str = "loss",
    eval_interval: int = 100,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
) -> LoopResult:
    """``steps`` optimizer steps of ``batch_loss``; ``evaluate()`` before and after (see module doc).

    ``evaluate`` may switch the model to eval mode: every step switches it back to
    training mode first. The model is left in eval mode.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    heldout_tag = f"{tag}/heldout_{metric}"
    before = evaluate()
    if writer:
        writer.add_scalar(heldout_tag, before, 0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_value = float("nan")
    bar = tqdm(range(1, steps + 1), desc=description, disable=not progress)
    for step in bar:
        model.train()
        loss = batch_loss(rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if writer:
            writer.add_scalar(f"{tag}/train_loss", loss_value, step)
            writer.add_scalar(f"{tag}/learning_rate", scheduler.get_last_lr()[0], step)
            if step % eval_interval == 0 and step < steps:
                writer.add_scalar(heldout_tag, evaluate(), step)
    model.eval()
    after = evaluate()
    if writer:
        writer.add_scalar(heldout_tag, after, steps)
        writer.close()
    return LoopResult(before, after, loss_value, steps)


def split_heldout(items: Sequence[Item], heldout_fraction: float, seed: int, noun: str) -> tuple[list[Item], list[Item]]:
    """``(train, heldout)``: the items shuffled by ``seed``, at least one held out, at least
    one left to train on (else a ``ValueError`` that names the fix)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_heldout = max(1, int(len(items) * heldout_fraction))
    if len(items) <= n_heldout:
        raise ValueError(f"Only {len(items)} {noun}: need more than the {n_heldout} held out. "
                         f"Fix: give more {noun}, or a smaller held-out fraction.")
    return items[n_heldout:], items[:n_heldout]


def save_model_and_tokenizer(model, tokenizer, output_dir: str | Path) -> None:
    """``save_pretrained`` both into ``output_dir``: the folder loads back by its path, its
    files with a plain write's modes (``textenv.files.plain_modes``; safetensors writes 0600)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with plain_modes(output_dir):
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
