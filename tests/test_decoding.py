"""``policies.decoding.PolicyRolloutDecoder`` on its own: the rollout's KV-cached step.

A small scripted rollout drives the decoder as the training rollout does (``start``,
then ``act`` / ``observe`` per step, ``observe_last`` at the end), over episodes that
end and restart and a multi-turn row whose observation gains tokens the agent did not
choose. At every step, what ``act`` returns must equal the policy's full forward on the
current observations (``evaluate_actions`` / ``predict_values``, no cache), which
tests/test_lm_policy.py checks against the model's own forward.
"""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch
from gymnasium import spaces
from transformers import AutoModel

from policies.decoding import PolicyRolloutDecoder
from policies.lm_policy import LMActorCriticPolicy
from policies.sampling import sample_tokens
from textenv.lm.slot_decoding import last_token_index, positions_of
from model_zoo import save_tiny_lm  # tests/ is on sys.path, as for conftest

VOCAB = 64
MAX_PROMPT_LEN, MAX_NEW_TOKENS = 5, 6
WIDTH = MAX_PROMPT_LEN + MAX_NEW_TOKENS
PAD = 7
ATOL = 1e-5




@pytest.fixture(scope="module")
def other_gpt2_path(tmp_path_factory):
    """Another checkpoint of the same vocabulary (a separate critic's start)."""
    return save_tiny_lm("gpt2", tmp_path_factory.mktemp("other-gpt2"), seed=1)


def make_policy(path: str, **kwargs) -> LMActorCriticPolicy:
    observation_space = spaces.Dict({
        "input_ids": spaces.Box(0, VOCAB - 1, (WIDTH,), np.int64),
        "attention_mask": spaces.Box(0, 1, (WIDTH,), np.int64),
    })
    torch.manual_seed(0)
    return LMActorCriticPolicy(observation_space, spaces.Discrete(VOCAB), lambda _: 1e-3, model_name_or_path=path,
                               value_head_init_std=1.0, **kwargs)


class ScriptedEnv:
    """Three episodes side by side in the env's layout: row 0 ends after 3 tokens and
    restarts, row 1 runs on, row 2 gets a two-token reply after its second action
    (multi-turn) and ends when its window is full."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.prompt_lengths = [5, 2, 3]
        self.rows = [self.tokens(p) for p in self.prompt_lengths]
        self.step_count = 0

    def tokens(self, n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=self.generator).tolist()

    def observation(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((3, WIDTH), PAD, dtype=torch.long)
        mask = torch.zeros((3, WIDTH), dtype=torch.long)
        for i, (p, row) in enumerate(zip(self.prompt_lengths, self.rows)):
            first = MAX_PROMPT_LEN - p
            ids[i, first: first + len(row)] = torch.tensor(row)
            mask[i, first: first + len(row)] = 1
        return ids, mask

    def step(self, actions: torch.Tensor) -> torch.Tensor:
        """Append the actions (and the env's reply, ends, restarts); returns the rows that
        started a new episode."""
        new_episode = torch.zeros(3, dtype=torch.bool)
        for i, action in enumerate(actions.tolist()):
            self.rows[i].append(action)
        if self.step_count == 1:
            self.rows[2] += self.tokens(2)  # the env's reply in a multi-turn episode
        for i in range(3):
            generated = len(self.rows[i]) - self.prompt_lengths[i]
            if (i == 0 and generated == 3) or generated == MAX_NEW_TOKENS:
                self.prompt_lengths[i] = 2 + i
                self.rows[i] = self.tokens(self.prompt_lengths[i])
                new_episode[i] = True
        self.step_count += 1
        return new_episode


def as_obs(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids.float(), "attention_mask": mask.float()}


def assert_act_matches_full_forward(policy, decoder, ids, mask, generator) -> torch.Tensor:
    seen = []

    def sample(logits):
        seen.append(logits)
        return sample_tokens(logits, generator=generator)

    actions, log_probs, values = decoder.act(sample)
    with torch.no_grad():
        expected_values, expected_log_probs, _ = policy.evaluate_actions(as_obs(ids, mask), actions)
        expected_distribution = policy.get_distribution(as_obs(ids, mask)).distribution
    torch.testing.assert_close(log_probs, expected_log_probs, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(values, expected_values.flatten(), atol=ATOL, rtol=ATOL)
    # what the sampler was given: the full forward's distribution
    torch.testing.assert_close(torch.log_softmax(seen[0], -1), expected_distribution.logits, atol=ATOL, rtol=ATOL)
    return actions


def run_scripted_rollout(policy, decoder, n_steps: int = 5, perturb_after: int | None = None):
    env = ScriptedEnv()
    generator = torch.Generator().manual_seed(0)
    ids, mask = env.observation()
    decoder.start(ids, mask)
    restarts = extended = 0
    for step in range(n_steps):
        actions = assert_act_matches_full_forward(policy, decoder, ids, mask, generator)
        new_episode = env.step(actions)
        restarts += int(new_episode.sum())
        extended += int(env.step_count == 2)
        ids, mask = env.observation()
        if step == n_steps - 1:
            decoder.observe_last(actions, ids, mask, new_episode)
            return ids, mask, new_episode, restarts, extended
        decoder.observe(actions, ids, mask, new_episode)
        if perturb_after == step:  # an update changed the weights: the next rollout starts afresh
            with torch.no_grad():
                for parameter in policy.parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))
            decoder.start(ids, mask)


def test_act_equals_the_full_forward_at_every_step_of_a_rollout(tiny_lm_path):
    policy = make_policy(tiny_lm_path)
    decoder = PolicyRolloutDecoder(policy, 3, WIDTH)
    ids, mask, new_episode, restarts, extended = run_scripted_rollout(policy, decoder, n_steps=4)
    assert restarts >= 2 and extended == 1  # the script did exercise restarts and a reply

    # observe_last: running episodes get V(s) of their current state, ended ones 0.
    assert new_episode.any() and not new_episode.all()
    with torch.no_grad():
        expected = policy.predict_values(as_obs(ids, mask)).flatten()
    torch.testing.assert_close(decoder.values[~new_episode], expected[~new_episode], atol=ATOL, rtol=ATOL)
    assert torch.all(decoder.values[new_episode] == 0)
    assert expected[new_episode].abs().min() > 0  # 0 is the decoder's choice, not the model's value


def test_observe_last_frees_the_caches_and_start_begins_again(tiny_lm_path):
    policy = make_policy(tiny_lm_path)
    decoder = PolicyRolloutDecoder(policy, 3, WIDTH)
    ids, mask, *_ = run_scripted_rollout(policy, decoder, n_steps=2)
    with pytest.raises(AssertionError, match="start"):
        decoder.act()
    decoder.start(ids, mask)
    assert_act_matches_full_forward(policy, decoder, ids, mask, torch.Generator().manual_seed(1))


def test_start_after_an_update_reads_the_new_weights(tiny_lm_path):
    """After the weights change, ``start`` refills every slot: no stale key is read."""
    policy = make_policy(tiny_lm_path)
    before = copy.deepcopy(policy)  # the weights before the update
    decoder = PolicyRolloutDecoder(policy, 3, WIDTH)
    ids, mask, new_episode, *_ = run_scripted_rollout(policy, decoder, n_steps=5, perturb_after=1)
    running = ~new_episode
    assert running.any()
    with torch.no_grad():
        now = policy.predict_values(as_obs(ids, mask)).flatten()
        stale = before.predict_values(as_obs(ids, mask)).flatten()
    torch.testing.assert_close(decoder.values[running], now[running], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(now[running], stale[running], atol=1e-3)  # the update did change the values


def test_a_compiled_decode_step_equals_the_full_forward_and_follows_updates(tiny_lm_path):
    """``compile=True``: the decode steps run the ``torch.compile``'d body, and ``act`` still
    equals the full forward at every step (1e-5), before and after the weights change."""
    policy = make_policy(tiny_lm_path, compile=True)
    decoder = PolicyRolloutDecoder(policy, 3, WIDTH)
    assert isinstance(decoder.slots.decode_body, torch._dynamo.eval_frame.OptimizedModule)
    assert decoder.slots.decode_body is policy.decode_body()  # compiled once per policy
    assert not any("_orig_mod" in name for name in policy.state_dict())  # no second copy in state dicts
    run_scripted_rollout(policy, decoder, n_steps=5, perturb_after=1)


def test_a_separate_critic_decodes_its_own_values(tmp_path_factory, other_gpt2_path):
    """The critic's body (another checkpoint) decodes in slots of its own: the values equal
    ``predict_values`` (the critic's full forward) at every step, not the policy body's."""
    path = save_tiny_lm("gpt2", tmp_path_factory.mktemp("policy-gpt2"))
    policy = make_policy(path, critic="separate", critic_model_name_or_path=other_gpt2_path)
    decoder = PolicyRolloutDecoder(policy, 3, WIDTH)
    ids, mask, new_episode, *_ = run_scripted_rollout(policy, decoder, n_steps=4)
    with torch.no_grad():
        expected = policy.predict_values(as_obs(ids, mask)).flatten()
        body = AutoModel.from_pretrained(path).eval()  # the policy's own body, under the critic's head
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).last_hidden_state
        value_head = next(m for name, m in policy.named_modules() if name.split(".")[-1] == "value_head")
        policy_hidden_values = value_head(hidden[torch.arange(3), last_token_index(mask)]).flatten()
    torch.testing.assert_close(decoder.values[~new_episode], expected[~new_episode], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(policy_hidden_values, expected, atol=1e-2)  # the two bodies do differ


def test_an_update_frees_the_decoders_of_the_policy(tiny_lm_path):
    """``set_training_mode(True)`` (an update starts) releases the caches of the policy's
    decoders: acting again needs ``start``."""
    policy = make_policy(tiny_lm_path)
    env = ScriptedEnv()
    ids, mask = env.observation()
    decoder = policy.rollout_decoder(3, WIDTH)
    decoder.start(ids, mask)
    decoder.act()
    policy.set_training_mode(True)
    with pytest.raises(AssertionError, match="start"):
        decoder.act()
    policy.set_training_mode(False)
    decoder.start(ids, mask)
    assert_act_matches_full_forward(policy, decoder, ids, mask, torch.Generator().manual_seed(2))
