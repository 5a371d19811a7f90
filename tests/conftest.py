"""Shared fixtures: the embedded default model, tiny models saved locally, quiet logs.

Nothing here downloads: models are the project's default (built once into the
cache) or tiny ones built from configs into a temporary folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*render_mode.*")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each. Two 2-thread processes spin against
    # each other and run many times slower than one.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from textenv.training.default_model import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def default_tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def save_tiny_gpt2(folder: Path, tokenizer, vocab_size: int | None = None, seed: int = 0) -> Path:
    """A randomly initialised 1-layer GPT-2 saved with ``save_pretrained`` (plus tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size or len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, default_tokenizer) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), default_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_other_vocab_path(tmp_path_factory, default_tokenizer) -> Path:
    return save_tiny_gpt2(
        tmp_path_factory.mktemp("tiny-gpt2-other-vocab"), default_tokenizer, vocab_size=len(default_tokenizer) + 64
    )


PROMPTS = ["The film was", "This phone is", "I bought the charger last week. The battery"]


def assert_same_policy_outputs(agent, other, env, atol: float) -> None:
    """Values, log-probs and entropies of both agents' policies agree (``atol``) on the env's
    fresh observations and a few fixed actions, one per parallel episode."""
    from stable_baselines3.common.utils import obs_as_tensor

    obs = obs_as_tensor(env.reset(), "cpu")
    actions = torch.arange(3, 3 + env.num_envs)
    with torch.no_grad():
        for expected, got in zip(agent.policy.evaluate_actions(obs, actions), other.policy.evaluate_actions(obs, actions)):
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def collect_one_rollout(agent, callbacks=()):
    """One rollout into the agent's buffer, as ``learn`` would collect it (no update): the
    KL penalty as the agent applies it, then ``callbacks``."""
    _, callback = agent._setup_learn(10**6, callback=list(callbacks))
    callback.on_training_start(locals(), globals())
    assert agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps)
    return agent.rollout_buffer


from model_zoo import KINDS, ZooModel, save_tiny_checkpoint, save_tiny_lm  # noqa: E402  (tests/ is on sys.path, as for PROMPTS)


@pytest.fixture(scope="session", params=KINDS, ids=KINDS)
def zoo_model(request, tmp_path_factory) -> ZooModel:
    """A tiny random checkpoint of each architecture in ``model_zoo`` (one test per kind)."""
    return save_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_lm_path(request, tmp_path_factory) -> str:
    """A 2-layer random GPT-2 and Llama of 64 tokens (``model_zoo.save_tiny_lm``), one test each."""
    return save_tiny_lm(request.param, tmp_path_factory.mktemp(request.param))
