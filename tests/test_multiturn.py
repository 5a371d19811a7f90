"""Multi-turn environments (``textenv.multiturn``): the token-level protocol, no
re-tokenisation, budgets, the reference's view of env tokens, and the fast path
against SB3's stock path on a multi-turn rollout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents import make_agent
from textenv.models import load_causal_lm, load_tokenizer
from textenv.multiturn import MultiTurnTextEnv


class CountingGame:
    """A scripted turn-level env: replies "ok <turn number>", rewards 0.5 per turn, ends
    after ``turns`` turns; keeps what it received."""

    def __init__(self, turns: int = 3, reply: str = "ok", reward: float = 0.5):
        self.turns, self.reply, self.reward = turns, reply, reward
        self.received: list[str] = []

    def reset(self, seed=None):
        self.received = []
        return "Say something.", {}

    def step(self, action: str):
        self.received.append(action)
        done = len(self.received) >= self.turns
        return f"{self.reply} {len(self.received)}", self.reward, done, False, {"success": done}


def make_env(game=None, **kwargs) -> MultiTurnTextEnv:
    settings = dict(model="default", max_prompt_len=8, max_turn_tokens=3, max_turns=5, max_episode_tokens=40,
                    reply_template="\n{reply}\n", device="cpu")
    return MultiTurnTextEnv(game or CountingGame(), **{**settings, **kwargs})


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_turns_become_tokens_and_the_agents_ids_are_never_retokenised(default_model_path):
    tokenizer = load_tokenizer("default")
    game = CountingGame(turns=2)
    env = make_env(game)
    obs, info = env.reset(seed=0)
    prompt = encode(tokenizer, "Say something.")
    # Tokens a tokenizer would never produce for their text: "t", "h" one by one (BPE
    # encodes "th" as one token) and a lone space before them (" th" is one token too).
    h, i, space = encode(tokenizer, "t")[0], encode(tokenizer, "h")[0], encode(tokenizer, " ")[0]
    assert encode(tokenizer, "th") != [h, i] and encode(tokenizer, " th") != [space, h, i]
    eos = tokenizer.eos_token_id
    taken = [h, i, eos, space, h, i]  # turn 1 ends at EOS, turn 2 at max_turn_tokens=3
    expected, rewards = list(prompt), []
    for token in taken:
        obs, reward, terminated, truncated, info = env.step(token)
        rewards.append(reward)
        expected.append(token)
        if "reply" in info and not terminated:
            expected += encode(tokenizer, f"\n{info['reply']}\n")
    assert terminated and info["turns"] == 2 and info["success"] is True
    assert game.received == ["th", " th"]  # the turn's text, without the stop token
    # The state is prompt + agent tokens + env tokens, in order, the agent's exactly as taken.
    real = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    assert real == expected
    assert [int(obs["input_ids"][column]) for column in env.agent_columns] == taken
    assert obs["input_ids"][: 8 - len(prompt)].tolist() == [tokenizer.pad_token_id] * (8 - len(prompt))  # left-padded
    # Dense rewards: each turn's reward on its last agent token, 0 elsewhere.
    assert rewards == [0.0, 0.0, 0.5, 0.0, 0.0, 0.5]
    assert info["task_score"] == 1.0
    assert info["completion"] == "[agent] th [env] ok 1 [agent] th [env] ok 2"


def test_the_reference_reads_env_tokens_and_scores_every_agent_token(default_model_path):
    """``info["ref_logprob"]`` equals the reference's log-prob of the token after the whole
    prefix (prompt, earlier turns and the env's replies), by one full forward."""
    env = make_env(CountingGame(turns=3))
    obs, _ = env.reset(seed=0)
    reference = load_causal_lm("default")
    rng = np.random.default_rng(0)
    for _ in range(9):
        token = int(rng.integers(10, 800))
        prefix = obs["input_ids"][obs["attention_mask"] == 1].tolist()
        with torch.no_grad():
            expected = torch.log_softmax(reference(torch.tensor([prefix])).logits[0, -1].float(), -1)[token]
        obs, _, terminated, _, info = env.step(token)
        assert info["ref_logprob"] == pytest.approx(float(expected), abs=1e-4)
        if terminated:
            break


def test_budgets_end_turns_and_episodes_with_the_reason_said(default_model_path):
    tokenizer = load_tokenizer("default")
    token = encode(tokenizer, "x")[0]
    # Turn budget: 2 tokens per turn; turns budget: 2 turns (the game would go on).
    env = make_env(CountingGame(turns=10), max_turn_tokens=2, max_turns=2)
    env.reset(seed=0)
    infos = [env.step(token)[4] for _ in range(4)]
    assert [("turn" in info) for info in infos] == [False, True, False, True]
    assert infos[-1]["budget_exhausted"] is True and infos[-1]["turns"] == 2
    # Context: a reply that does not fit ends the episode.
    env = make_env(CountingGame(turns=10, reply="word " * 30), max_episode_tokens=20, max_turn_tokens=1)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(token)
    assert terminated and info["context_exhausted"] is True
    # A first message longer than the prompt's room is refused with the fix named.
    with pytest.raises(ValueError, match="raise max_prompt_len"):
        make_env(max_prompt_len=2).reset(seed=0)


def test_a_non_finite_turn_reward_is_refused_with_the_fix(default_model_path):
    env = make_env(CountingGame(reward=math.nan), max_turn_tokens=1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="non-finite reward"):
        env.step(5)


def test_a_multi_turn_id_trains_on_the_fast_path_and_equals_the_stock_path(default_model_path):
    """The fast path (KV-cached decoding, whose slots are refilled where the env inserted a
    reply) and SB3's stock path collect the same multi-turn rollout: same states, log-probs,
    values, rewards, advantages, then the same update (the check of tests/test_fast_path.py)."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    from conftest import collect_one_rollout
    from test_fast_path import RecordStates, ScriptedDictRolloutBuffer

    if "test/Counting-v0" not in gym.registry:
        from textenv.multiturn import register_multi_turn_task

        register_multi_turn_task("test/Counting-v0", turn_env=CountingGame, model="default", max_prompt_len=8,
                                 max_turn_tokens=3, max_turns=3, max_episode_tokens=30, reply_template="\n{reply}\n",
                                 device="cpu")
    n_envs, n_steps = 2, 14

    def env():
        return make_vec_env("test/Counting-v0", n_envs=n_envs, seed=3, vec_env_cls=DummyVecEnv,
                            env_kwargs={"render_mode": "ansi"})

    hyper = dict(n_steps=n_steps, seed=0, kl_coef=0.2, learning_rate=0.1, batch_size=n_steps * n_envs, n_epochs=1,
                 policy_kwargs=dict(model_name_or_path="default", optimizer_class=torch.optim.SGD))
    fast = make_agent("ppo", env(), fast=True, **hyper)
    stock = make_agent("ppo", env(), fast=False, rollout_buffer_class=ScriptedDictRolloutBuffer, **hyper)
    with torch.no_grad():
        torch.manual_seed(0)
        for parameter in fast.policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    stock.policy.load_state_dict(fast.policy.state_dict())

    stock_states = RecordStates()
    collect_one_rollout(stock, [stock_states])
    stock_buffer = stock.rollout_buffer
    replay = iter(torch.as_tensor(stock_buffer.actions[..., 0]).long())
    fast._sample_actions = lambda logits: next(replay)
    fast_states = RecordStates()
    collect_one_rollout(fast, [fast_states])
    buffer = fast.rollout_buffer
    # Env replies were inserted during the rollout (states grew by more than one token).
    lengths = [int(state["attention_mask"][0].sum()) for state in stock_states.states]
    assert any(b - a > 1 for a, b in zip(lengths, lengths[1:]))
    for stock_state, fast_state in zip(stock_states.states, fast_states.states):
        for key in stock_state:
            np.testing.assert_array_equal(fast_state[key], stock_state[key])
    for name in ("log_probs", "values", "rewards", "advantages", "returns"):
        np.testing.assert_allclose(getattr(buffer, name), getattr(stock_buffer, name), atol=1e-5, err_msg=name)

    np.random.seed(11)
    partitions = [[buffer.segment_token_indices(segments) for segments in buffer.minibatch_segments(None)]]
    stock_buffer.partitions = [list(epoch) for epoch in partitions]
    np.random.seed(11)
    fast.train()
    stock.train()
    for a, b in zip(fast.policy.parameters(), stock.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ppo_learns_to_use_the_replies_in_guess_the_number(tmp_path, default_model_path):
    """The built-in game from its random-play SFT model: PPO raises the success rate and
    lowers the turns per episode (the README's Multi-turn command)."""
    from agents.training_run import train_and_evaluate

    run = train_and_evaluate("textenv/GuessTheNumber-v0", "ppo", 49_152, seed=0, eval_episodes=128,
                             tensorboard_log=str(tmp_path / "tb"), save_path=str(tmp_path / "agent.zip"),
                             device="cpu", kl_coef=0.02, kl_target=None, learning_rate=3e-4)
    before, after = run.before, run.after
    assert 0.2 < before.success_rate < 0.45  # random play: about a third
    assert after.success_rate > before.success_rate + 0.15
    assert after.turns < before.turns
    assert "[agent]" in after.samples[0][1] and "[env]" in after.samples[0][1]  # whole dialogues
