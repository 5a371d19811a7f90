"""What training frees between its phases (issue 22, item 6; the breakdown that found each is
``scripts/bench/memory_breakdown.py``). Each mechanism is checked exactly, not by RSS
thresholds (noisy): which tensors exist when, which calls happen, where glibc puts a block;
and the update is unchanged by them (bit for bit).

- gradients are freed after every optimizer step that was taken, so they never sit beside
  the next minibatch's activations (SB3's update zeroes them only after that forward);
- the rollout's KV caches are freed after its last step, and the next rollout's caches
  decode as a teacher-forced pass scores;
- ``trim_memory``: glibc's mmap threshold is fixed (a block of 128 KiB or more gets its own
  mapping, returned when freed) and the heap is trimmed after every step and when an update
  starts;
- a full fine-tune of a large model on a CPU gets a one-time notice that LoRA is the path.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from agents import make_agent, make_text_vec_env
from conftest import collect_one_rollout
from policies import lm_policy, memory

TASK = "textenv/PositiveSentiment-v0"


def small_agent(**kwargs):
    env = make_text_vec_env(TASK, n_envs=4, seed=0, env_kwargs={"device": "cpu"})
    settings = dict(n_steps=8, batch_size=8, n_epochs=2, seed=0)  # 4 minibatches per epoch
    return make_agent("ppo", env, **{**settings, **kwargs})


def trainable(agent) -> list[torch.nn.Parameter]:
    return [p for p in agent.policy.parameters() if p.requires_grad]


# -- gradients ---------------------------------------------------------------------------------


def test_no_forward_pass_of_the_update_sees_the_last_steps_gradients(default_model_path):
    agent = small_agent()
    collect_one_rollout(agent)
    gradients_at_forward: list[int] = []
    evaluate_actions = agent.policy.evaluate_actions

    def recording(obs, actions):  # the policy's own method, for this test only
        if torch.is_grad_enabled():
            gradients_at_forward.append(sum(p.grad is not None for p in trainable(agent)))
        return evaluate_actions(obs, actions)

    agent.policy.evaluate_actions = recording
    agent.train()
    assert len(gradients_at_forward) == 8  # 2 epochs x 4 minibatches, each after a step but the first
    assert gradients_at_forward == [0] * 8
    assert all(p.grad is None for p in trainable(agent))  # nor does anything after the update


def test_freeing_the_gradients_leaves_the_update_bit_for_bit_the_same(default_model_path):
    updated = {}
    for release in (True, False):
        agent = small_agent()
        if not release:
            agent.policy.release_hook.remove()  # SB3's own update: zero_grad() before each backward
        collect_one_rollout(agent)
        agent.train()
        updated[release] = {name: p.detach().clone() for name, p in agent.policy.named_parameters()}
        if not release:
            assert any(p.grad is not None for p in trainable(agent))  # the last step's gradients stayed
    assert updated[True].keys() == updated[False].keys()
    for name, value in updated[True].items():
        assert torch.equal(value, updated[False][name]), name


def test_a_skipped_step_keeps_its_gradients_to_be_looked_at(default_model_path):
    agent = small_agent()
    for p in trainable(agent):
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="Skipped an update"):
        agent.policy.optimizer.step()
    assert all(p.grad is not None for p in trainable(agent))
    for p in trainable(agent):
        p.grad = torch.ones_like(p)
    agent.policy.optimizer.step()
    assert all(p.grad is None for p in trainable(agent))


# -- the rollout's KV caches -------------------------------------------------------------------


def cache_layers(decoder):
    return [layer for slots in (decoder.slots, decoder.critic_slots) if slots is not None
            for layer in slots.cache.layers]


def test_the_rollout_frees_its_kv_caches_and_the_next_rollout_decodes_right(default_model_path):
    agent = small_agent(n_epochs=1)
    buffer = collect_one_rollout(agent)
    decoder = agent._decoder
    assert cache_layers(decoder) and not any(layer.is_initialized for layer in cache_layers(decoder))
    assert decoder.logits is None and decoder.values is not None  # the values bootstrap GAE
    agent.train()  # new weights: the next rollout's caches must come from them

    callback = agent._init_callback([])
    callback.on_training_start(locals(), globals())
    assert agent.collect_rollouts(agent.env, callback, buffer, agent.n_steps)
    assert agent._decoder is decoder and not any(layer.is_initialized for layer in cache_layers(decoder))
    decoded = buffer.log_probs.copy()
    buffer.recompute_log_probs(agent.policy)  # teacher-forced, with the updated weights
    valid = buffer.token_mask()
    assert np.abs(decoded[valid] - buffer.log_probs[valid]).max() < 1e-5


def test_a_separate_critics_caches_are_freed_too(default_model_path):
    agent = small_agent(n_epochs=1, critic="separate")
    collect_one_rollout(agent)
    decoder = agent._decoder
    assert decoder.critic_slots is not None
    assert not any(layer.is_initialized for layer in cache_layers(decoder))


# -- the C heap ----------------------------------------------------------------------------------


def count_trims(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(lm_policy, "trim_heap", lambda: calls.append(1) or True)
    return calls


@pytest.mark.parametrize("trim_memory, update_trims, rollout_trims",
                         [("phases", 1, 1), ("steps", 1 + 2 * 4, 1), (True, 1 + 2 * 4, 1), (False, 0, 0)])
def test_the_heap_is_trimmed_when_a_phase_starts_and_with_steps_after_every_step(default_model_path, monkeypatch,
                                                                                   trim_memory, update_trims,
                                                                                   rollout_trims):
    """``"phases"`` (default): once when an update starts and once when a rollout starts;
    ``"steps"`` (``True``, as agents saved before it was a mode): after each of the update's
    8 optimizer steps as well; ``False``: never."""
    agent = small_agent(policy_kwargs={"trim_memory": trim_memory})
    collect_one_rollout(agent)
    calls = count_trims(monkeypatch)  # the project's own function, replaced for this test only
    agent.train()
    assert len(calls) == update_trims
    agent.policy.set_training_mode(False)  # a rollout starts
    assert len(calls) == update_trims + rollout_trims
    agent.predict(agent.env.reset())  # SB3 switches to evaluation again: no phase change, no trim
    assert len(calls) == update_trims + rollout_trims
    assert agent.policy.trim_memory == ("steps" if trim_memory is True else trim_memory)
    assert all(p.grad is None for p in trainable(agent))  # gradients are freed either way


def test_an_unknown_trim_mode_is_refused_with_the_modes(default_model_path):
    with pytest.raises(ValueError, match="trim_memory must be one of .*'phases' \\(default\\)"):
        small_agent(policy_kwargs={"trim_memory": "always"})


HEAP_PROBE = """
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("memory", sys.argv[1])
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = memory._libc()
if libc is None or not hasattr(libc, "mallinfo2"):
    print(json.dumps(None))
    sys.exit()
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def new_mappings(size):
    # how many mapped blocks one malloc of size bytes adds (mallinfo2().hblks counts them)
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    added = libc.mallinfo2().hblks - before
    libc.free(block)
    return added

libc.free(libc.malloc(16 << 20))  # freeing a mapped 16 MB block raises glibc's threshold to 16 MB
result = {"8 MB before": new_mappings(8 << 20)}
result["fixed"] = memory.keep_heap_small()
result["trimmed"] = memory.trim_heap()
result["8 MB after"] = new_mappings(8 << 20)
result["200 KB after"] = new_mappings(200 << 10)
result["mapped after the frees"] = libc.mallinfo2().hblks
print(json.dumps(result))
"""


def probe_heap(**environment) -> dict | None:
    """The heap probe in a fresh interpreter (a heap without the test run's free blocks)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", HEAP_PROBE, str(Path(memory.__file__))], capture_output=True,
                          text=True, check=True, env={**env, **environment})
    return json.loads(done.stdout)


def test_after_keep_heap_small_large_blocks_get_their_own_mappings():
    """glibc raises its mmap threshold after large frees (up to 32 MB) and keeps freed
    blocks below it in the heap; fixed at 128 KiB, a new block of that size or more gets
    its own mapping, unmapped when it is freed."""
    result = probe_heap()
    if result is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    assert result["8 MB before"] == 0  # in the heap, under the raised threshold
    assert result["fixed"] and result["trimmed"]
    assert result["8 MB after"] == 1 and result["200 KB after"] == 1


def test_a_users_own_mmap_threshold_stands():
    result = probe_heap(MALLOC_MMAP_THRESHOLD_="33554432")
    if result is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    assert result["fixed"] is False and result["8 MB after"] == 0  # their 32 MB threshold, not ours


# -- LoRA is the path on a CPU -------------------------------------------------------------------


def test_a_full_fine_tune_of_a_large_model_on_a_cpu_is_told_once_that_lora_is_the_path(default_model_path,
                                                                                        monkeypatch):
    # The default model is tiny: lower the size at which the notice is given, for this test.
    monkeypatch.setattr(lm_policy.LMPolicyMixin, "cpu_full_fine_tune_notice_parameters", 1000)
    monkeypatch.setattr(lm_policy.LMPolicyMixin, "_cpu_notice_given", False)
    lora = small_agent(policy_kwargs={"lora": {"r": 4}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect_one_rollout(lora)  # LoRA: nothing to say
    agent = small_agent()
    with pytest.warns(UserWarning, match=r"Full fine-tuning .* on a CPU.*Fix: policy_kwargs=\{'lora': \{'r': 8\}\}"):
        collect_one_rollout(agent)
    another = small_agent()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent.train()
        collect_one_rollout(another)  # once per process


def test_an_update_frees_the_caches_of_a_group_rollout_too(default_model_path):
    """A group rollout (GRPO, RLOO) ends without ``observe_last``: the update frees its
    decoder's caches when it starts, before its first forward pass."""
    env = make_text_vec_env(TASK, n_envs=4, seed=0, env_kwargs={"device": "cpu"})
    agent = make_agent("grpo", env, group_size=2, n_steps=8, batch_size=8, n_epochs=1, seed=0)
    collect_one_rollout(agent)
    decoder = agent._decoder
    assert any(layer.is_initialized for layer in cache_layers(decoder))  # held after the rollout
    held_at_forward: list[bool] = []
    evaluate_actions = agent.policy.evaluate_actions

    def recording(obs, actions):  # the policy's own method, for this test only
        if torch.is_grad_enabled():
            held_at_forward.append(any(layer.is_initialized for layer in cache_layers(decoder)))
        return evaluate_actions(obs, actions)

    agent.policy.evaluate_actions = recording
    agent.train()
    assert held_at_forward and not any(held_at_forward)
