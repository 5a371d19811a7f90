"""``agents.sequence_buffer`` on its own: segments, GAE, minibatches, normalisation and
the teacher-forced recomputation of log-probs.

The buffer is filled by hand, as the fast rollout fills it (``add_step``,
``end_finished_episodes``, ``close_open_segments``), from a scripted rollout of two
envs whose episodes end and restart inside it; the group-rollout case stops early and
leaves the steps after each episode's end empty. GAE is checked against its definition
(a direct sum over each episode's remaining TD errors), not SB3's recursion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from agents.sequence_buffer import SequenceRolloutBuffer, normalize_rollout_advantages
from policies.lm_policy import LMActorCriticPolicy

VOCAB = 64
MAX_PROMPT_LEN, MAX_NEW_TOKENS = 4, 4
WIDTH = MAX_PROMPT_LEN + MAX_NEW_TOKENS
PAD = 7
N_ENVS, N_STEPS = 2, 5


def spaces_for():
    observation_space = spaces.Dict({
        "input_ids": spaces.Box(0, VOCAB - 1, (WIDTH,), np.int64),
        "attention_mask": spaces.Box(0, 1, (WIDTH,), np.int64),
    })
    return observation_space, spaces.Discrete(VOCAB)


def make_buffer(gamma: float = 0.99, gae_lambda: float = 0.95) -> SequenceRolloutBuffer:
    observation_space, action_space = spaces_for()
    return SequenceRolloutBuffer(N_STEPS, observation_space, action_space, device="cpu", gamma=gamma,
                                 gae_lambda=gae_lambda, n_envs=N_ENVS)


def layout(prompt: list[int], generated: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full(WIDTH, PAD, dtype=np.int64)
    mask = np.zeros(WIDTH, dtype=np.int64)
    first = MAX_PROMPT_LEN - len(prompt)
    tokens = prompt + generated
    ids[first: first + len(tokens)] = tokens
    mask[first: first + len(tokens)] = 1
    return ids, mask


#: Per env, its episodes in order: (prompt length, number of steps, whether it ends in the rollout).
PPO_SCRIPT = [[(2, 3, True), (3, 2, False)],      # env 0: ends at step 2, a new episode runs on
              [(4, 4, True), (1, 1, False)]]      # env 1: ends at step 3 (window full), restarts
#: A group rollout: episodes never restart; the rollout stops when all have ended (step 3).
GROUP_SCRIPT = [[(2, 2, True)], [(3, 4, True)]]


def fill(buffer: SequenceRolloutBuffer, script, seed: int = 0, scores=None, stop_early: bool = False):
    """Fill ``buffer`` with the scripted rollout (random tokens, rewards, values); returns the
    episodes' token lists ``(env, prompt, generated)`` in the order their segments close."""
    rng = np.random.default_rng(seed)
    episodes = [[(rng.integers(1, VOCAB, p).tolist(), rng.integers(1, VOCAB, n).tolist(), ends)
                 for p, n, ends in env_script] for env_script in script]
    position = [[0, 0] for _ in range(N_ENVS)]  # (episode, steps taken in it)
    closed = []
    n_steps = max(sum(n for _, n, _ in env_script) for env_script in script)
    starts = np.ones(N_ENVS, dtype=np.float32)
    for step in range(n_steps):
        actions, columns, rewards, dones, infos = [], [], [], np.zeros(N_ENVS, bool), [{} for _ in range(N_ENVS)]
        for env in range(N_ENVS):
            episode, taken = position[env]
            if episode >= len(episodes[env]):  # a group rollout's finished episode: a throw-away step
                actions.append(0)
                columns.append(0)
                rewards.append(0.0)
                continue
            prompt, generated, ends = episodes[env][episode]
            actions.append(generated[taken])
            columns.append(MAX_PROMPT_LEN - 1 + taken)
            rewards.append(float(rng.normal()))
            position[env][1] += 1
            if position[env][1] == len(generated) and ends:
                dones[env] = True
                ids, mask = layout(prompt, generated)
                infos[env] = {"terminal_observation": {"input_ids": ids, "attention_mask": mask}}
                if scores is not None:
                    infos[env]["task_score"] = scores[env][episode]
                closed.append((env, prompt, generated))
                position[env] = [episode + 1, 0]
        buffer.add_step(torch.tensor(actions), np.array(rewards, np.float32), starts,
                        torch.tensor(rng.normal(size=N_ENVS), dtype=torch.float32), torch.zeros(N_ENVS),
                        torch.tensor(columns), rng.normal(size=N_ENVS).astype(np.float32))
        buffer.end_finished_episodes(dones, infos)
        starts = dones.astype(np.float32)
    if stop_early:  # as the group rollout does once every episode ended
        buffer.pos, buffer.full = buffer.buffer_size, True
        return closed
    current = []
    for env in range(N_ENVS):
        episode, taken = position[env]
        prompt, generated, _ = episodes[env][episode]
        current.append(layout(prompt, generated[:taken]))
        if taken:
            closed.append((env, prompt, generated[:taken]))
    buffer.close_open_segments(torch.as_tensor(np.stack([c[0] for c in current])),
                               torch.as_tensor(np.stack([c[1] for c in current])))
    return closed


def gae_by_definition(rewards, values, episode_starts, last_values, dones, gamma, gae_lambda):
    """``A_t = sum_k (gamma lambda)^k delta_{t+k}`` over the rest of ``t``'s episode inside the
    rollout, ``delta_k = r_k + gamma V(s_{k+1}) [not terminal] - V(s_k)``, bootstrapping from
    ``last_values`` at the rollout's end unless ``dones``."""
    n_steps, n_envs = rewards.shape
    advantages = np.zeros((n_steps, n_envs))
    for env in range(n_envs):
        for t in range(n_steps):
            end = t
            while end + 1 < n_steps and not episode_starts[end + 1, env]:
                end += 1
            total = 0.0
            for k in range(t, end + 1):
                if k < end:
                    next_value = gamma * values[k + 1, env]
                elif end == n_steps - 1:
                    next_value = gamma * last_values[env] * (1 - dones[env])
                else:  # the episode ended at step k
                    next_value = 0.0
                delta = rewards[k, env] + next_value - values[k, env]
                total += (gamma * gae_lambda) ** (k - t) * delta
            advantages[t, env] = total
    return advantages


# --------------------------------------------------------------------- filling


def test_segments_hold_each_episode_of_the_rollout():
    buffer = make_buffer()
    closed = fill(buffer, PPO_SCRIPT)
    assert buffer.full and buffer.pos == N_STEPS
    assert buffer.segment_spans == [(0, 0, 2), (1, 0, 3), (0, 3, 4), (1, 4, 4)]
    for segment, (env, prompt, generated) in enumerate(closed):
        ids, mask = layout(prompt, generated)
        assert buffer.segment_spans[segment][0] == env
        np.testing.assert_array_equal(np.asarray(buffer.segment_ids[segment]), ids)
        np.testing.assert_array_equal(np.asarray(buffer.segment_masks[segment]), mask)
    np.testing.assert_array_equal(buffer.episode_starts, [[1, 1], [0, 0], [0, 0], [1, 0], [0, 1]])
    assert buffer.token_mask().all()
    assert buffer.trained_segments().tolist() == [0, 1, 2, 3]


def test_the_stock_add_is_refused():
    with pytest.raises(TypeError, match="add_step"):
        make_buffer().add({}, np.zeros(N_ENVS), np.zeros(N_ENVS), np.zeros(N_ENVS), torch.zeros(N_ENVS),
                          torch.zeros(N_ENVS))


def test_a_group_rollout_leaves_the_steps_after_an_episode_empty():
    buffer = make_buffer()
    fill(buffer, GROUP_SCRIPT, stop_early=True)
    assert buffer.segment_spans == [(0, 0, 1), (1, 0, 3)]
    expected = np.zeros((N_STEPS, N_ENVS), bool)
    expected[0:2, 0] = True
    expected[0:4, 1] = True
    np.testing.assert_array_equal(buffer.token_mask(), expected)


def test_an_unjudged_episode_is_left_out_and_scores_are_kept():
    buffer = make_buffer()
    fill(buffer, PPO_SCRIPT, scores=[[None], [0.5]])
    assert buffer.segment_scores == [None, 0.5, None, None]  # the last two were cut by the rollout's end
    assert buffer.segment_in_loss == [False, True, True, True]
    assert buffer.trained_segments().tolist() == [1, 2, 3]
    expected = np.ones((N_STEPS, N_ENVS), bool)
    expected[0:3, 0] = False
    np.testing.assert_array_equal(buffer.token_mask(trained_only=True), expected)
    assert buffer.token_mask().all()


# --------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma, gae_lambda", [(1.0, 0.95), (0.9, 0.95), (0.99, 1.0)])
@pytest.mark.parametrize("last_dones", [(0, 0), (1, 0)])
def test_gae_equals_its_definition(gamma, gae_lambda, last_dones):
    buffer = make_buffer(gamma, gae_lambda)
    fill(buffer, PPO_SCRIPT, seed=1)
    last_values = torch.tensor([0.7, -1.3])
    dones = np.array(last_dones, dtype=np.float32)
    buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
    expected = gae_by_definition(buffer.rewards, buffer.values, buffer.episode_starts, last_values.numpy(),
                                 dones, gamma, gae_lambda)
    np.testing.assert_allclose(buffer.advantages, expected, atol=1e-5)
    np.testing.assert_allclose(buffer.returns, expected + buffer.values, atol=1e-5)


def test_gae_by_hand_on_one_episode():
    """gamma = lambda = 1, one env, an episode of two steps ending in the rollout: A_t is the
    rest of the episode's rewards minus V(s_t)."""
    observation_space, action_space = spaces_for()
    buffer = SequenceRolloutBuffer(2, observation_space, action_space, device="cpu", gamma=1.0, gae_lambda=1.0,
                                   n_envs=1)
    for step, (reward, value) in enumerate([(1.0, 0.5), (2.0, 0.25)]):
        buffer.add_step(torch.tensor([3]), np.array([reward], np.float32), np.array([float(step == 0)], np.float32),
                        torch.tensor([value]), torch.zeros(1), torch.tensor([3 + step]), np.zeros(1, np.float32))
    buffer.compute_returns_and_advantage(last_values=torch.tensor([9.0]), dones=np.array([1.0]))
    np.testing.assert_allclose(buffer.advantages[:, 0], [2.5, 1.75])
    np.testing.assert_allclose(buffer.returns[:, 0], [3.0, 2.0])


# --------------------------------------------------------------------- minibatches


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_minibatches_draw_every_trained_token_once(batch_size):
    buffer = make_buffer()
    fill(buffer, PPO_SCRIPT)
    buffer.leave_out(np.array([2]))
    buffer.advantages[:] = np.arange(N_STEPS * N_ENVS).reshape(N_STEPS, N_ENVS)  # each token its own number
    np.random.seed(0)
    batches = list(buffer.get(batch_size))
    drawn = np.concatenate([batch.advantages.numpy() for batch in batches])
    expected = buffer.advantages[buffer.token_mask(trained_only=True)]
    assert sorted(drawn.tolist()) == sorted(expected.tolist())
    assert len(drawn) == N_STEPS * N_ENVS - 2  # segment 2 (env 0, steps 3-4) is left out
    for batch in batches[:-1]:
        assert len(batch.actions) >= (batch_size or N_STEPS * N_ENVS)
    for batch in batches:
        observations = batch.observations
        # each token's action sits right after its state's last column in its segment's row
        following = observations.input_ids[observations.token_rows, observations.token_columns + 1]
        np.testing.assert_array_equal(following.numpy(), batch.actions[:, 0].long().numpy())
        assert bool(observations.attention_mask[observations.token_rows, observations.token_columns].all())
        flat = (batch.advantages.numpy()).astype(int)
        np.testing.assert_allclose(batch.old_values.numpy(), buffer.values.reshape(-1)[flat])
        np.testing.assert_allclose(batch.returns.numpy(), buffer.returns.reshape(-1)[flat])
        np.testing.assert_allclose(batch.ref_log_prob.numpy(), buffer.ref_log_probs.reshape(-1)[flat])


# --------------------------------------------------------------------- normalisation


def test_normalisation_counts_only_the_trained_tokens():
    buffer = make_buffer()
    fill(buffer, GROUP_SCRIPT, stop_early=True)
    buffer.leave_out(np.array([0]))
    rng = np.random.default_rng(3)
    buffer.advantages[:] = rng.normal(5.0, 3.0, size=buffer.advantages.shape)
    before = buffer.advantages.copy()
    returns = buffer.returns.copy()
    normalize_rollout_advantages(buffer)
    valid = buffer.token_mask(trained_only=True)
    assert valid.sum() == 4
    assert buffer.advantages[valid].mean() == pytest.approx(0.0, abs=1e-6)
    assert buffer.advantages[valid].std(ddof=1) == pytest.approx(1.0, abs=1e-5)
    expected = (before[valid] - before[valid].mean()) / (before[valid].std(ddof=1) + 1e-8)
    np.testing.assert_allclose(buffer.advantages[valid], expected, atol=1e-6)
    np.testing.assert_array_equal(buffer.advantages[~valid], before[~valid])  # the rest untouched
    np.testing.assert_array_equal(buffer.returns, returns)


def test_normalisation_with_global_sums_of_one_rank_is_the_local_one():
    buffers = [make_buffer(), make_buffer()]
    rng = np.random.default_rng(4)
    advantages = rng.normal(-2.0, 0.5, size=(N_STEPS, N_ENVS)).astype(np.float32)
    for buffer in buffers:
        fill(buffer, PPO_SCRIPT)
        buffer.leave_out(np.array([1]))
        buffer.advantages[:] = advantages
    normalize_rollout_advantages(buffers[0])
    normalize_rollout_advantages(buffers[1], sums=lambda values: np.asarray(values, dtype=np.float64))
    np.testing.assert_allclose(buffers[1].advantages, buffers[0].advantages, atol=1e-5)
    assert not np.allclose(buffers[0].advantages, advantages)


# --------------------------------------------------------------------- recomputed log-probs


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def policy(gpt2_path):
    observation_space, action_space = spaces_for()
    return LMActorCriticPolicy(observation_space, action_space, lambda _: 1e-3, model_name_or_path=gpt2_path)


@pytest.mark.parametrize("script, batch_size", [(PPO_SCRIPT, None), (PPO_SCRIPT, 2), (GROUP_SCRIPT, 1)],
                         ids=["ppo-one-batch", "ppo-minibatches", "group"])
def test_recomputed_log_probs_are_the_models_teacher_forced_ones(policy, gpt2_path, script, batch_size):
    buffer = make_buffer()
    group = script is GROUP_SCRIPT
    closed = fill(buffer, script, stop_early=group)
    buffer.log_probs[:] = 123.0  # stale values, to be replaced on every token of a segment
    buffer.recompute_log_probs(policy, batch_size)
    model = AutoModelForCausalLM.from_pretrained(gpt2_path).eval()  # the checkpoint itself
    expected = np.full((N_STEPS, N_ENVS), 123.0)
    with torch.no_grad():
        for (env, first, last), (_, prompt, generated) in zip(buffer.segment_spans, closed):
            logits = model(input_ids=torch.tensor([prompt + generated])).logits[0]
            log_p = torch.log_softmax(logits.float(), -1)
            for k, step in enumerate(range(first, last + 1)):
                expected[step, env] = log_p[len(prompt) - 1 + k, generated[k]].item()
    np.testing.assert_allclose(buffer.log_probs, expected, atol=1e-5)
    # The column that every prompt leaves as padding is dropped once for the whole rollout
    # (the group's prompts are 2 and 3 tokens long, of 4): the values above were read without it.
    assert buffer.shared_left_padding == (1 if group else 0)
    samples = buffer.segment_samples(np.arange(len(buffer.segment_spans)))
    assert samples.observations.input_ids.shape[1] == WIDTH - buffer.shared_left_padding
    if group:
        assert (buffer.log_probs[~buffer.token_mask()] == 123.0).all()
