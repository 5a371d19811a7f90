"""textenv: text generation as Gymnasium environments, scored by a reward and a KL to a reference.

Importing the package registers the generic id and the built-in tasks (``textenv.tasks``,
one module per task), and the names of the models the project builds itself
(``textenv.training.builtin_models``):

- ``textenv/TextGen-v0``: generic, your prompts, model and reward as ``gym.make`` arguments;
- ``textenv/PositiveSentiment-v0``: continue a review opening so the text reads positive (VADER);
- ``textenv/LearnedRewardSentiment-v0``: the same, scored by the reward model learned from
  the built-in preference pairs;
- ``textenv/Arithmetic-v0``: answer ``a+b=`` exactly;
- ``textenv/ShortPositive-v0``: say something short and positive, then stop;
- ``textenv/ChatSums-v0``: one-digit sums as chats for the real instruct checkpoint
  (SmolLM2-135M-Instruct), scored by the answer's last number;
- ``textenv/GuessTheNumber-v0``: a multi-turn game, find a number from 1 to 10 from
  "Higher."/"Lower." replies (``textenv.multiturn``; GEM's and TextArena's versions
  are ``gem/GuessTheNumber-v0-easy`` and ``textarena/GuessTheNumber-v0``).

``textenv.register_task`` registers your own; ``textenv.verifiers`` holds rule-based rewards
that check an ``answer`` field (exact, numeric, ``\\boxed{}``) or a format, and
``reward=[...]`` combines several rewards (``textenv.rewards.WeightedRewards``).
"""

from textenv.env import TextGenEnv
from textenv.registration import register_generic_env, register_task
from textenv.rewards import (
    CallableReward,
    RewardError,
    RewardModelReward,
    RewardSource,
    VaderSentimentReward,
    WeightedRewards,
    make_reward,
)
from textenv.verifiers import boxed_match, exact_match, numeric_match, numeric_match_within, regex_format
from textenv.tasks import register_builtin_tasks
from textenv.training.builtin_models import register_builtin_models

# The package's front door imports its rooms (tasks, training); nothing inside the
# package imports it back (tests/test_layering.py).
register_builtin_models()
register_generic_env()
register_builtin_tasks()

__all__ = [
    "TextGenEnv",
    "register_task",
    "RewardSource",
    "RewardError",
    "CallableReward",
    "VaderSentimentReward",
    "RewardModelReward",
    "WeightedRewards",
    "make_reward",
    "exact_match",
    "numeric_match",
    "numeric_match_within",
    "boxed_match",
    "regex_format",
]
