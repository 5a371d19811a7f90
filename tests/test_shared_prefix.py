"""A prompt shared by a group's rows runs once (``textenv.lm.shared_prefix``): the hidden
states, their gradients, the reference's log-probs and a whole GRPO update are those of
whole-row passes, and only a rollout whose segments share prompts is split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import make_agent, make_text_vec_env
from agents import sequence_buffer
from textenv.lm.models import load_causal_lm
from textenv.lm.shared_prefix import distinct_rows, hidden_states
from textenv.reference_scoring import teacher_forced_log_probs
from test_group_agents import TEXT_TASK as TASK  # 40 prompts, the default model, 6 new tokens


def grouped_batch(vocab: int, prompt_lengths=(5, 3), group_size: int = 3, width: int = 6, new: int = 4,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows in groups of ``group_size`` sharing a left-padded prompt (``width`` columns) and
    each with its own ``new`` tokens, some ending early (padding on the right, as an episode
    that stopped at EOS): ``(input_ids, attention_mask, width)``."""
    generator = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for length in prompt_lengths:
        prompt = torch.randint(3, vocab, (length,), generator=generator)
        for member in range(group_size):
            completion = torch.randint(3, vocab, (new,), generator=generator)
            kept = new - member % 2  # odd members end a token early
            row_ids = torch.cat([torch.full((width - length,), 1), prompt, completion])  # pad id 1 on the left
            row_mask = torch.cat([torch.zeros(width - length), torch.ones(length), torch.ones(new)]).long()
            row_mask[width + kept:] = 0
            ids.append(row_ids)
            masks.append(row_mask)
    return torch.stack(ids), torch.stack(masks), width


def test_distinct_rows_ignore_padding_ids_and_map_every_row():
    ids = torch.tensor([[0, 5, 6], [1, 5, 6], [9, 5, 7], [1, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    first, inverse = distinct_rows(ids, mask)
    assert len(first) == 3  # rows 0 and 1 differ only in a padding id; row 3's mask differs
    assert inverse[0] == inverse[1] and len({int(inverse[i]) for i in (0, 2, 3)}) == 3
    assert torch.equal(first[inverse][[0, 2, 3]], torch.tensor([0, 2, 3])) and int(first[inverse[1]]) == 0


def test_shared_prompts_give_the_whole_row_hidden_states_and_gradients(tiny_lm_path):
    """GPT-2 and Llama: the split pass equals the whole-row pass, values and gradients (the
    shared prompt's gradient is the sum over its rows)."""
    torch.manual_seed(0)
    model = load_causal_lm(tiny_lm_path, "cpu")
    body = model.base_model
    ids, mask, width = grouped_batch(model.config.vocab_size)

    def run(prefix_columns: int):
        model.zero_grad()
        hidden = hidden_states(body, ids, mask, prefix_columns)
        weights = torch.linspace(-1, 1, hidden.shape[-1])
        # A loss over the states a group update reads: the last prompt column and the completions.
        loss = ((hidden[:, width - 1:] * weights).sum(-1) * mask[:, width - 1:]).sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return hidden.detach(), grads

    whole, whole_grads = run(0)
    split, split_grads = run(width)
    real = mask.bool()
    torch.testing.assert_close(split[real], whole[real], atol=1e-5, rtol=1e-5)
    assert whole_grads.keys() == split_grads.keys() and len(whole_grads) > 4
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_reference_log_probs_are_the_same_with_shared_prompts(tiny_lm_path):
    model = load_causal_lm(tiny_lm_path, "cpu").eval()
    ids, mask, width = grouped_batch(model.config.vocab_size, group_size=4)
    rows, columns = (mask[:, width - 1:-1] > 0).nonzero(as_tuple=True)
    columns = columns + width - 1
    actions = ids[rows, columns + 1]
    with torch.no_grad():
        whole = teacher_forced_log_probs(model, ids, mask, rows, columns, actions)
        split = teacher_forced_log_probs(model, ids, mask, rows, columns, actions, prefix_columns=width)
        small_passes = teacher_forced_log_probs(model, ids, mask, rows, columns, actions, rows_per_pass=3,
                                                prefix_columns=width)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(small_passes, whole, atol=1e-5, rtol=0)


def test_a_body_checkpointing_its_activations_runs_whole_rows(tiny_lm_path):
    """Under activation checkpointing a Hugging Face body keeps no cache in training, so it
    is never split (in evaluation either, so that both round alike)."""
    model = load_causal_lm(tiny_lm_path, "cpu")
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask, width = grouped_batch(model.config.vocab_size)
    hidden = hidden_states(model.base_model, ids, mask, width)
    assert hidden.shape == (*ids.shape, model.config.hidden_size) and hidden.requires_grad


def grpo_agent(n_envs: int = 8, seed: int = 0, batch_size: int = 24):
    env = make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=seed, env_kwargs=TASK)
    return make_agent("grpo", env, group_size=4, n_epochs=2, batch_size=batch_size, learning_rate=1e-3, seed=seed,
                      kl_coef=0.05, kl_target=None)


@pytest.fixture
def always_share(monkeypatch):
    """Share prompts whatever they spare (the rule's threshold is for speed, not results)."""
    monkeypatch.setattr(sequence_buffer, "SHARED_PROMPTS_MIN_SAVING", 0.0)


def test_a_group_rollout_shares_its_prompts_and_a_ppo_rollout_does_not(default_model_path, always_share,
                                                                        monkeypatch):
    from conftest import collect_one_rollout

    agent = grpo_agent(batch_size=4)  # a minibatch ends at the first group's end
    buffer = collect_one_rollout(agent)
    samples = buffer.segment_samples(np.arange(len(buffer.segment_spans)))
    sequences = samples.observations
    width = sequences.prefix_columns
    assert width > 0
    # The prompt's last column is where every segment's first state is read.
    first_states = [int(buffer.state_columns[first, env]) - buffer.shared_left_padding
                    for env, first, _ in buffer.segment_spans]
    assert set(first_states) == {width - 1}
    first, inverse = distinct_rows(sequences.input_ids[:, :width], sequences.attention_mask[:, :width])
    assert len(first) == 2 and sorted(np.bincount(inverse.numpy())) == [4, 4]  # 2 prompts x 4 completions
    # Minibatches are whole groups: each prompt's completions go through the body together.
    prompt_of_segment = inverse.numpy()
    for _ in range(5):
        batches = list(buffer.minibatch_segments(agent.batch_size))
        assert len(batches) == 2 and all(len(set(prompt_of_segment[batch])) == 1 for batch in batches)
    # A rollout whose sharing would spare less than the rule asks runs whole rows, shuffled one by one.
    monkeypatch.setattr(sequence_buffer, "SHARED_PROMPTS_MIN_SAVING", 1.0)
    buffer.generator_ready = False
    assert buffer.segment_samples(np.arange(2)).observations.prefix_columns == 0
    mixed = [batch for _ in range(20) for batch in buffer.minibatch_segments(agent.batch_size)
             if len(set(prompt_of_segment[batch])) > 1]
    assert mixed  # segments of both prompts in one minibatch

    # PPO's rollouts are not groups: even whole episodes of one prompt (a single prompt here),
    # each starting right after it, are shuffled segment by segment and run as whole rows.
    monkeypatch.setattr(sequence_buffer, "SHARED_PROMPTS_MIN_SAVING", 0.0)
    one_prompt = dict(TASK, prompts=["Prompt number 1 says"])
    ppo = make_agent("ppo", make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=0, env_kwargs=one_prompt),
                     n_steps=2, batch_size=4, seed=0)
    buffer = collect_one_rollout(ppo)
    assert len({tuple(ids[:-TASK["max_new_tokens"]].tolist()) for ids in buffer.segment_ids}) == 1
    assert not buffer.shares_prompts and buffer.segment_samples(np.arange(2)).observations.prefix_columns == 0


def test_a_grpo_update_with_shared_prompts_equals_one_over_whole_rows(default_model_path, monkeypatch):
    """Two GRPO iterations from the same seed, prompts shared and not: the same rollouts, the
    same reference log-probs and the same weights after the updates. One minibatch per epoch,
    so that both draw the same segments (sharing shuffles whole groups)."""

    def train(share: bool) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        monkeypatch.setattr(sequence_buffer, "SHARED_PROMPTS_MIN_SAVING", 0.0 if share else 2.0)
        agent = grpo_agent(batch_size=8 * TASK["max_new_tokens"])
        agent.learn(2 * 8 * TASK["max_new_tokens"])
        assert (agent.rollout_buffer.prefix_columns > 0) == share
        monkeypatch.undo()
        weights = {name: p.detach().clone() for name, p in agent.policy.named_parameters()}
        return weights, agent.rollout_buffer.ref_log_probs.copy()

    initial = {name: p.detach().clone() for name, p in grpo_agent().policy.named_parameters()}
    shared, shared_ref = train(True)
    whole, whole_ref = train(False)
    np.testing.assert_allclose(shared_ref, whole_ref, atol=1e-5)
    for name, weight in whole.items():
        torch.testing.assert_close(shared[name], weight, atol=2e-6, rtol=0, msg=name)
    moved = max(float((whole[name] - weight).abs().max()) for name, weight in initial.items())
    assert moved > 1e-4  # the updates moved the weights: the comparison is not of two untrained policies
