"""The policy-loss options of the 2026 menu, each on a hand-computed example through the real
update (``clipped_update``): GSPO's sequence-level ratio, CISPO's clipped importance weight
and the entropy bonus (loss value and gradient per token); then a short training run with
each, the refusals, the resolved config and a save/load round trip."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents import algorithms, load_agent, make_agent, make_text_vec_env
from agents.clipped_update import clipped_update, importance_log_ratio
from agents.config import resolved_config
from agents.group_methods import LMGRPO, LMRLOO
from agents.registry import check_algorithm_kwargs
from conftest import PROMPTS

CLIP = 0.2
# Three sequences of one minibatch: rows 0, 0, 0 | 1, 1 | 2. Log-ratios log pi - log pi_old per token.
ROWS = torch.tensor([0, 0, 0, 1, 1, 2])
LOG_RATIO = torch.tensor([0.1, -0.2, 0.4, 0.3, 0.5, 0.3], dtype=torch.float64)
LOG_PROB = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7], dtype=torch.float64)
ADVANTAGE = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
ENTROPY = torch.tensor([2.0, 1.0, 3.0, 0.5, 1.5, 4.0], dtype=torch.float64)
N = len(ROWS)


class OneMinibatchPolicy:
    """A policy whose per-token log-probs and entropies are its parameters: after the update,
    their ``.grad`` is the loss's gradient with respect to each token's log-prob and entropy."""

    def __init__(self, log_prob: torch.Tensor, entropy: torch.Tensor):
        self.log_prob = torch.nn.Parameter(log_prob.clone())
        self.entropy = torch.nn.Parameter(entropy.clone())
        self.optimizer = torch.optim.SGD([self.log_prob, self.entropy], lr=0.0)

    def set_training_mode(self, mode: bool) -> None:
        pass

    def parameters(self):
        return [self.log_prob, self.entropy]

    def evaluate_actions(self, observations, actions):
        return torch.zeros_like(self.log_prob), self.log_prob, self.entropy


class OneMinibatchAgent(SimpleNamespace):
    """The least of an agent that ``clipped_update`` reads: one epoch of one minibatch (the
    tokens above), no critic, no KL term, no gradient clipping, a logger that keeps records."""

    def __init__(self, ent_coef: float = 0.0):
        batch = SimpleNamespace(
            actions=torch.zeros(N, 1), observations=SimpleNamespace(token_rows=ROWS), advantages=ADVANTAGE,
            old_log_prob=LOG_PROB - LOG_RATIO, ref_log_prob=LOG_PROB.clone(), old_values=torch.zeros(N),
            returns=torch.zeros(N))
        self.records: dict[str, float] = {}
        super().__init__(
            policy=OneMinibatchPolicy(LOG_PROB, ENTROPY), clip_range=lambda progress: CLIP,
            _current_progress_remaining=1.0, trains_value_head=False, clip_range_vf=None,
            kl_controller=SimpleNamespace(value=0.0), kl_placement="reward", n_epochs=1, batch_size=N, n_steps=4,
            normalize_advantage=False, ent_coef=ent_coef, target_kl=None, max_grad_norm=1e9, _n_updates=0,
            rollout_buffer=SimpleNamespace(get=lambda batch_size: iter([batch])),
            logger=SimpleNamespace(record=lambda key, value, exclude=None: self.records.__setitem__(key, value)))

    def _update_learning_rate(self, optimizer) -> None:
        pass



def update(ent_coef: float = 0.0, **options) -> tuple[float, list[float], list[float]]:
    """``clipped_update`` on the example: the loss, and its gradient per token with respect to
    the log-prob and to the entropy."""
    agent = OneMinibatchAgent(ent_coef)
    clipped_update(agent, **options)
    policy = agent.policy
    return agent.records["train/loss"], policy.log_prob.grad.tolist(), policy.entropy.grad.tolist()


def test_the_sequence_ratio_is_the_geometric_mean_of_the_token_ratios_gspo():
    log_ratio = importance_log_ratio(LOG_PROB, LOG_PROB - LOG_RATIO, ROWS, "sequence")
    # exp(mean log r) = (r_1 r_2 r_3)^(1/3): sequence 0's tokens share exp(0.1), sequence 1's exp(0.4).
    assert log_ratio.tolist() == pytest.approx([0.1, 0.1, 0.1, 0.4, 0.4, 0.3])
    assert importance_log_ratio(LOG_PROB, LOG_PROB - LOG_RATIO, ROWS, "token").tolist() == pytest.approx(
        LOG_RATIO.tolist())


def test_gspo_clips_per_sequence_loss_and_gradient_by_hand():
    """Sequence 0 (s = e^0.1, A = +1) is inside the clip; sequence 1 (s = e^0.4 > 1.2, A = +1)
    is clipped, so none of its tokens has a gradient; sequence 2 (s = e^0.3, A = -1) is not
    clipped (a negative advantage is clipped below only). d s / d log pi_t = s / |y|."""
    s0, s2 = math.exp(0.1), math.exp(0.3)
    loss, weights, _ = update(importance_level="sequence")
    assert loss == pytest.approx((3 * -s0 + 2 * -(1 + CLIP) + 1 * s2) / N)
    # Token mean: each of sequence 0's 3 tokens moves all 3 terms by s0 / 3, each worth 1 / N.
    assert weights == pytest.approx([-s0 / N] * 3 + [0.0, 0.0] + [s2 / N])
    # Token-level PPO on the same numbers clips sequence 0's third token alone (e^0.4 > 1.2).
    _, token_weights, _ = update(importance_level="token")
    assert token_weights == pytest.approx([-math.exp(0.1) / N, -math.exp(-0.2) / N, 0.0, 0.0, 0.0,
                                           math.exp(0.3) / N])
    # The paper's objective, a mean over sequences: each token of a sequence of length n weighs 1 / (3 n).
    loss, weights, _ = update(importance_level="sequence", loss_aggregation="sequence_mean")
    assert loss == pytest.approx((-s0 - (1 + CLIP) + s2) / 3)
    assert weights == pytest.approx([-s0 / 9] * 3 + [0.0, 0.0] + [s2 / 3])


def test_cispo_clips_the_weight_and_every_token_keeps_a_gradient_by_hand():
    """Per token ``-sg(clip(r, 0.8, 1.2)) * A * log pi``: the gradient is ``-clip(r) * A / N``,
    also for the tokens PPO's clip silences (r = e^0.4 and e^0.5 with A = +1)."""
    weight = np.clip(np.exp(LOG_RATIO.numpy()), 1 - CLIP, 1 + CLIP)
    loss, weights, _ = update(policy_loss="cispo")
    assert loss == pytest.approx(float(np.mean(-weight * ADVANTAGE.numpy() * LOG_PROB.numpy())))
    assert weights == pytest.approx((-weight * ADVANTAGE.numpy() / N).tolist())
    assert all(w != 0 for w in weights)
    _, clip_weights, _ = update(policy_loss="clip")
    assert clip_weights[2] == 0.0 and clip_weights[3] == 0.0 and clip_weights[4] == 0.0  # PPO: no gradient


def test_cispo_bounds_clip_range_high_and_no_lower_bound_minimax_m1():
    """MiniMax-M1 bounds the weight above only: clip_range=1 leaves [0, 1 + clip_range_high]."""
    agent = OneMinibatchAgent()
    agent.clip_range = lambda progress: 1.0
    clipped_update(agent, policy_loss="cispo", clip_range_high=0.28)
    weight = np.minimum(np.exp(LOG_RATIO.numpy()), 1.28)
    assert weight[4] == pytest.approx(1.28) and weight[1] == pytest.approx(math.exp(-0.2))
    assert agent.policy.log_prob.grad.tolist() == pytest.approx((-weight * ADVANTAGE.numpy() / N).tolist())


def test_cispo_with_the_sequence_ratio_weighs_each_token_by_its_sequences_clipped_ratio():
    """TRL's composition: the weight is the sequence's ratio (GSPO), the log-prob the token's."""
    weight = np.clip(np.exp([0.1, 0.1, 0.1, 0.4, 0.4, 0.3]), 1 - CLIP, 1 + CLIP)
    loss, weights, _ = update(policy_loss="cispo", importance_level="sequence")
    assert loss == pytest.approx(float(np.mean(-weight * ADVANTAGE.numpy() * LOG_PROB.numpy())))
    assert weights == pytest.approx((-weight * ADVANTAGE.numpy() / N).tolist())


def test_the_entropy_bonus_is_ent_coef_times_minus_the_mean_entropy_by_hand():
    """SB3's bonus, ``ent_coef * -mean(entropy)``: each token's entropy has the weight
    ``-ent_coef / N`` (token mean) or ``-ent_coef / (n_sequences * length)`` (sequence mean)."""
    policy_loss, _, no_bonus = update(ent_coef=0.0)
    assert no_bonus == [0.0] * N
    loss, _, weights = update(ent_coef=0.01)
    assert loss == pytest.approx(policy_loss - 0.01 * float(ENTROPY.mean()))
    assert weights == pytest.approx([-0.01 / N] * N)
    _, _, weights = update(ent_coef=0.01, loss_aggregation="sequence_mean")
    assert weights == pytest.approx([-0.01 / 9] * 3 + [-0.01 / 6] * 2 + [-0.01 / 3])


def build(cls, **kwargs):
    """An agent without a model (as ``load`` builds one): enough for its options."""
    return cls(env=None, _init_setup_model=False, **kwargs)


def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="policy_loss must be one of.*Fix"):
        build(LMGRPO, policy_loss="ppo")
    with pytest.raises(ValueError, match="importance_level must be one of.*Fix"):
        build(LMRLOO, importance_level="episode")
    with pytest.raises(ValueError, match="policy_loss must be one of"):
        build(algorithms.LMPPO, policy_loss="gspo")
    with pytest.raises(ValueError, match="policy_loss='cispo' runs in agents.clipped_update.*Fix: drop fast=False"):
        build(algorithms.LMPPO, policy_loss="cispo", fast=False)
    # An option of other algorithms' updates: the error says whose.
    with pytest.raises(ValueError, match=r"'policy_loss' \(an option of ppo, rloo, grpo: a2c's update"):
        check_algorithm_kwargs("a2c", {"policy_loss": "cispo"})
    with pytest.raises(ValueError, match=r"'importance_level' \(an option of rloo, grpo: ppo's update"):
        check_algorithm_kwargs("ppo", {"importance_level": "sequence"})
    with pytest.raises(ValueError, match=r"'ent_coef' \(an option of ppo, a2c, rloo, grpo, nlpo: trpo's update"):
        check_algorithm_kwargs("trpo", {"ent_coef": 0.01})
    check_algorithm_kwargs("grpo", {"policy_loss": "cispo", "importance_level": "sequence", "ent_coef": 0.01})


def small_env():
    return make_text_vec_env("textenv/TextGen-v0", n_envs=4, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model="default", reward="vader", max_prompt_len=12, max_new_tokens=6, device="cpu"))


@pytest.mark.parametrize("algo, options", [
    ("grpo", dict(importance_level="sequence")),
    ("rloo", dict(policy_loss="cispo", clip_range_high=0.28)),
    ("grpo", dict(ent_coef=0.01)),
    ("rloo", dict(ent_coef=0.01, kl_placement="loss")),
], ids=["grpo-gspo", "rloo-cispo", "grpo-entropy-bonus", "rloo-entropy-bonus-kl-in-the-loss"])
def test_the_options_train_and_are_reported(default_model_path, algo, options):
    agent = make_agent(algo, small_env(), group_size=2, seed=0, **options)
    agent.learn(4 * 6)  # one rollout, one update
    logged = agent.logger.name_to_value
    assert logged["train/n_updates"] == agent.n_epochs
    assert np.isfinite(logged["train/loss"]) and np.isfinite(logged["train/entropy_loss"])
    algorithm = resolved_config(agent)["algorithm"]
    for key, value in options.items():
        assert algorithm[key] == value, key
    assert {"policy_loss", "importance_level", "filter_groups", "ent_coef"} <= set(algorithm)


def test_ppo_with_cispo_runs_the_clipped_update_with_its_critic(default_model_path, monkeypatch, tmp_path):
    """SB3's ``PPO.train`` has no place for CISPO: PPO routes it to ``clipped_update`` (value
    term included), whichever the KL placement; the option survives save and load."""
    calls = []
    real_update = algorithms.clipped_update
    monkeypatch.setattr(algorithms, "clipped_update", lambda agent, **kw: calls.append(kw) or real_update(agent, **kw))
    env = small_env()
    agent = make_agent("ppo", env, policy_loss="cispo", n_steps=6, batch_size=12, n_epochs=1, seed=0)
    agent.learn(4 * 6)
    assert calls == [{"policy_loss": "cispo"}]
    logged = agent.logger.name_to_value
    assert np.isfinite(logged["train/value_loss"]) and np.isfinite(logged["train/loss"])
    assert resolved_config(agent)["algorithm"]["policy_loss"] == "cispo"
    agent.save(tmp_path / "ppo-cispo.zip")
    assert load_agent(str(tmp_path / "ppo-cispo.zip"), env=env).policy_loss == "cispo"
    calls.clear()
    make_agent("ppo", env, n_steps=6, batch_size=12, n_epochs=1, seed=0).learn(4 * 6)
    assert calls == []  # the default: SB3's own update


def test_a_loaded_group_agent_keeps_its_loss_options(default_model_path, tmp_path):
    agent = make_agent("grpo", small_env(), group_size=2, seed=0, policy_loss="cispo", importance_level="sequence",
                       ent_coef=0.02)
    agent.save(tmp_path / "grpo.zip")
    loaded = load_agent(str(tmp_path / "grpo.zip"), env=small_env())
    assert (loaded.policy_loss, loaded.importance_level, loaded.ent_coef) == ("cispo", "sequence", 0.02)


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-pass", "checkpointed-chunks"])
def test_without_an_entropy_term_the_update_builds_no_entropy_graph_and_takes_the_same_step(default_model_path,
                                                                                            chunk):
    """``ent_coef=0``: the entropy is computed for the logs only (no graph, nothing to
    back-propagate), and the gradients are those of the loss with its zero-weighted term."""
    from conftest import collect_one_rollout

    agent = make_agent("ppo", small_env(), seed=0, n_steps=6, batch_size=24, n_epochs=1)
    agent.policy.logits_chunk_size = chunk
    batch = next(collect_one_rollout(agent).get(None))
    agent.policy.set_training_mode(True)
    gradients = {}
    for entropy_gradient in (True, False):
        agent.policy.entropy_gradient = entropy_gradient
        agent.policy.zero_grad(set_to_none=True)
        values, log_prob, entropy = agent.policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
        assert entropy.requires_grad is entropy_gradient and log_prob.requires_grad
        loss = -(log_prob * batch.advantages).mean() + 0.0 * -entropy.mean() + ((values.flatten() - batch.returns) ** 2).mean()
        loss.backward()
        gradients[entropy_gradient] = [p.grad.clone() for p in agent.policy.parameters() if p.grad is not None]
    assert len(gradients[True]) == len(gradients[False]) > 0
    for with_entropy, without in zip(gradients[True], gradients[False]):
        torch.testing.assert_close(without, with_entropy, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
def test_the_agent_asks_for_the_entropy_gradient_only_with_an_entropy_term(default_model_path, ent_coef):
    agent = make_agent("grpo", small_env(), group_size=2, seed=0, ent_coef=ent_coef)
    agent.learn(4 * 6)  # one rollout, one update
    assert agent.policy.entropy_gradient is (ent_coef != 0)
    assert np.isfinite(agent.logger.name_to_value["train/entropy_loss"])  # logged either way
