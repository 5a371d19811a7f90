"""Reward models learned from preference pairs (Bradley-Terry), and the built-in one.

The model scores ``prompt + continuation`` with one output ``r``; training
minimises ``-log sigmoid(r(chosen) - r(rejected))``. The result is saved with
``save_pretrained`` and is a reward source for ``textenv`` by its path.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.cache import cache_root, ensure_built
from textenv.preferences import PreferencePair, builtin_preference_pairs
from textenv.rewards import left_truncating

LEARNED_SENTIMENT_RM_VERSION = "v2"  # v2: score normalisation recorded in the config


@dataclass
class RewardModelResult:
    heldout_accuracy_before: float
    heldout_accuracy_after: float
    train_loss_last: float
    steps: int


def _scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
    return model(**batch).logits[:, 0].float()


@torch.no_grad()
def pairwise_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair],
    batch_size: int = 64, max_length: int = 128,
) -> float:
    """Fraction of pairs where the model scores the chosen text above the rejected one."""
    tokenizer = left_truncating(tokenizer)  # as the reward source scores: keep the completion
    model.eval()
    correct = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        chosen = _scores(model, tokenizer, [p.prompt + p.chosen for p in batch], max_length)
        rejected = _scores(model, tokenizer, [p.prompt + p.rejected for p in batch], max_length)
        correct += int((chosen > rejected).sum())
    return correct / len(pairs)


def train_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_pairs: list[PreferencePair],
    heldout_pairs: list[PreferencePair],
    steps: int = 400,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
    log_dir: str | Path | None = None,
    eval_interval: int = 100,
) -> RewardModelResult:
    """Bradley-Terry training with AdamW; held-out pairwise accuracy before and after."""
    from tqdm.auto import tqdm

    if model.config.num_labels != 1:
        raise ValueError(
            f"A reward model needs exactly one output, this one has {model.config.num_labels}. "
            "Fix: load it with num_labels=1."
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer = left_truncating(tokenizer)  # train on what the reward source will see
    torch.manual_seed(seed)
    rng = random.Random(seed)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    before = pairwise_accuracy(model, tokenizer, heldout_pairs, max_length=max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    loss_value = float("nan")
    bar = tqdm(range(1, steps + 1), desc="reward model", disable=not progress)
    for step in bar:
        model.train()
        batch = rng.sample(train_pairs, min(batch_size, len(train_pairs)))
        margin = _scores(model, tokenizer, [p.prompt + p.chosen for p in batch], max_length) - _scores(
            model, tokenizer, [p.prompt + p.rejected for p in batch], max_length
        )
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if writer:
            writer.add_scalar("reward_model/train_loss", loss_value, step)
            if step % eval_interval == 0 or step == steps:
                accuracy = pairwise_accuracy(model, tokenizer, heldout_pairs, max_length=max_length)
                writer.add_scalar("reward_model/heldout_accuracy", accuracy, step)
    model.eval()
    after = pairwise_accuracy(model, tokenizer, heldout_pairs, max_length=max_length)
    if writer:
        writer.close()
    record_score_normalization(model, tokenizer, train_pairs, max_length=max_length)
    return RewardModelResult(before, after, loss_value, steps)


@torch.no_grad()
def record_score_normalization(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair],
    max_length: int = 128, batch_size: int = 64,
) -> None:
    """Store the mean and std of the model's scores on its training texts in its config.

    Bradley-Terry fixes only score *differences*; their scale drifts with training
    (logits of +-8 are common). ``RewardModelReward`` standardises scores with these
    numbers, so RL sees rewards of unit scale whatever the reward model's training:
    large raw scores make the critic's loss swamp the policy's in a shared body.
    """
    texts = [p.prompt + c for p in pairs for c in (p.chosen, p.rejected)]
    scores = torch.cat([_scores(model, tokenizer, texts[i : i + batch_size], max_length)
                        for i in range(0, len(texts), batch_size)])
    model.config.reward_mean = float(scores.mean())
    model.config.reward_std = float(scores.std().clamp(min=1e-6))


def reward_model_from_causal_lm(name_or_path: str) -> PreTrainedModel:
    """A one-output sequence classifier whose body starts from a causal LM's weights."""
    from transformers import AutoModelForSequenceClassification

    from textenv.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return model


# -- the built-in learned sentiment reward model ------------------------------------------

N_TRAIN_PAIRS, N_HELDOUT_PAIRS = 3000, 500


def learned_sentiment_reward_model_dir() -> Path:
    return cache_root() / f"sentiment-rm-{LEARNED_SENTIMENT_RM_VERSION}"


def build_learned_sentiment_reward_model(folder: Path, progress: bool = True) -> RewardModelResult:
    """Trained on the built-in pairs, body initialised from the default LM."""
    from textenv.models import load_tokenizer

    pairs = builtin_preference_pairs(N_TRAIN_PAIRS + N_HELDOUT_PAIRS, seed=0)
    tokenizer = load_tokenizer("default")
    model = reward_model_from_causal_lm("default")
    model.config.pad_token_id = tokenizer.pad_token_id
    result = train_reward_model(model, tokenizer, pairs[:N_TRAIN_PAIRS], pairs[N_TRAIN_PAIRS:], steps=400, progress=progress)
    if progress:
        print(f"textenv: learned reward model held-out accuracy {result.heldout_accuracy_before:.3f} -> "
              f"{result.heldout_accuracy_after:.3f}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return result


def ensure_learned_sentiment_reward_model(progress: bool = True) -> Path:
    return ensure_built(
        learned_sentiment_reward_model_dir().name,
        lambda folder, show: build_learned_sentiment_reward_model(folder, show),
        "the learned sentiment reward model",
        progress,
    )
