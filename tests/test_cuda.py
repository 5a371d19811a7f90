"""The GPU path: what only a CUDA device can check (marked ``cuda``; skipped elsewhere).

``bash scripts/device_check.sh`` runs these on a GPU machine (``python -m pytest -m cuda``),
beside ``tests/test_precision_and_memory.py``'s module-placement test. On a CPU each skips.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import make_agent, make_text_vec_env
from conftest import collect_one_rollout

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TASK = "textenv/PositiveSentiment-v0"


def gpu_agent(precision: str = "fp32", **kwargs):
    env = make_text_vec_env(TASK, n_envs=8, seed=0, env_kwargs={"device": "cuda"})
    return make_agent("ppo", env, device="cuda", precision=precision, n_steps=16, batch_size=64, seed=0, **kwargs)


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("bf16-mixed", 0.1)])
def test_the_kv_cached_decode_scores_as_a_teacher_forced_pass_on_the_gpu(precision, atol, default_model_path):
    """The rollout's log-probs (KV-cached decode on the GPU) against one teacher-forced pass
    over the same segments: equal in fp32; within bf16's rounding under autocast."""
    agent = gpu_agent(precision)
    buffer = collect_one_rollout(agent)
    decoded = buffer.log_probs.copy()
    buffer.recompute_log_probs(agent.policy)
    valid = buffer.token_mask()
    assert valid.sum() > 0
    np.testing.assert_allclose(buffer.log_probs[valid], decoded[valid], atol=atol)


def test_bf16_mixed_keeps_float32_master_weights_and_trains_on_the_gpu(default_model_path):
    agent = gpu_agent("bf16-mixed")
    before = [p.detach().clone() for p in agent.policy.parameters() if p.requires_grad]
    agent.learn(2 * 16 * agent.env.num_envs)
    after = [p for p in agent.policy.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in after)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


def test_lora_on_the_gpu_has_no_reference_copy_and_trains_the_adapters_only(default_model_path):
    agent = gpu_agent("bf16-mixed", policy_kwargs={"lora": {"r": 8}})
    trainable = {name for name, p in agent.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "value_head" in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in agent.policy.named_parameters() if not p.requires_grad}
    agent.learn(16 * agent.env.num_envs)
    assert all(torch.equal(p, frozen[name]) for name, p in agent.policy.named_parameters() if not p.requires_grad)
    assert torch.cuda.max_memory_allocated() > 0
