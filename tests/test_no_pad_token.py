"""Checkpoints without a pad token (GPT-2, Llama) work: EOS pads, and padding is never attended."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from textenv import TextGenEnv
from textenv.vector import BatchedTextGenVecEnv

from conftest import PROMPTS, save_tiny_gpt2

MAX_PROMPT_LEN = 32


@pytest.fixture(scope="module")
def no_pad_model_path(tmp_path_factory, default_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = copy.deepcopy(default_tokenizer)
    tokenizer.pad_token = None
    path = save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-no-pad"), tokenizer)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    return path


@torch.no_grad()
def unpadded_ref_logprobs(reference, prompt: list[int], actions: list[int]) -> list[float]:
    """log pi_ref of each action from one forward pass over prompt + actions, no padding at all."""
    logits = reference(input_ids=torch.tensor([prompt + actions])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt) - 1 + t, a].item() for t, a in enumerate(actions)]


def test_a_checkpoint_without_pad_token_works_by_path(no_pad_model_path):
    with pytest.warns(UserWarning, match=r"has no pad token.*pad := eos"):
        env = TextGenEnv(PROMPTS, model=str(no_pad_model_path), max_new_tokens=6)
    eos = env.eos_token_id
    assert env.task.pad_token_id == eos
    obs, _ = env.reset(options={"prompt_index": 0})
    prompt = env.prompt_ids[0]
    start = MAX_PROMPT_LEN - len(prompt)
    assert (obs["input_ids"][:start] == eos).all() and not obs["attention_mask"][:start].any()
    assert obs["input_ids"][start:MAX_PROMPT_LEN].tolist() == prompt and obs["attention_mask"][start:MAX_PROMPT_LEN].all()

    actions = [300, 301, 302]
    ref_logprobs = []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert not (terminated or truncated) and reward == 0.0
        ref_logprobs.append(info["ref_logprob"])
    generated_end = MAX_PROMPT_LEN + len(actions)
    assert obs["attention_mask"][MAX_PROMPT_LEN:generated_end].all() and not obs["attention_mask"][generated_end:].any()
    assert (obs["input_ids"][generated_end:] == eos).all()
    np.testing.assert_allclose(ref_logprobs, unpadded_ref_logprobs(env.reference, prompt, actions), atol=1e-5)

    obs, reward, terminated, truncated, info = env.step(eos)
    assert terminated and info["completion"] == env.tokenizer.decode(actions)


def test_the_batched_env_pads_with_eos_and_never_attends_to_it(no_pad_model_path):
    with pytest.warns(UserWarning, match=r"pad := eos"):
        env = BatchedTextGenVecEnv(3, PROMPTS, model=str(no_pad_model_path), max_new_tokens=4)
    eos = env.task.eos_token_id
    env.seed(0)
    obs = env.reset()
    prompts = [ids[mask == 1].tolist() for ids, mask in zip(obs["input_ids"], obs["attention_mask"])]
    assert all(len(p) < MAX_PROMPT_LEN for p in prompts)  # every row has left padding
    for row, prompt in enumerate(prompts):
        assert (obs["input_ids"][row, : MAX_PROMPT_LEN - len(prompt)] == eos).all()

    # Row 2 ends with EOS at the third step; rows 0 and 1 run to the budget.
    steps = [[300, 301, 302], [303, 304, 305], [306, 307, eos], [308, 309, 310]]
    ref_logprobs: list[list[float]] = [[], [], []]
    finished = {}
    for actions in steps:
        obs, rewards, dones, infos = env.step(np.array(actions))
        for row in range(3):
            if row not in finished:
                ref_logprobs[row].append(infos[row]["ref_logprob"])
            if dones[row] and row not in finished:
                finished[row] = infos[row]["completion"]
    assert set(finished) == {0, 1, 2}
    for row, prompt in enumerate(prompts):
        actions = [step[row] for step in steps][: len(ref_logprobs[row])]
        np.testing.assert_allclose(ref_logprobs[row], unpadded_ref_logprobs(env.task.reference, prompt, actions), atol=1e-5)
        words = [a for a in actions if a != eos]
        assert finished[row] == env.tokenizer.decode(words)
    assert len(ref_logprobs[2]) == 3 and len(ref_logprobs[0]) == 4


def test_completion_text_drops_only_the_eos_when_pad_is_eos(no_pad_model_path):
    with pytest.warns(UserWarning, match=r"pad := eos"):
        env = TextGenEnv(PROMPTS, model=str(no_pad_model_path))
    eos = env.eos_token_id
    assert env.task.completion_text(0, [300, 301, eos]) == env.tokenizer.decode([300, 301])
    assert env.task.completion_text(0, [eos]) == ""
