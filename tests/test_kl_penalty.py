"""The stored per-step reward equals score * [last step] - beta * (log pi_old - log pi_ref)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents import AdaptiveKLController, FixedKLController, make_agent, make_text_vec_env
from textenv import VaderSentimentReward
from textenv.lm.models import load_causal_lm

MAX_PROMPT_LEN, MAX_NEW_TOKENS = 12, 6


class SnapshotRollout(BaseCallback):
    """Records each step's state and action, then the stored rewards, log-probs and the
    policy's weights before the update changes them (works for both rollout paths)."""

    def _on_rollout_start(self) -> None:
        self.input_ids, self.attention_mask, self.step_actions = [], [], []

    def _on_step(self) -> bool:
        state = self.model._last_obs  # the state the actions were taken in
        self.input_ids.append(np.array(state["input_ids"]))
        self.attention_mask.append(np.array(state["attention_mask"]))
        actions = self.locals["actions"]
        self.step_actions.append(np.array(actions.cpu() if torch.is_tensor(actions) else actions).reshape(-1))
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        self.observations = {"input_ids": np.stack(self.input_ids), "attention_mask": np.stack(self.attention_mask)}
        self.actions = np.stack(self.step_actions)[..., None]
        assert np.array_equal(self.actions[..., 0], buffer.actions[..., 0])
        self.rewards = buffer.rewards.copy()
        self.log_probs = buffer.log_probs.copy()
        self.policy_state = {k: v.clone() for k, v in self.model.policy.lm.state_dict().items()}


def sequence_logprobs(model, ids: list[int], actions_from: int) -> list[float]:
    """log p(token_t | tokens_<t) for t >= actions_from, from one teacher-forced pass."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [logprobs[t - 1, ids[t]].item() for t in range(actions_from, len(ids))]


PATHS = {"stock-path": dict(fast=False), "fast-path-per-step-reference": dict(fast=True, deferred_reference=False),
         "fast-path": dict(fast=True)}  # the fast path scores the reference after the rollout by default


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_stored_reward_equals_the_kl_formula_plus_the_terminal_score(default_model_path, kl_coef, path):
    from conftest import PROMPTS

    fast = PATHS[path]["fast"]
    env = make_text_vec_env(
        "textenv/TextGen-v0", n_envs=2, seed=1, batched=fast,
        env_kwargs=dict(prompts=PROMPTS, model="default", reward="vader",
                        max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS),
    )
    n_steps = 3 * MAX_NEW_TOKENS
    # A policy that differs from the reference, so the KL term is not zero.
    model = make_agent("ppo", env, seed=0, kl_coef=kl_coef, n_steps=n_steps, learning_rate=3e-3, **PATHS[path])
    with torch.no_grad():
        for parameter in model.policy.lm.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    snapshot = SnapshotRollout()
    model.learn(n_steps * env.num_envs, callback=snapshot)

    policy_lm = load_causal_lm("default")
    policy_lm.load_state_dict(snapshot.policy_state)
    reference_lm = load_causal_lm("default")
    vader = VaderSentimentReward()
    tokenizer = env.get_attr("tokenizer")[0]
    eos = tokenizer.eos_token_id

    checked_terminal = 0
    for env_index in range(env.num_envs):
        ids = snapshot.observations["input_ids"][:, env_index]
        mask = snapshot.observations["attention_mask"][:, env_index]
        actions = snapshot.actions[:, env_index, 0].astype(int)
        episode_start = 0
        for step in range(n_steps):
            n_generated = int(mask[step, MAX_PROMPT_LEN:].sum())
            if n_generated == 0:
                episode_start = step
            prompt = ids[step, :MAX_PROMPT_LEN][mask[step, :MAX_PROMPT_LEN] == 1].tolist()
            generated = actions[episode_start : step + 1].tolist()
            sequence = prompt + generated
            logp_old = sequence_logprobs(policy_lm, sequence, len(prompt))[-1]
            logp_ref = sequence_logprobs(reference_lm, sequence, len(prompt))[-1]
            # SB3's own stored log-prob is the same pi_old.
            assert abs(snapshot.log_probs[step, env_index] - logp_old) < 1e-4
            expected = -kl_coef * (logp_old - logp_ref)
            if actions[step] == eos or len(generated) == MAX_NEW_TOKENS:
                completion = tokenizer.decode([t for t in generated if t != eos], skip_special_tokens=True)
                expected += vader([tokenizer.decode(prompt)], [completion])[0]
                checked_terminal += 1
            assert snapshot.rewards[step, env_index] == pytest.approx(expected, abs=1e-4)
    assert checked_terminal >= 2 * env.num_envs


def ziegler_update(beta: float, kl: float, target: float, n_episodes: int, horizon: int) -> float:
    """Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon,
    with n the number of episodes of the batch."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return beta * (1.0 + error * n_episodes / horizon)


@pytest.mark.parametrize("kl, n_episodes", [(4.0, 100), (1.8, 100), (2.1, 37), (0.0, 64)])
def test_adaptive_controller_follows_ziegler_et_al(kl, n_episodes):
    controller = AdaptiveKLController(value=0.1, target=2.0, horizon=1000)
    controller.update(observed_kl=kl, n_episodes=n_episodes)
    assert controller.value == pytest.approx(ziegler_update(0.1, kl, 2.0, n_episodes, 1000), rel=1e-12)
    fixed = FixedKLController(0.1)
    fixed.update(observed_kl=100.0, n_episodes=100)
    assert fixed.value == 0.1


def test_the_default_controller_acts_on_the_scale_of_the_run():
    """``horizon=None``: a rollout covers ``n_tokens / (RUN_HORIZON_FRACTION * run_tokens)`` of
    the horizon (at most all of it), so beta moves by up to exp(+-0.2) per twentieth of any run.
    Ziegler et al.'s 10,000 episodes moved it by 2% at most in a run of a thousand."""
    from agents.kl_control import RUN_HORIZON_FRACTION

    controller = AdaptiveKLController(value=0.1, target=4.0)
    with pytest.raises(RuntimeError, match="start_run"):
        controller.update(observed_kl=8.0, n_episodes=40, n_tokens=1024)
    controller.start_run(24_576)
    controller.update(observed_kl=8.0, n_episodes=40, n_tokens=1024)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * np.exp(0.2 * 1024 / (RUN_HORIZON_FRACTION * 24_576)), rel=1e-12)
    # A KL held at twice the target moves beta by exp(0.2) per horizon, however long the run
    # and however it is cut into rollouts.
    for run_tokens, rollout_tokens in ((24_576, 1024), (245_760, 1024), (245_760, 4096)):
        controller = AdaptiveKLController(value=1.0, target=4.0)
        controller.start_run(run_tokens)
        for _ in range(run_tokens // rollout_tokens):
            controller.update(observed_kl=8.0, n_episodes=40, n_tokens=rollout_tokens)
        assert controller.value == pytest.approx(np.exp(0.2 / RUN_HORIZON_FRACTION), rel=1e-9)
    # A rollout longer than the horizon moves beta by the clipped error once, never to zero.
    controller = AdaptiveKLController(value=0.1, target=4.0)
    controller.start_run(100)
    controller.update(observed_kl=0.0, n_episodes=4, n_tokens=100)
    assert controller.value == pytest.approx(0.1 * np.exp(-0.2))
    # Ziegler et al.'s rule when a horizon in episodes is given.
    ziegler = AdaptiveKLController(value=0.1, target=2.0, horizon=1000)
    ziegler.start_run(100)
    ziegler.update(observed_kl=4.0, n_episodes=100, n_tokens=10**6)
    assert ziegler.value == pytest.approx(ziegler_update(0.1, 4.0, 2.0, 100, 1000), rel=1e-12)


def test_learn_gives_the_controller_the_whole_runs_length(default_model_path):
    """``learn(n)`` starts a run of n tokens; a run that goes on (a resume) keeps its length."""
    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=2, seed=0, env_kwargs={"device": "cpu"})
    agent = make_agent("ppo", env, seed=0, n_steps=4, batch_size=8)
    agent.learn(16)
    assert agent.kl_controller.run_tokens == 16
    agent.learn(16, reset_num_timesteps=False)
    assert agent.kl_controller.run_tokens == 32


class RolloutKLRecorder(BaseCallback):
    """Per rollout: the logged beta (after the controller's update), the logged mean KL, episodes finished."""

    def _on_training_start(self) -> None:
        self.rollouts: list[tuple[float, float, int]] = []

    def _on_rollout_start(self) -> None:
        self.episodes = 0

    def _on_step(self) -> bool:
        self.episodes += int(np.sum(self.locals["dones"]))
        return True

    def _on_rollout_end(self) -> None:  # runs after the KL callback's: the controller has updated
        logged = self.model.logger.name_to_value
        self.rollouts.append((logged["train/kl_coef"], logged["rollout/kl"], self.episodes))


@pytest.mark.parametrize("path", list(PATHS))
def test_kl_controller_counts_episodes_not_tokens(default_model_path, path):
    fast = PATHS[path]["fast"]
    from conftest import PROMPTS

    env = make_text_vec_env(
        "textenv/TextGen-v0", n_envs=2, seed=1, batched=fast,
        env_kwargs=dict(prompts=PROMPTS, model="default", max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS),
    )
    model = make_agent("ppo", env, seed=0, kl_coef=0.1, kl_target=0.5, kl_horizon=50, n_steps=12, batch_size=24,
                       **PATHS[path])
    recorder = RolloutKLRecorder()
    model.learn(2 * 12 * env.num_envs, callback=recorder)
    beta = 0.1
    for logged_beta, kl, episodes in recorder.rollouts:
        assert 0 < episodes < 12 * env.num_envs  # episodes, far fewer than the rollout's tokens
        beta = ziegler_update(beta, kl, 0.5, episodes, 50)
        # Logged after the update: the coefficient the next update and rollout use.
        assert logged_beta == pytest.approx(beta, rel=1e-12)
    assert model.kl_controller.value == pytest.approx(beta, rel=1e-9)
    assert model.kl_controller.value != pytest.approx(0.1)  # the controller did move


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_deferred_reference_scoring_stores_what_per_step_scoring_stores(default_model_path, algo):
    """Same seed, same sampled tokens: the rollout's reference log-probs, rewards, advantages
    and the KL fed to the controller agree between the two ways of scoring the reference
    (PPO's rollouts run across episode ends; the group methods' freeze finished episodes)."""
    from conftest import PROMPTS, collect_one_rollout

    buffers, kls = {}, {}
    for deferred in (False, True):
        env = make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=3, env_kwargs=dict(
            prompts=PROMPTS, model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN,
            max_new_tokens=MAX_NEW_TOKENS, device="cpu"))
        hyper = dict(n_steps=3 * MAX_NEW_TOKENS + 1) if algo == "ppo" else dict(group_size=2)
        agent = make_agent(algo, env, seed=0, kl_coef=0.2, kl_target=None, deferred_reference=deferred, **hyper)
        with torch.no_grad():  # a policy away from the reference: a KL to score
            for parameter in agent.policy.lm.parameters():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        buffers[deferred] = collect_one_rollout(agent)
        kls[deferred] = agent.logger.name_to_value["rollout/kl"]
    per_step, deferred = buffers[False], buffers[True]
    assert np.array_equal(per_step.actions, deferred.actions)
    valid = deferred.token_mask()
    assert np.abs(deferred.ref_log_probs[valid]).min() > 0  # really scored
    np.testing.assert_allclose(deferred.ref_log_probs, per_step.ref_log_probs, atol=2e-5)
    np.testing.assert_allclose(deferred.rewards, per_step.rewards, atol=1e-5)
    np.testing.assert_allclose(deferred.advantages, per_step.advantages, atol=1e-4)
    assert kls[True] == pytest.approx(kls[False], abs=1e-4)


def test_after_a_deferred_rollout_the_env_reports_the_reference_per_step_again(default_model_path):
    from conftest import PROMPTS

    env = make_text_vec_env("textenv/TextGen-v0", n_envs=2, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward="vader", max_prompt_len=MAX_PROMPT_LEN,
        max_new_tokens=MAX_NEW_TOKENS, device="cpu"))
    agent = make_agent("ppo", env, seed=0, n_steps=MAX_NEW_TOKENS + 2)
    agent.learn(2 * (MAX_NEW_TOKENS + 2))  # episodes are mid-way when the rollout ends
    state = {key: value.copy() for key, value in agent._last_obs.items()}
    actions = np.array([11, 12])
    _, _, _, infos = env.step(actions)
    reference = load_causal_lm("default")
    for row in range(2):
        ids = state["input_ids"][row][state["attention_mask"][row] == 1].tolist() + [int(actions[row])]
        expected = sequence_logprobs(reference, ids, len(ids) - 1)[-1]
        assert infos[row]["ref_logprob"] == pytest.approx(expected, abs=1e-4)


class TrainingStartKL(BaseCallback):
    """The per-episode KL sums as the KL callback starts a ``learn`` with them (it runs first)."""

    def _on_training_start(self) -> None:
        self.sums = np.array(self.model.kl_episode_sums, copy=True)

    def _on_step(self) -> bool:
        return True


@pytest.mark.parametrize("second_start", ["learn-again", "load-then-learn"])
def test_episodes_that_a_new_learn_discards_take_their_kl_with_them(tmp_path, default_model_path, second_start):
    """``learn()`` resets the env (SB3 does, unless the run goes on): the new episodes start
    with no KL. Before, the sums of the discarded episodes, pickled into every zip too,
    carried into the new ones' (one slot carried 31.9 nats), and into rollout/kl and beta."""
    from agents import load_agent

    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=4, seed=0, env_kwargs={"device": "cpu"})
    agent = make_agent("ppo", env, seed=0, n_steps=5, batch_size=20, kl_coef=0.1)
    agent.learn(20)  # 5 steps: episodes of up to 24 tokens are still running
    assert np.abs(agent.kl_episode_sums).sum() > 0
    if second_start == "load-then-learn":
        agent.save(tmp_path / "agent.zip")
        agent = load_agent(str(tmp_path / "agent.zip"), env=env)
    start = TrainingStartKL()
    agent.learn(20, callback=start)
    np.testing.assert_array_equal(start.sums, np.zeros(env.num_envs))
    # A run that goes on (reset_num_timesteps=False keeps the episodes) keeps their sums.
    running = np.array(agent.kl_episode_sums, copy=True)
    agent.learn(20, callback=start, reset_num_timesteps=False)
    np.testing.assert_array_equal(start.sums, running)
