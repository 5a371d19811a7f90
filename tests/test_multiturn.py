"""Multi-turn environments (``textenv.multiturn``): the token-level protocol, no
re-tokenisation, budgets, the reference's view of env tokens, and the fast path
against SB3's stock path on a multi-turn rollout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents import make_agent
from textenv.lm.models import load_causal_lm, load_tokenizer
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


class SeededGame(CountingGame):
    """``CountingGame`` whose first message names the seed it was reset with (so a test
    sees which game an episode plays) and whose turns depend on it (2 or 3)."""

    def reset(self, seed=None):
        self.received, self.turns = [], 2 + seed % 2
        return f"Game {seed % 1000}.", {}


COUNTING_ID, SEEDED_ID = "test/Counting-v0", "test/Seeded-v0"
COUNTING_SETTINGS = dict(model="default", max_prompt_len=8, max_turn_tokens=3, max_turns=3, max_episode_tokens=30,
                         reply_template="\n{reply}\n", device="cpu")


@pytest.fixture(scope="module")
def counting_ids():
    import gymnasium as gym

    from textenv.multiturn import register_multi_turn_task

    for env_id, game in ((COUNTING_ID, CountingGame), (SEEDED_ID, SeededGame)):
        if env_id not in gym.registry:
            register_multi_turn_task(env_id, turn_env=game, **COUNTING_SETTINGS)
    return COUNTING_ID, SEEDED_ID


def play_random_turns(env, n_steps: int, seed: int = 0):
    """Steps with random tokens (a fifth of them EOS, so turns end at all lengths); yields
    each step's actions and results."""
    rng = np.random.default_rng(seed)
    eos = load_tokenizer("default").eos_token_id
    for _ in range(n_steps):
        actions = rng.integers(5, 800, env.num_envs)
        actions[rng.random(env.num_envs) < 0.2] = eos
        yield actions, env.step(actions)


def test_the_batched_env_plays_step_for_step_as_the_single_envs(default_model_path, counting_ids):
    """``BatchedMultiTurnVecEnv`` (one forward of the reference per step, replies encoded
    into the slots as chunks) against SB3's ``DummyVecEnv`` of ``MultiTurnTextEnv``s with
    ``Monitor``: same observations, rewards, dones and infos, the reference's log-probs
    within float noise; with scoring deferred, one teacher-forced pass over the final
    states gives those log-probs too."""
    from agents import make_text_vec_env
    from textenv.multiturn_vector import BatchedMultiTurnVecEnv

    batched = make_text_vec_env(SEEDED_ID, n_envs=3, seed=3)
    single = make_text_vec_env(SEEDED_ID, n_envs=3, seed=3, batched=False)
    assert isinstance(batched, BatchedMultiTurnVecEnv)
    observations = batched.reset()
    for key, value in single.reset().items():
        np.testing.assert_array_equal(observations[key], value)
    inserted, ended, states = 0, 0, []
    for (actions, (obs, rewards, dones, infos)), (_, (obs_1, rewards_1, dones_1, infos_1)) in zip(
            play_random_turns(batched, 40), play_random_turns(single, 40)):
        for key in obs:
            np.testing.assert_array_equal(obs[key], obs_1[key])
        np.testing.assert_array_equal(rewards, rewards_1)
        np.testing.assert_array_equal(dones, dones_1)
        for env, (info, info_1) in enumerate(zip(infos, infos_1)):
            assert info["ref_logprob"] == pytest.approx(info_1["ref_logprob"], abs=1e-5)
            for key in ("turn", "reply", "task_score", "success", "turns", "completion", "budget_exhausted"):
                assert info.get(key) == info_1.get(key), key
            if dones[env]:
                assert info["episode"]["r"] == info_1["episode"]["r"] and info["episode"]["l"] == info_1["episode"]["l"]
                for key in ("input_ids", "attention_mask"):
                    np.testing.assert_array_equal(info["terminal_observation"][key],
                                                  info_1["terminal_observation"][key])
            # The state the action was taken in, its log-prob and the action (for the deferred check).
            states.append((observations["input_ids"][env], observations["attention_mask"][env], info["ref_logprob"],
                           actions[env]))
            inserted += int("reply" in info and not dones[env])
        ended += int(dones.sum())
        observations = obs
    assert inserted >= 5 and ended >= 3  # replies were inserted into running episodes, episodes restarted

    # Deferred scoring: the per-step log-probs again, from one teacher-forced pass over the states.
    ids = torch.as_tensor(np.stack([state[0] for state in states]))
    mask = torch.as_tensor(np.stack([state[1] for state in states]))
    state_columns = (mask * torch.arange(mask.shape[1])).argmax(-1)
    scored = batched.reference_log_probs(ids, mask, torch.arange(len(states)), state_columns,
                                         torch.as_tensor([int(state[3]) for state in states]))
    np.testing.assert_allclose(scored.numpy(), [state[2] for state in states], atol=1e-5)


def test_a_multi_turn_id_trains_on_the_fast_path_and_equals_the_stock_path(default_model_path, counting_ids):
    """The fast path (the batched multi-turn env, scoring the reference after the rollout;
    the policy's KV slots extended by each reply) and SB3's stock path (``DummyVecEnv``,
    a full forward per step) collect the same multi-turn rollout: same states, log-probs,
    values, rewards, advantages, then the same update (the check of tests/test_fast_path.py).
    The reply tokens are in the states but are no step of the rollout: the loss and the KL
    see the agent's tokens only."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents import make_text_vec_env
    from test_fast_path import (assert_same_rollout, collect_the_same_rollout, make_paired_agents,
                                update_on_the_same_minibatches)
    from textenv.multiturn_vector import BatchedMultiTurnVecEnv

    n_envs, n_steps = 2, 14
    hyper = dict(n_steps=n_steps, seed=0, kl_coef=0.2, learning_rate=0.1, batch_size=n_steps * n_envs, n_epochs=1,
                 policy_kwargs=dict(model_name_or_path="default", optimizer_class=torch.optim.SGD))
    stock_env = make_vec_env(COUNTING_ID, n_envs=n_envs, seed=3, vec_env_cls=DummyVecEnv,
                             env_kwargs={"render_mode": "ansi"})
    fast, stock = make_paired_agents("ppo", make_text_vec_env(COUNTING_ID, n_envs=n_envs, seed=3), stock_env, **hyper)
    assert isinstance(fast.env, BatchedMultiTurnVecEnv) and fast.deferred_reference
    stock_states, fast_states = collect_the_same_rollout(fast, stock)
    # Env replies were inserted during the rollout (states grew by more than one token).
    lengths = [int(state["attention_mask"][0].sum()) for state in stock_states]
    assert any(b - a > 1 for a, b in zip(lengths, lengths[1:]))
    assert_same_rollout(fast, stock, stock_states, fast_states)
    buffer = fast.rollout_buffer

    # The steps of each segment are the agent's tokens, and nothing else: the column after
    # each state holds its action; every other real column after the prompt is a reply token.
    tokenizer = load_tokenizer("default")
    samples = buffer.segment_samples(np.arange(len(buffer.segment_spans)))
    observations = samples.observations
    action_columns = observations.token_columns + 1
    assert torch.equal(observations.input_ids[observations.token_rows, action_columns], samples.actions.long()[:, 0])
    reply_tokens = 0
    for row in range(len(buffer.segment_spans)):
        real = observations.attention_mask[row].nonzero()[:, 0]
        agent = set(action_columns[observations.token_rows == row].tolist())
        others = [c for c in real.tolist() if c >= COUNTING_SETTINGS["max_prompt_len"] and c not in agent]
        reply_tokens += len(others)
        replies = tokenizer.decode(observations.input_ids[row, others])  # the game's "ok 1", "ok 2", ...
        assert replies == "".join(f"\nok {turn}\n" for turn in range(1, replies.count("ok") + 1))
    assert reply_tokens > 0 and len(samples.actions) == n_steps * n_envs

    update_on_the_same_minibatches(fast, stock)
    for a, b in zip(fast.policy.parameters(), stock.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_groups_play_the_same_game_and_rloo_trains_on_them(default_model_path, counting_ids):
    """Group mode of the batched multi-turn env: the k episodes of a group reset their
    turn-level envs with the same seed (the same game), finished ones wait frozen; RLOO's
    rollout is one whole dialogue per slot, and its update moves the policy."""
    from agents import make_text_vec_env

    env = make_text_vec_env(SEEDED_ID, n_envs=4, seed=0)
    agent = make_agent("rloo", env, group_size=2, seed=0, policy_kwargs=dict(model_name_or_path="default"))
    before = [p.detach().clone() for p in agent.policy.parameters()]
    agent.learn(2 * env.num_envs * env.max_new_tokens)
    first_messages = [conversation.first_message for conversation in env.conversations]  # the last rollout's games
    assert first_messages[0] == first_messages[1] and first_messages[2] == first_messages[3]
    assert first_messages[0] != first_messages[2]
    buffer = agent.rollout_buffer
    assert len(buffer.segment_spans) == env.num_envs  # one whole dialogue per slot
    assert min(conversation.turns for conversation in env.conversations) >= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))


def test_a_saved_state_continues_the_dialogues_exactly(default_model_path, counting_ids):
    """``get_state``/``set_state`` (what a checkpoint keeps) carry each dialogue and its
    turn-level env: a fresh env restored from them goes on as the original does."""
    import pickle

    from agents import make_text_vec_env

    env = make_text_vec_env(SEEDED_ID, n_envs=3, seed=1)
    env.reset()
    for _ in play_random_turns(env, 7, seed=1):
        pass
    state = pickle.loads(pickle.dumps(env.get_state()))  # a checkpoint pickles it
    restored = make_text_vec_env(SEEDED_ID, n_envs=3, seed=99)
    restored.set_state(state)
    for (_, (obs, rewards, dones, infos)), (_, (obs_1, rewards_1, dones_1, infos_1)) in zip(
            play_random_turns(env, 20, seed=2), play_random_turns(restored, 20, seed=2)):
        for key in obs:
            np.testing.assert_array_equal(obs[key], obs_1[key])
        np.testing.assert_array_equal(rewards, rewards_1)
        np.testing.assert_array_equal(dones, dones_1)
        assert [info.get("reply") for info in infos] == [info.get("reply") for info in infos_1]
        assert [info["ref_logprob"] for info in infos] == pytest.approx([info["ref_logprob"] for info in infos_1],
                                                                       abs=1e-5)


def test_the_batched_env_needs_a_turn_env_per_episode(default_model_path):
    from textenv.multiturn_vector import BatchedMultiTurnVecEnv

    with pytest.raises(ValueError, match="pass a factory"):
        BatchedMultiTurnVecEnv(2, turn_env=CountingGame(), **COUNTING_SETTINGS)
    assert BatchedMultiTurnVecEnv(1, turn_env=CountingGame(), **COUNTING_SETTINGS).num_envs == 1


@pytest.mark.slow
def test_ppo_learns_to_use_the_replies_in_guess_the_number(tmp_path, default_model_path):
    """The built-in game from its random-play SFT model: PPO raises the success rate and
    lowers the turns per episode (the README's Multi-turn command)."""
    from agents.training_run import train_and_evaluate

    run = train_and_evaluate("textenv/GuessTheNumber-v0", "ppo", 98_304, seed=0, eval_episodes=128,
                             tensorboard_log=str(tmp_path / "tb"), save_path=str(tmp_path / "agent.zip"),
                             device="cpu", kl_coef=0.02, kl_target=None, learning_rate=3e-4, gamma=0.97)
    before, after = run.before, run.after
    assert 0.2 < before.success_rate < 0.45  # random play: about a third
    assert after.success_rate > before.success_rate + 0.25  # measured: 0.33 -> 0.87
    assert after.turns < before.turns - 0.1  # measured: 3.30 -> 2.95 (binary search: 2.9)
    assert "[agent]" in after.samples[0][1] and "[env]" in after.samples[0][1]  # whole dialogues


class Wordy:
    """A game that talks like GEM's and TextArena's: long instructions, long replies."""

    repeats = 3

    def reset(self, seed=None):
        self.turns = 0
        return "Instructions: " + "guess the hidden word, one letter at a time. " * (self.repeats + (seed or 0) % 2), {}

    def step(self, text):
        self.turns += 1
        return "Board: " + "_ " * 20 + f"(turn {self.turns})", 0.0, self.turns >= 3, False, {}


def test_a_games_lengths_are_sized_from_its_own_messages(default_model_path):
    """``max_prompt_len="auto"``, ``max_episode_tokens="auto"`` (the games' registrations'
    default): the probe's longest first message and reply, with room to spare, so that every
    game of the probe fits; a model whose context is too short is refused with the sizes."""
    from textenv.multiturn import SIZING_MARGIN, size_dialogue

    tokenizer = load_tokenizer("default")
    settings = dict(model="default", max_prompt_len="auto", max_episode_tokens="auto", max_turn_tokens=4,
                    max_turns=3, reply_template="\n{reply}\n", device="cpu")
    sized = size_dialogue(Wordy, settings)
    longest_first = max(len(encode(tokenizer, Wordy().reset(seed=s)[0])) for s in range(4))
    game = Wordy()
    game.reset(seed=0)
    longest_reply = len(encode(tokenizer, "\n" + game.step("1")[0] + "\n"))
    assert longest_first <= sized["max_prompt_len"] <= longest_first * SIZING_MARGIN + 8
    assert sized["max_episode_tokens"] >= 3 * 4 + 2 * longest_reply
    with pytest.raises(ValueError, match=r"sized from 4 games: first messages up to \d+ tokens.*exceeds the "
                                         r"model's context of 128 tokens.*longer context"):
        MultiTurnTextEnv(Wordy, **settings)
    class Brief(Wordy):
        repeats = 1

    fitting = MultiTurnTextEnv(Brief, **{**settings, "max_turns": 1})  # one turn: no reply to hold
    fitting.reset(seed=1)  # the longer of its first messages fits
    assert fitting.task.max_prompt_len == size_dialogue(Brief, {**settings, "max_turns": 1})["max_prompt_len"]
    assert size_dialogue(Wordy, {**settings, "max_prompt_len": 40, "max_episode_tokens": 50})["max_prompt_len"] == 40


class Quiz:
    """A dialogue over a data set: the record's question first; a turn that says the record's
    answer scores 1 and ends the episode, else "Try again." (three tries)."""

    def reset(self, seed=None, record=None):
        self.record, self.tries = record, 0
        return record["prompt"], {}

    def step(self, text):
        self.tries += 1
        right = text.strip() == self.record["answer"]
        return "Try again.", float(right), right or self.tries >= 3, False, {"success": right}


QUIZ_RECORDS = [{"prompt": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(6)]


@pytest.mark.parametrize("batched", [False, True])
def test_a_dialogue_over_records_hands_each_episode_its_record(default_model_path, batched):
    """``prompts=`` records on a multi-turn task: each episode's turn-level env gets its record
    (its question is the first message, its answer judges the turns), the batched env draws
    them as the single env does, groups share one, and a saved state keeps them."""
    from agents import make_text_vec_env
    from textenv.multiturn import register_multi_turn_task

    import gymnasium as gym

    if "test/Quiz-v0" not in gym.registry:
        register_multi_turn_task("test/Quiz-v0", turn_env=Quiz, prompts=QUIZ_RECORDS, model="default", max_prompt_len=16,
                                 max_turn_tokens=3, max_turns=3, max_episode_tokens=30, reply_template="\n{reply}\n",
                                 device="cpu")
    env = make_text_vec_env("test/Quiz-v0", n_envs=4, seed=3, batched=batched)
    singles = make_text_vec_env("test/Quiz-v0", n_envs=4, seed=3, batched=False)
    obs, expected = env.reset(), singles.reset()
    np.testing.assert_array_equal(obs["input_ids"], expected["input_ids"])  # the same records, drawn alike
    tokenizer = load_tokenizer("default")
    questions = [tokenizer.decode(row[mask == 1]) for row, mask in zip(obs["input_ids"], obs["attention_mask"])]
    assert all(q.strip().startswith("What is") for q in questions)
    index = [int(q.split()[2]) for q in questions]
    answer = [encode(tokenizer, str(i + 1)) for i in index]  # each episode says its own answer, then EOS
    eos = tokenizer.eos_token_id
    rewards = np.zeros(env.num_envs)
    for step in range(max(len(a) for a in answer) + 1):
        actions = np.array([a[step] if step < len(a) else eos for a in answer])
        _, step_rewards, dones, infos = env.step(actions)
        rewards += step_rewards
    assert rewards.tolist() == [1.0] * env.num_envs  # every episode was judged by its own record's answer
    if batched:
        env.configure_episodes(group_size=2, autoreset=False)
        env.reset()
        assert env._record_index[0] == env._record_index[1] and env._record_index[2] == env._record_index[3]
        state = env.get_state()
        other = make_text_vec_env("test/Quiz-v0", n_envs=4, seed=9)
        other.set_state(state)
        assert other._record_index.tolist() == env._record_index.tolist()


def test_records_need_a_turn_env_that_takes_them(default_model_path):
    with pytest.raises(TypeError, match=r"takes no record=.*Fix"):
        MultiTurnTextEnv(CountingGame, prompts=QUIZ_RECORDS, **COUNTING_SETTINGS)
