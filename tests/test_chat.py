"""Chat templates: a chat prompt is rendered once with the generation prompt, the episode
ends at the template's end of turn (listed nowhere else), the reward gets the assistant's
text, samples show the conversation; in a dialogue each reply is appended as a user turn."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from model_zoo import save_chat_checkpoint
from textenv.chat import ChatFormat
from textenv.lm.models import load_tokenizer

QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_chat_checkpoint(tmp_path_factory.mktemp("chatml"))


def chat_env(chat_model, log=None, **kwargs):
    def reward(prompts, completions, answer):
        if log is not None:
            log.extend(zip(prompts, completions, answer))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    settings = dict(prompts=[{"messages": QUESTION, "answer": "red"}], model=str(chat_model.path), reward=reward,
                    max_prompt_len=64, max_new_tokens=6, device="cpu")
    return gym.make("textenv/TextGen-v0", **{**settings, **kwargs})


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_chat_prompt_is_rendered_once_with_the_generation_prompt(chat_model):
    env = chat_env(chat_model, system_prompt="Be brief.")
    obs, info = env.reset(seed=0)
    tokenizer = load_tokenizer(str(chat_model.path))
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *QUESTION],
                                             add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    assert prompt == encode(tokenizer, rendered)
    assert info["prompt"] == "user: Name a colour."  # the conversation, never the raw template


def test_the_episode_ends_at_the_templates_end_of_turn_and_the_reward_gets_the_assistants_text(chat_model):
    tokenizer = load_tokenizer(str(chat_model.path))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tokenizer.eos_token_id  # listed neither as EOS nor in the generation config
    seen: list = []
    env = chat_env(chat_model, seen)
    assert env.unwrapped.task.eos_token_ids == {tokenizer.eos_token_id, end_of_turn}
    env.reset(seed=0)
    for token in encode(tokenizer, "red"):
        _, _, terminated, _, _ = env.step(token)
        assert not terminated
    _, reward, terminated, _, info = env.step(end_of_turn)
    assert terminated and not info["budget_exhausted"]
    assert info["completion"] == "red" and reward == 1.0
    assert seen == [(QUESTION, "red", "red")]  # the record's chat as the prompt, the answer beside it


@pytest.mark.parametrize("chat_template", [True, "auto"])
def test_string_prompts_become_user_turns_with_chat_template_true(chat_model, chat_template):
    env = chat_env(chat_model, prompts=[{"prompt": "Name a colour.", "answer": "red"}], chat_template=chat_template)
    obs, info = env.reset(seed=0)
    tokenizer = load_tokenizer(str(chat_model.path))
    assert obs["input_ids"][obs["attention_mask"] == 1].tolist() == encode(
        tokenizer, tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False))
    assert info["prompt"] == "Name a colour."


def test_chat_prompts_need_a_tokenizer_with_a_chat_template(default_model_path):
    with pytest.raises(ValueError, match="has no chat template.*Fix"):
        gym.make("textenv/TextGen-v0", prompts=[{"messages": QUESTION}], model="default", device="cpu")
    env = gym.make("textenv/TextGen-v0", prompts=["Hello"], model="default", chat_template="auto", device="cpu")
    assert env.unwrapped.task.chat is None  # "auto": plain text for a tokenizer without a template
    with pytest.raises(ValueError, match="system_prompt= opens a chat.*Fix"):
        gym.make("textenv/TextGen-v0", prompts=["Hello"], model="default", system_prompt="Be kind.", device="cpu")


class Echo:
    """Replies "ok <n>" to each turn; three turns."""

    def reset(self, seed=None):
        self.turns = 0
        return "Count with me.", {}

    def step(self, text):
        self.turns += 1
        return f"ok {self.turns}", 0.0, self.turns >= 3, False, {}


def test_in_a_dialogue_each_reply_is_appended_as_a_user_turn(chat_model):
    """The state is exactly the rendered first turn, then what the agent sampled, then what
    was appended: the rest of the template's closing of the agent's turn, the reply as a
    user turn and the next generation prompt. For ChatML (every turn rendered alike) that is
    the whole conversation rendered again, token for token."""
    from textenv.multiturn import MultiTurnTextEnv

    tokenizer = load_tokenizer(str(chat_model.path))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    env = MultiTurnTextEnv(Echo, model=str(chat_model.path), max_prompt_len=48, max_turn_tokens=4, max_turns=3,
                           max_episode_tokens=80, chat_template=True, device="cpu")
    obs, _ = env.reset(seed=0)
    first = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    second = encode(tokenizer, "a b c d e f")[:4]  # ends at the turn's token budget, without the end of turn
    turns = [encode(tokenizer, "red") + [end_of_turn], second]
    sampled = []
    for turn in turns:
        for token in turn:
            obs, _, done, _, info = env.step(token)
            sampled.append(token)
        assert not done
    state = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    chat = ChatFormat(tokenizer)
    appended = chat.user_turn_ids("ok 1", turn_closed=True) + chat.user_turn_ids("ok 2", turn_closed=False)
    assert state == first + turns[0] + chat.user_turn_ids("ok 1", True) + turns[1] + chat.user_turn_ids("ok 2", False)
    assert [state[c] for c in np.array(env.agent_columns) - (env.task.max_prompt_len - len(first))] == sampled
    conversation = [{"role": "user", "content": "Count with me."}, {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "ok 1"}, {"role": "assistant", "content": tokenizer.decode(second)},
                    {"role": "user", "content": "ok 2"}]
    assert state == encode(tokenizer, tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                                      tokenize=False))
    assert len(appended) > 0
