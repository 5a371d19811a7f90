"""textenv: text generation as Gymnasium environments, scored by a reward and a KL to a reference.

Importing the package registers ``textenv/TextGen-v0`` and ``textenv/PositiveSentiment-v0``.
"""

from textenv.env import TextGenEnv
from textenv.registration import register_builtin_tasks, register_task
from textenv.rewards import (
    CallableReward,
    RewardError,
    RewardModelReward,
    RewardSource,
    VaderSentimentReward,
    make_reward,
)

register_builtin_tasks()

__all__ = [
    "TextGenEnv",
    "register_task",
    "RewardSource",
    "RewardError",
    "CallableReward",
    "VaderSentimentReward",
    "RewardModelReward",
    "make_reward",
]
