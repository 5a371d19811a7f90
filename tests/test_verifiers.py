"""Built-in verifiers and several weighted rewards: hand-computed scores per verifier, the
weighted sum as the episode's reward with each component in its info, per-component checks
that name the component, and each component's mean logged per rollout."""

from __future__ import annotations

import inspect
import re

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.callbacks import BaseCallback

from agents import make_agent, make_text_vec_env
from textenv import RewardError, WeightedRewards, make_reward
from textenv.task import TextTask
from textenv.verifiers import (
    boxed_match,
    exact_match,
    last_boxed,
    normalize_answer,
    numeric_match,
    numeric_match_within,
    parse_number,
    regex_format,
)

TASK = dict(model="default", max_prompt_len=16, device="cpu")
THINK_ANSWER = r"^<think>.*</think>\s*<answer>.*</answer>$"


def scores(verifier, table):
    """The verifier's scores of a table of (completion, answer, expected) rows, in one batch."""
    completions = [row[0] for row in table]
    return verifier(["the prompt is not read"] * len(table), completions, answer=[row[1] for row in table])


def expected(table):
    return [row[2] for row in table]


EXACT = [
    ("Paris", "Paris", 1.0),
    ("paris", "PARIS", 1.0),
    ("  Paris \n", "Paris", 1.0),
    ("New   York\tCity", "new york city", 1.0),
    ('"Paris".', "Paris", 1.0),
    ("'Paris'", "paris", 1.0),
    ("\u201cParis\u201d!", "Paris", 1.0),
    ("**(B)**", "B", 1.0),
    ("The answer is Paris.", "Paris", 1.0),
    ("the answer is: 'Paris'", "Paris", 1.0),
    ("Answer: 42", "42", 1.0),
    ("The final answer is 42", 42, 1.0),  # a number as the answer
    ("Paris, France", "Paris", 0.0),  # the whole completion must be the answer
    ("Pariss", "Paris", 0.0),
    ("-3", "3", 0.0),  # a sign is not punctuation
    ("", "Paris", 0.0),
    ("", "", 0.0),  # an empty answer matches nothing
    ("Lyon", ["Paris", "Lyon"], 1.0),  # a list of acceptable answers
    ("Nice", ["Paris", "Lyon"], 0.0),
    ("None", None, 0.0),  # no answer matches nothing
]

NUMERIC = [
    ("2 + 2 = 4", "4", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("4, no, 5", "4", 0.0),  # the last number counts
    ("4, no, 5", "5", 1.0),
    ("x = -7", "-7", 1.0),
    ("x = -7", "7", 0.0),
    ("\u22127 degrees", "-7", 1.0),  # a Unicode minus
    ("from 3-5", "5", 1.0),  # a dash between terms is no sign
    ("It costs $1,234.", "1234", 1.0),  # thousands separators
    ("1,234,567 people", "1234567", 1.0),
    ("1,2,3", "3", 1.0),  # a list, not thousands
    ("pi is 3.14159", "3.14159", 1.0),
    ("pi is 3.14159", "3.14", 0.0),  # the default tolerance is 1e-6
    ("about .5", "0.5", 1.0),
    ("half: 1/2", "0.5", 1.0),  # a simple fraction
    ("x = -0.75", "-3/4", 1.0),  # a fraction as the answer
    ("3 and then 1/0", "3", 1.0),  # 1/0 is no number
    ("1000000.0000001", "1000000", 1.0),  # relative beyond magnitude 1
    ("0.0000011", "0", 0.0),  # absolute below it
    ("2.0", 2, 1.0),  # a number as the answer
    ("four", "4", 0.0),  # no number: 0
    ("", "4", 0.0),
    ("H2O", "2", 0.0),  # a number inside a word does not count
    ("5kg", "5", 1.0),
    ("#### 18", "The total is #### 18", 1.0),  # the answer's last number (GSM8K style)
    ("it is 7", ["6", "7"], 1.0),
]

BOXED = [
    (r"so the answer is \boxed{4}.", "4", 1.0),
    (r"\boxed{3} no wait \boxed{ 4 }", "4", 1.0),  # the last one
    (r"\boxed{3} no wait \boxed{ 4 }", "3", 0.0),
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}", 1.0),  # nested braces
    (r"\boxed{\text{Paris}}", r"\text{paris}", 1.0),  # exact match of the content (case-folded)
    (r"\boxed{4", "4", 0.0),  # unclosed
    (r"\boxed{2} then \boxed{4", "2", 1.0),  # the last complete one
    ("4", "4", 0.0),  # nothing boxed
    (r"\boxed{}", "", 0.0),
    (r"\boxed{x^{2}+1}", r"The answer: $\boxed{x^{2}+1}$", 1.0),  # a boxed answer (a MATH solution)
    (r"\boxed {4}", "4", 1.0),
]


@pytest.mark.parametrize("verifier, table", [(exact_match, EXACT), (numeric_match, NUMERIC), (boxed_match, BOXED)],
                         ids=["exact", "numeric", "boxed"])
def test_verifiers_score_a_table_of_completions_and_answers(verifier, table):
    assert scores(verifier, table) == expected(table)


def test_normalisation_parsing_and_boxed_extraction():
    assert normalize_answer('  The answer is: "Paris".') == "paris"
    assert normalize_answer("**(B)**") == "b" and normalize_answer("-3.5") == "-3.5"
    assert [parse_number(text) for text in ("1,234.5", "-3/4", "none", "v2", "1/0", "12/25/2023")] == [
        1234.5, -0.75, None, None, None, 2023.0]
    assert last_boxed(r"a \boxed{b{c}d} e \boxed{f}") == "f" and last_boxed("no box") is None


def test_numeric_tolerance_is_absolute_below_one_and_relative_above():
    within = numeric_match_within(0.01)
    table = [("3.14", "3.1416", 1.0), ("3.2", "3.1416", 0.0), ("1005", "1000", 1.0), ("1011", "1000", 0.0),
             ("0.009", "0", 1.0), ("0.02", "0", 0.0)]
    assert scores(within, table) == expected(table)
    assert within.__name__ == "numeric_match"
    with pytest.raises(ValueError, match="tolerance must be a finite number"):
        numeric_match_within(-1)


def test_regex_format_needs_no_answer():
    check = regex_format(THINK_ANSWER)
    completions = ["<think>2+2\nis 4</think> <answer>4</answer>", "<answer>4</answer>",
                   "<think>x</think><answer>4</answer> and more", "<think></think>\n<answer></answer>"]
    assert check(["p"] * 4, completions) == [1.0, 0.0, 0.0, 1.0]
    assert list(inspect.signature(check).parameters) == ["prompts", "completions"]
    assert regex_format(re.compile("^a$"))(["p"] * 2, ["a", "a\nb"]) == [1.0, 0.0]  # its own flags
    assert regex_format("answer")(["p"], ["my answer is"]) == [1.0]  # re.search: unanchored finds
    with pytest.raises(ValueError, match=r"not a regular expression .*Fix"):
        regex_format("(unclosed")


def test_verifiers_by_name_and_refused_without_an_answer_field():
    for name, function in (("exact-match", exact_match), ("numeric-match", numeric_match),
                           ("boxed-match", boxed_match)):
        source = make_reward(name)
        assert source.fn is function and source.name == function.__name__
        source.check_fields(["answer"])
        with pytest.raises(ValueError, match=rf"The reward '{function.__name__}' takes 'answer', which the prompts "
                                             r"do not have .*Fix"):
            source.check_fields(["level"])
    several = make_reward(["numeric-match", regex_format(THINK_ANSWER)])
    several.check_fields(["answer"])
    with pytest.raises(ValueError, match=r"'numeric_match' takes 'answer'"):
        several.check_fields([])
    regex_format(THINK_ANSWER)  # and a format check needs nothing
    make_reward(regex_format(THINK_ANSWER)).check_fields([])


def test_a_task_without_answers_is_refused_with_the_fix(default_model_path):
    with pytest.raises(ValueError, match=r"'exact_match' takes 'answer', which the prompts do not have .*Fix"):
        TextTask(["2+2="], reward=["exact-match"], max_new_tokens=2, **TASK)


def test_an_answer_without_a_number_names_the_component_and_the_text():
    reward = make_reward({"correct": numeric_match, "format": regex_format("^a")})
    with pytest.raises(RewardError, match=r"The reward component 'correct' raised ValueError: the answer 'Paris' "
                                          r"holds no number. Fix: .* while scoring prompt 'q2' with completion '7'"):
        reward(["q1", "q2"], ["1", "7"], answer=["1", "Paris"])


# -- several rewards -------------------------------------------------------------------

def length(prompts, completions):
    return [float(len(c)) for c in completions]


def test_the_score_is_the_weighted_sum_and_components_are_named_uniquely():
    two = make_reward([exact_match, length, "numeric-match", lambda p, c: [1.0] * len(c),
                       lambda p, c: [2.0] * len(c)], weights=[2.0, 0.5, 1.0, -1.0, 3])
    assert isinstance(two, WeightedRewards)
    assert list(two.components) == ["exact_match", "length", "numeric_match", "<lambda>", "<lambda>_2"]
    assert two.name == "2*exact_match+0.5*length+numeric_match+-1*<lambda>+3*<lambda>_2"
    total, components = two.score_components(["q", "q"], ["42", "The answer is 7"], answer=["42", "8"])
    # by hand: exact 1, 0; length 2, 15; numeric 1, 0; then -1 and +6 each
    np.testing.assert_array_equal(total, [2 * 1 + 0.5 * 2 + 1 - 1 + 6, 0 + 0.5 * 15 + 0 - 1 + 6])
    np.testing.assert_array_equal(two(["q", "q"], ["42", "The answer is 7"], answer=["42", "8"]), total)
    assert {name: list(values) for name, values in components.items()} == {
        "exact_match": [1.0, 0.0], "length": [2.0, 15.0], "numeric_match": [1.0, 0.0], "<lambda>": [1.0, 1.0],
        "<lambda>_2": [2.0, 2.0]}
    assert list(make_reward([length, length]).components) == ["length", "length_2"]
    named = make_reward({"correct": "exact-match", "short": length}, weights={"short": -0.1, "correct": 1.0})
    assert list(named.components) == ["correct", "short"] and named.weights == [1.0, -0.1]
    single = make_reward(length, weights=[0.5])  # one reward, weighted
    assert single(["q"], ["abcd"])[0] == 2.0 and list(single.components) == ["length"]


@pytest.mark.parametrize("weights, match", [
    ([1.0], r"1 reward_weights for 2 rewards \(exact_match, length\)\. Fix"),
    ([1.0, float("nan")], r"The weight of the reward 'length' is nan\. Fix"),
    ([1.0, "2"], r"The weight of the reward 'length' is '2'\. Fix"),
    ({"exact_match": 1.0}, r"reward_weights name \['exact_match'\], the rewards are .*Fix"),
])
def test_bad_weights_are_refused_with_the_fix(weights, match):
    with pytest.raises(ValueError, match=match):
        make_reward([exact_match, length], weights=weights)


def test_an_empty_or_nested_list_is_refused():
    with pytest.raises(ValueError, match="No rewards to combine"):
        make_reward([])
    with pytest.raises(TypeError, match="one flat list"):
        make_reward([length, [length]])


@pytest.mark.parametrize("bad, match", [
    (lambda p, c: [float("nan")] * len(c), r"The reward component 'broken' returned a non-finite score \(nan\) for "
                                           r"prompt 'q' with completion 'abc'\. Fix"),
    (lambda p, c: [1.0, 2.0, 3.0], r"The reward component 'broken' returned 3 scores for 1 completions\. Fix"),
    (lambda p, c: "high", r"The reward component 'broken' must return a sequence of numbers"),
    (lambda p, c: [1 / 0], r"The reward component 'broken' raised ZeroDivisionError: division by zero while "
                           r"scoring prompt 'q' with completion 'abc'\. Fix"),
])
def test_each_component_is_checked_and_named(bad, match):
    with pytest.raises((ValueError, TypeError, RewardError), match=match):
        make_reward({"fine": length, "broken": bad})(["q"], ["abc"])


def test_the_culprit_of_a_batch_is_found_in_its_component_only():
    calls = {"fine": 0, "picky": 0}

    def fine(prompts, completions):
        calls["fine"] += 1
        return [0.0] * len(completions)

    def picky(prompts, completions):
        calls["picky"] += 1
        if "bad" in completions:
            raise KeyError("bad")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"The reward component 'picky' raised KeyError.*prompt 'q2' with "
                                          r"completion 'bad'"):
        make_reward([fine, picky])(["q1", "q2", "q3"], ["ok", "bad", "ok"])
    assert calls == {"fine": 1, "picky": 1 + 2}  # the batch, then pairs until the culprit; the fine one once


# -- in the environments ----------------------------------------------------------------

RECORDS = [{"prompt": "Six times seven is", "answer": "42"}, {"prompt": "Two plus two is", "answer": "4"}]


def weighted_pair():
    """numeric_match (weight 1) and a format check (weight 0.25): a bare number."""
    return make_reward([numeric_match, regex_format(r"^\s*-?\d+\s*$")], weights=[1.0, 0.25])


def play(env, prompt_index: int, text: str):
    """One episode of ``env`` (a single env) writing ``text``, then EOS: the last step's reward and info."""
    env.reset(options={"prompt_index": prompt_index})
    tokens = env.unwrapped.tokenizer(text, add_special_tokens=False)["input_ids"] + [env.unwrapped.eos_token_id]
    for token in tokens:
        _, reward, terminated, _, info = env.step(token)
    assert terminated
    return reward, info


@pytest.mark.parametrize("text, prompt_index, components", [
    (" 42", 0, {"numeric_match": 1.0, "regex_format": 1.0}),
    (" it is 42", 0, {"numeric_match": 1.0, "regex_format": 0.0}),
    (" 5", 1, {"numeric_match": 0.0, "regex_format": 1.0}),
    (" four", 1, {"numeric_match": 0.0, "regex_format": 0.0}),
])
def test_a_weighted_pair_on_a_task_reports_its_components(default_model_path, text, prompt_index, components):
    env = gym.make("textenv/TextGen-v0", prompts=RECORDS, reward=weighted_pair(), max_new_tokens=8, **TASK)
    reward, info = play(env, prompt_index, text)
    assert info["completion"] == text
    assert info["reward_components"] == components
    assert reward == info["task_score"] == components["numeric_match"] + 0.25 * components["regex_format"]


def test_a_single_reward_reports_no_components(default_model_path):
    env = gym.make("textenv/TextGen-v0", prompts=RECORDS, reward="numeric-match", max_new_tokens=8, **TASK)
    reward, info = play(env, 0, " 42")
    assert reward == 1.0 and "reward_components" not in info


def test_reward_weights_on_the_task(default_model_path):
    env = gym.make("textenv/TextGen-v0", prompts=RECORDS, reward=["numeric-match", regex_format(r"^\s*\d+$")],
                   reward_weights=[2.0, -1.0], max_new_tokens=8, **TASK)
    reward, info = play(env, 0, " 42 apples")
    assert info["reward_components"] == {"numeric_match": 1.0, "regex_format": 0.0} and reward == 2.0
    reward, info = play(env, 1, " 5")
    assert info["reward_components"] == {"numeric_match": 0.0, "regex_format": 1.0} and reward == -1.0


def test_the_batched_env_scores_each_component_once_per_batch(default_model_path):
    calls: list[tuple[str, int]] = []

    def counted(name, fn):
        def reward(prompts, completions):
            calls.append((name, len(completions)))
            return fn(prompts, completions)
        reward.__name__ = name
        return reward

    reward = make_reward([counted("chars", length), counted("has_e", lambda p, c: [float("e" in t) for t in c])],
                         weights=[0.1, 2.0])
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=3, seed=0,
                            env_kwargs=dict(prompts=RECORDS, reward=reward, max_new_tokens=1, **TASK))
    env.reset()
    _, rewards, dones, infos = env.step(np.array([300, 305, 310]))  # every episode ends (max_new_tokens=1)
    assert dones.all() and calls == [("chars", 3), ("has_e", 3)]  # one call per component for the batch
    for reward_j, info in zip(rewards, infos):
        text = info["completion"]
        assert info["reward_components"] == {"chars": len(text), "has_e": float("e" in text)}
        assert reward_j == pytest.approx(0.1 * len(text) + 2.0 * ("e" in text), rel=1e-6)


class ComponentRecorder(BaseCallback):
    """The finished episodes' components during a rollout, and what was logged at its end."""

    def _on_rollout_start(self) -> None:
        self.components: list[dict[str, float]] = []
        self.scores: list[float] = []

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            if done:
                self.components.append(info["reward_components"])
                self.scores.append(info["task_score"])
        return True

    def _on_rollout_end(self) -> None:  # after the KL callback's
        self.logged = dict(self.model.logger.name_to_value)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "stock-path"])
def test_training_logs_each_components_mean_per_rollout(default_model_path, fast):
    from conftest import collect_one_rollout

    records = [{"prompt": f"Item {i} costs", "answer": str(i)} for i in range(6)]
    reward = make_reward({"chars": length, "digits": lambda p, c: [float(sum(ch.isdigit() for ch in t)) for t in c],
                          "correct": "numeric-match"}, weights=[0.01, 0.5, 1.0])
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=0, batched=fast,
                            env_kwargs=dict(prompts=records, reward=reward, max_new_tokens=4, **TASK))
    agent = make_agent("ppo", env, seed=0, n_steps=24, batch_size=48, fast=fast)
    recorder = ComponentRecorder()
    collect_one_rollout(agent, [recorder])
    assert len(recorder.components) >= 8  # 96 tokens of episodes of at most 4
    logged = recorder.logged
    for name in ("chars", "digits", "correct"):
        mean = np.mean([components[name] for components in recorder.components])
        assert logged[f"rollout/reward/{name}"] == pytest.approx(mean, rel=1e-9)
    assert logged["rollout/task_score"] == pytest.approx(np.mean(recorder.scores), rel=1e-6)
    assert logged["rollout/task_score"] == pytest.approx(
        0.01 * logged["rollout/reward/chars"] + 0.5 * logged["rollout/reward/digits"]
        + logged["rollout/reward/correct"], rel=1e-5)
