"""Learning: SB3 algorithms for language models, the KL penalty, evaluation, the registry, saving."""

from agents.algorithms import LMA2C, LMNLPO, LMPPO, LMTRPO
from agents.group_methods import LMGRPO, LMRLOO
from agents.registry import ALGORITHMS, make_agent
from agents.saving import export_policy, load_agent
from agents.config import resolved_config
from agents.envs import make_text_vec_env, resolve_env
from agents.evaluation import EvaluationResult, evaluate_agent
from agents.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from agents.kl_penalty import KLPenaltyCallback

__all__ = [
    "ALGORITHMS",
    "LMPPO",
    "LMA2C",
    "LMTRPO",
    "LMRLOO",
    "LMGRPO",
    "LMNLPO",
    "make_agent",
    "load_agent",
    "export_policy",
    "make_text_vec_env",
    "resolve_env",
    "resolved_config",
    "evaluate_agent",
    "EvaluationResult",
    "KLPenaltyCallback",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
]
