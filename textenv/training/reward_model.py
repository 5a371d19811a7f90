"""Reward models learned from preference pairs (Bradley-Terry).

The model scores ``prompt + continuation`` with one output ``r``; training
minimises ``-log sigmoid(r(chosen) - r(rejected))``. The result is saved with
``save_pretrained`` and is a reward source for ``textenv`` by its path.
``textenv-train-reward-model`` runs it on a user's pairs (``train_and_save_reward_model``); the built-in
``"textenv:sentiment-reward-model"`` is built with it
(``textenv.training.builtin_models``). The optimisation loop is the one shared with
SFT (``textenv.training.loop``); this module owns the data and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.lm.models import load_tokenizer, quiet_loading, resolve_model_path
from textenv.rewards import left_truncating
from textenv.tasks.preferences import PreferencePair
from textenv.training.loop import linear_decay, save_model_and_tokenizer, split_heldout, train_loop


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
    """Bradley-Terry training with AdamW and a linearly decaying learning rate; held-out
    pairwise accuracy before and after. Then the score statistics are recorded in the
    model's config (``record_score_normalization``).

    With ``log_dir``, TensorBoard gets ``reward_model/train_loss``,
    ``reward_model/learning_rate`` and ``reward_model/heldout_accuracy``.
    """
    if model.config.num_labels != 1:
        raise ValueError(
            f"A reward model needs exactly one output, this one has {model.config.num_labels}. "
            "Fix: load it with num_labels=1."
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer = left_truncating(tokenizer)  # train on what the reward source will see

    def batch_loss(rng) -> torch.Tensor:
        batch = rng.sample(train_pairs, min(batch_size, len(train_pairs)))
        margin = _scores(model, tokenizer, [p.prompt + p.chosen for p in batch], max_length) - _scores(
            model, tokenizer, [p.prompt + p.rejected for p in batch], max_length
        )
        return -torch.nn.functional.logsigmoid(margin).mean()

    result = train_loop(
        model, batch_loss, lambda: pairwise_accuracy(model, tokenizer, heldout_pairs, max_length=max_length),
        steps=steps, learning_rate=learning_rate, lr_factor=linear_decay(steps), seed=seed,
        progress=progress, description="reward model", log_dir=log_dir, tag="reward_model", metric="accuracy",
        eval_interval=eval_interval,
    )
    record_score_normalization(model, tokenizer, train_pairs, max_length=max_length)
    return RewardModelResult(result.heldout_before, result.heldout_after, result.train_loss_last, steps)


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

    path = resolve_model_path(name_or_path)
    with quiet_loading():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)


def train_and_save_reward_model(
    model_name_or_path: str,
    output_dir: str | Path,
    pairs: list[PreferencePair],
    heldout_fraction: float = 0.15,
    seed: int = 0,
    gpt2_config: dict | None = None,
    **train_kwargs,
) -> dict:
    """Hold out a shuffled ``heldout_fraction`` of the pairs, train a reward model on the
    rest (``train_reward_model``'s keywords) and save it with its tokenizer to
    ``output_dir``. Returns a JSON-ready summary; ``textenv-train-reward-model`` and the
    RLHF pipeline both run this.

    The model's body starts from the causal LM ``model_name_or_path``; with
    ``gpt2_config`` (e.g. ``{"n_layer": 2, "n_embd": 64, "n_head": 2}``) it is instead a
    new small GPT-2 classifier, and only the tokenizer comes from ``model_name_or_path``.
    """
    train, heldout = split_heldout(pairs, heldout_fraction, seed, "preference pairs")
    tokenizer = load_tokenizer(model_name_or_path)
    if gpt2_config is not None:
        from transformers import GPT2Config, GPT2ForSequenceClassification

        config = GPT2Config(**{"vocab_size": len(tokenizer), **gpt2_config}, num_labels=1,
                            pad_token_id=tokenizer.pad_token_id)
        model = GPT2ForSequenceClassification(config)
    else:
        model = reward_model_from_causal_lm(model_name_or_path)
    result = train_reward_model(model, tokenizer, train, heldout, seed=seed, **train_kwargs)
    save_model_and_tokenizer(model, tokenizer, output_dir)
    return {
        "pairs": len(train),
        "heldout_pairs": len(heldout),
        "heldout_accuracy_before": round(result.heldout_accuracy_before, 4),
        "heldout_accuracy_after": round(result.heldout_accuracy_after, 4),
        "saved_to": str(output_dir),
    }
