"""Prompt records: a prompt and the fields that go with it (a reference answer, ...), read
from lists, files and data sets; the fields reach the reward aligned with the completions,
in the single env, the batched env and group mode; bad records are refused by number."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

from agents import evaluate_agent, make_agent, make_text_vec_env
from textenv.prompts import load_prompts

RECORDS = [{"prompt": f"Item {i} costs", "answer": str(i), "level": i % 3} for i in range(12)]
TASK = dict(model="default", max_prompt_len=16, max_new_tokens=3, device="cpu")


def answer_checking_reward(log: list):
    """A reward that sees each record's own answer: it scores 1 when the answer it gets is the
    number in its prompt (so a misaligned field scores 0), and logs what it saw."""

    def reward(prompts, completions, answer, level):
        log.extend(zip(prompts, answer, level))
        return [float(prompt.split()[1] == a) for prompt, a in zip(prompts, answer)]

    return reward


def run_random_episodes(env, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rewards = []
    for _ in range(steps):
        _, step_rewards, dones, infos = env.step(rng.integers(5, 500, env.num_envs))
        rewards += [r for r, done in zip(step_rewards, dones) if done]
    return rewards


def test_records_come_from_lists_files_and_data_sets(tmp_path):
    expected = load_prompts(RECORDS)
    assert expected.prompts[:2] == ["Item 0 costs", "Item 1 costs"]
    assert expected.fields == {"answer": [str(i) for i in range(12)], "level": [i % 3 for i in range(12)]}
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(RECORDS))
    (tmp_path / "r.csv").write_text("prompt,answer,level\n" + "".join(f"{r['prompt']},{r['answer']},{r['level']}\n"
                                                                     for r in RECORDS))
    for name in ("r.jsonl", "r.json"):
        assert load_prompts(tmp_path / name) == load_prompts(RECORDS).__class__(
            expected.prompts, expected.fields, str(tmp_path / name))
    from_csv = load_prompts(tmp_path / "r.csv")  # CSV values are strings
    assert from_csv.prompts == expected.prompts and from_csv.fields["level"] == [str(i % 3) for i in range(12)]
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(RECORDS)
    dataset.to_parquet(str(tmp_path / "r.parquet"))
    for spec in (dataset, tmp_path / "r.parquet"):
        loaded = load_prompts(spec)
        assert (loaded.prompts, loaded.fields) == (expected.prompts, expected.fields)
    chats = load_prompts([{"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}])
    assert chats.has_chat and chats.prompts[0] == [{"role": "user", "content": "2+2?"}]
    named = load_prompts([{"question": "2+2?", "answer": "4"}], prompt_field="question")
    assert (named.prompts, named.fields) == (["2+2?"], {"answer": ["4"]})


@pytest.mark.parametrize("records, match", [
    ([{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}], r"Record #1 .* has no 'prompt' field"),
    ([{"answer": "1"}], r"Record #0 .* has no prompt: no 'prompt', 'messages', 'text' field .* Fix"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answr": "2"}],
     r"Record #1 .* other fields than record #0 \(answer\): missing \['answer'\]; extra \['answr'\]\. Fix"),
    ([{"messages": [{"role": "user"}]}], r"neither a string nor a chat.*Fix"),
    ([{"prompt": "   ", "answer": "1"}], r"Prompt #0 .* is empty"),
    (["a", {"prompt": "b"}], r"Prompt #0 .* is a str; the others are records"),
])
def test_bad_records_are_refused_with_the_record_and_the_fix(records, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_prompts(records)


def test_a_reward_that_needs_a_field_the_records_lack_is_refused_before_the_model_loads(monkeypatch):
    import textenv.task

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    def reward(prompts, completions, answer):
        return [0.0] * len(prompts)

    with pytest.raises(ValueError, match=r"takes 'answer', which the prompts do not have .*Fix"):
        textenv.task.TextTask(["a b c"], reward=reward, **TASK)
    monkeypatch.setattr(textenv.task, "load_frozen_lm", no_model)
    with pytest.raises(ValueError, match=r"Record #1"):
        textenv.task.TextTask([{"prompt": "a"}, {"question": "b"}], reward=reward, **TASK)


@pytest.mark.parametrize("where", ["single", "batched", "group"])
def test_each_completion_is_scored_with_its_own_records_fields(default_model_path, where):
    seen: list = []
    kwargs = dict(prompts=RECORDS, reward=answer_checking_reward(seen), **TASK)
    if where == "single":
        env = gym.make("textenv/TextGen-v0", **kwargs)
        env.reset(seed=0)
        rewards, rng = [], np.random.default_rng(0)
        for _ in range(30):
            _, reward, terminated, _, info = env.step(int(rng.integers(5, 500)))
            if terminated:
                rewards.append(reward)
                env.reset()
    else:
        env = make_text_vec_env("textenv/TextGen-v0", n_envs=6, seed=0, env_kwargs=kwargs)
        if where == "group":
            env.configure_episodes(group_size=3, autoreset=False)
        env.reset()
        rewards = run_random_episodes(env, 3)
    assert len(rewards) >= 6 and all(r == 1.0 for r in rewards)  # every answer was its own prompt's
    assert {level for prompt, answer, level in seen} <= {0, 1, 2}
    assert all(level == int(answer) % 3 for _, answer, level in seen)
    if where == "group":  # the k episodes of a group share one record
        assert len({prompt for prompt, _, _ in seen[:3]}) == 1 and len({prompt for prompt, _, _ in seen[3:6]}) == 1


def test_two_argument_rewards_and_keyword_rewards_both_work(default_model_path):
    def two_arguments(prompts, completions):
        return [1.0] * len(prompts)

    def everything(prompts, completions, **fields):
        assert set(fields) == {"answer", "level"}
        return [2.0] * len(prompts)

    for reward, expected in ((two_arguments, 1.0), (everything, 2.0)):
        env = make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=0,
                                env_kwargs=dict(prompts=RECORDS, reward=reward, **TASK))
        env.reset()
        assert set(run_random_episodes(env, 3)) == {expected}


def test_records_train_evaluate_and_checkpoint(default_model_path, tmp_path):
    """An agent on a task of records: it learns, evaluates (samples show the prompt), and its
    env's state (the records' sampler) round-trips as a checkpoint keeps it."""
    seen: list = []
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=0,
                            env_kwargs=dict(prompts=RECORDS, reward=answer_checking_reward(seen), **TASK))
    agent = make_agent("rloo", env, group_size=2, seed=0, batch_size=8)
    agent.learn(24)
    result = evaluate_agent(agent, env, 4, seed=0)
    assert result.task_score == 1.0 and result.samples[0][0].startswith("Item ")
    state = env.get_state()
    other = make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=5,
                              env_kwargs=dict(prompts=RECORDS, reward=answer_checking_reward([]), **TASK))
    other.set_state(state)
    env.reset(), other.reset()
    assert env._prompt_index.tolist() == other._prompt_index.tolist()
