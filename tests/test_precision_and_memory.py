"""Real checkpoints at real scale, on CPU: precision, one device for everything, dropout
off in train mode, gradient checkpointing that works, the update's logits in chunks.
A CUDA test (skipped without a GPU) trains a few steps on the GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from agents import make_agent, make_text_vec_env
from agents.algorithms import warn_if_env_elsewhere
from conftest import PROMPTS, collect_one_rollout

TASK = "textenv/PositiveSentiment-v0"


def first_epoch_log_prob_gap(agent) -> float:
    """max |log pi(a|s) in the update - log pi_old(a|s) stored by the rollout|, before any step."""
    buffer = collect_one_rollout(agent)
    agent.policy.set_training_mode(True)
    gaps = []
    with torch.no_grad():
        for data in buffer.get(agent.batch_size):
            _, log_prob, _ = agent.policy.evaluate_actions(data.observations, data.actions.long().flatten())
            gaps.append((log_prob - data.old_log_prob).abs().max())
    return float(torch.stack(gaps).max())


# -- precision ----------------------------------------------------------------------------------


def test_precisions_keep_float32_master_weights_except_pure_bf16(default_model_path):
    env = make_text_vec_env(TASK, n_envs=4, seed=0, env_kwargs={"device": "cpu"})
    dtypes = {precision: {p.dtype for p in make_agent("ppo", env, precision=precision).policy.lm.parameters()}
              for precision in ("fp32", "bf16-mixed", "bf16")}
    assert dtypes == {"fp32": {torch.float32}, "bf16-mixed": {torch.float32}, "bf16": {torch.bfloat16}}
    with pytest.raises(ValueError, match="precision must be one of .* Fix: use 'fp32'"):
        make_agent("ppo", env, precision="fp16")


def test_small_updates_survive_in_float32_master_weights_and_vanish_in_bf16(default_model_path):
    """One update at lr 1e-6 (Adam: each weight moves by about 1e-6): float32 weights move,
    bf16 weights mostly round back to where they were. Why bf16-mixed keeps float32 weights."""
    moved = {}
    for precision in ("bf16-mixed", "bf16"):
        env = make_text_vec_env(TASK, n_envs=4, seed=0, env_kwargs={"device": "cpu"})
        agent = make_agent("ppo", env, precision=precision, learning_rate=1e-6, n_steps=8, batch_size=32,
                           n_epochs=1, seed=0)
        weight = agent.policy.lm.get_input_embeddings().weight
        before = weight.detach().clone()
        agent.learn(8 * 4)
        moved[precision] = float((weight.detach() != before).float().mean())
    assert moved["bf16-mixed"] > 0.01, moved
    assert moved["bf16"] < moved["bf16-mixed"] / 10, moved


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_rollouts_recompute_old_log_probs_so_the_first_ratio_is_one(default_model_path, precision):
    """The KV-cached decode and the update's whole-sequence forward round differently in
    bf16; after the rollout the old log-probs are recomputed teacher-forced, so the first
    epoch starts at ratio 1 (under fp32 the two paths agree without it)."""
    gaps = {}
    for recompute in (False, None):
        env = make_text_vec_env(TASK, n_envs=8, seed=0, env_kwargs={"device": "cpu"})
        agent = make_agent("ppo", env, precision=precision, recompute_old_log_probs=recompute, n_steps=16, seed=0)
        gaps[recompute] = first_epoch_log_prob_gap(agent)
    assert gaps[False] > 1e-3, gaps  # the cached decode's bf16 rounding: not a ratio of 1
    assert gaps[None] == 0.0, gaps  # the default under bf16: recomputed
    env = make_text_vec_env(TASK, n_envs=8, seed=0, env_kwargs={"device": "cpu"})
    assert first_epoch_log_prob_gap(make_agent("ppo", env, n_steps=16, seed=0)) < 1e-5  # fp32: no need


def test_bf16_mixed_trains_and_learns_on_cpu(default_model_path):
    env = make_text_vec_env(TASK, n_envs=8, seed=0, env_kwargs={"device": "cpu"})
    agent = make_agent("ppo", env, precision="bf16-mixed", n_steps=16, seed=0)
    agent.learn(2 * 16 * 8)
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())
    assert agent.policy.lm.dtype == torch.float32
    assert agent.logger.name_to_value["train/approx_kl"] > 0  # it updated


# -- one device for everything -------------------------------------------------------------------


def tiny_reward_model(folder, tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def module_devices(agent) -> dict[str, set[torch.device]]:
    task = agent.env.task
    return {
        "policy": {p.device for p in agent.policy.parameters()},
        "reference": {p.device for p in task.reference.parameters()},
        "reward model": {p.device for p in task.reward_source.model.parameters()},
        "env state": {agent.env._input_ids.device},
    }


def agent_on(device: str, tmp_path, default_tokenizer, default_model_path):
    from textenv.registration import register_task

    register_task("test/DeviceTask-v0", prompts=PROMPTS, reward=str(tiny_reward_model(tmp_path, default_tokenizer)),
                  max_prompt_len=16, max_new_tokens=4)
    return make_agent("ppo", "test/DeviceTask-v0", device=device, n_steps=4, seed=0)


def test_the_agents_device_reaches_the_reference_and_the_reward_model(tmp_path, default_tokenizer, default_model_path):
    agent = agent_on("cpu", tmp_path, default_tokenizer, default_model_path)
    assert module_devices(agent) == {name: {torch.device("cpu")} for name in module_devices(agent)}


def test_an_env_on_another_device_than_the_policy_is_named_with_the_fix():
    class EnvOnTheGPU:
        def get_attr(self, name):
            return ["cuda:0"] if name == "device" else [None]

    with pytest.warns(UserWarning, match="reference and reward models on cuda:0 while the policy is on cpu.*Fix"):
        warn_if_env_elsewhere(EnvOnTheGPU(), torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_env_elsewhere(EnvOnTheGPU(), torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_the_gpu_keeps_every_module_there(tmp_path, default_tokenizer, default_model_path):
    agent = agent_on("cuda", tmp_path, default_tokenizer, default_model_path)
    assert all(device.type == "cuda" for devices in module_devices(agent).values() for device in devices)
    agent.learn(3 * 4 * agent.env.num_envs)
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())
    bf16 = make_agent("ppo", "test/DeviceTask-v0", device="cuda", precision="bf16-mixed", n_steps=4, seed=0)
    bf16.learn(2 * 4 * bf16.env.num_envs)
    assert bf16.policy.lm.dtype == torch.float32


# -- dropout, gradient checkpointing, chunked logits ---------------------------------------------


def tiny_env(tiny_model_path, n_envs=4):
    return make_text_vec_env("textenv/TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=dict(
        prompts=PROMPTS, model=str(tiny_model_path), reward="vader", max_prompt_len=16, max_new_tokens=6,
        device="cpu"))


def test_dropout_is_off_through_the_config_so_train_mode_is_deterministic(tiny_model_path):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_model_path).attn_pdrop == 0.1  # the checkpoint has dropout
    agent = make_agent("ppo", tiny_env(tiny_model_path), n_steps=8, seed=0)
    config = agent.policy.lm.config
    assert (config.attn_pdrop, config.resid_pdrop, config.embd_pdrop) == (0.0, 0.0, 0.0)
    batch = next(collect_one_rollout(agent).get(None))
    agent.policy.set_training_mode(True)
    assert agent.policy.lm.training  # train mode: what gradient checkpointing needs
    with torch.no_grad():
        first = agent.policy.evaluate_actions(batch.observations, batch.actions.flatten())
        second = agent.policy.evaluate_actions(batch.observations, batch.actions.flatten())
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def gradients_of_one_update(agent, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    agent.policy.set_training_mode(True)
    agent.policy.zero_grad()
    values, log_prob, entropy = agent.policy.evaluate_actions(batch.observations, batch.actions.flatten())
    (log_prob.sum() + entropy.sum() + values.sum()).backward()
    grads = {name: p.grad.clone() for name, p in agent.policy.named_parameters() if p.grad is not None}
    return grads, log_prob.detach(), entropy.detach()


def test_gradient_checkpointing_recomputes_the_body_and_gives_the_same_gradients(tiny_model_path):
    results, block_calls = {}, {}
    for checkpointing in (False, True):
        agent = make_agent("ppo", tiny_env(tiny_model_path), n_steps=8, seed=0,
                           policy_kwargs={"gradient_checkpointing": checkpointing})
        batch = next(collect_one_rollout(agent).get(None))
        calls = []
        # Count the runs of a layer inside the block (module hooks do not fire in a checkpoint's
        # recomputation, so the instance's forward is wrapped, for this test only).
        layer = agent.policy.lm.transformer.h[0].mlp.c_fc
        layer_forward = layer.forward
        layer.forward = lambda *args, **kwargs: calls.append(1) or layer_forward(*args, **kwargs)
        results[checkpointing] = gradients_of_one_update(agent, batch)
        block_calls[checkpointing] = len(calls)
    assert block_calls == {False: 1, True: 2}  # checkpointed: the block's MLP runs again in the backward pass
    plain, checkpointed = results[False], results[True]
    assert plain[0].keys() == checkpointed[0].keys()
    for name in plain[0]:
        torch.testing.assert_close(checkpointed[0][name], plain[0][name], atol=1e-6, rtol=1e-5)


def test_logits_in_chunks_give_the_same_log_probs_entropies_and_gradients(tiny_model_path):
    results = {}
    for chunk in (None, 5):
        agent = make_agent("ppo", tiny_env(tiny_model_path), n_steps=8, seed=0,
                           policy_kwargs={"logits_chunk_size": chunk})
        batch = next(collect_one_rollout(agent).get(None))
        assert len(batch.actions) > 5 * 3  # several chunks
        results[chunk] = gradients_of_one_update(agent, batch)
    (grads, log_prob, entropy), (chunked_grads, chunked_log_prob, chunked_entropy) = results[None], results[5]
    torch.testing.assert_close(chunked_log_prob, log_prob, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked_entropy, entropy, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(chunked_grads[name], grads[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_chunk_size must be a positive number of tokens, 'auto' or None"):
        make_agent("ppo", tiny_env(tiny_model_path), policy_kwargs={"logits_chunk_size": 0})


def bytes_saved_for_backward(agent, batch) -> int:
    """What autograd keeps from the forward pass for the backward (parameters excluded):
    the activation memory an update holds at its peak, counted exactly."""
    total = 0

    def pack(tensor):
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    agent.policy.set_training_mode(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        values, log_prob, entropy = agent.policy.evaluate_actions(batch.observations, batch.actions.flatten())
    return total


def test_chunked_logits_keep_a_chunk_not_the_minibatch_for_the_backward(tmp_path, default_tokenizer):
    """The update's memory follows ``logits_chunk_size``: unchunked, autograd keeps several
    (tokens x vocabulary) tensors; chunked and checkpointed, only the chunks' inputs."""
    from conftest import save_tiny_gpt2

    vocab = 20_000  # a large vocabulary against a 32-wide body: the logits dominate
    model_path = save_tiny_gpt2(tmp_path / "wide-vocab", default_tokenizer, vocab_size=vocab)
    saved = {}
    for chunk in (None, 8):
        agent = make_agent("ppo", tiny_env(model_path), n_steps=8, seed=0, policy_kwargs={"logits_chunk_size": chunk})
        batch = next(collect_one_rollout(agent).get(None))
        saved[chunk] = bytes_saved_for_backward(agent, batch)
    one_logits_tensor = len(batch.actions) * vocab * 4
    assert saved[None] - saved[8] > 2 * one_logits_tensor, saved  # e.g. the log-softmax output and its exp
    assert saved[8] < one_logits_tensor / 2, saved  # the body's activations and each chunk's input only


def test_auto_chunks_make_the_logits_in_one_pass_when_they_fit_the_budget(tmp_path, default_tokenizer):
    """``logits_chunk_size="auto"`` (the default): one pass while the minibatch's logits fit
    ``logits_budget_bytes``, checkpointed chunks of what fits when they do not."""
    from conftest import save_tiny_gpt2
    from policies.lm_policy import LOGITS_BYTES_PER_WORD, auto_logits_chunk_size

    assert auto_logits_chunk_size(50_257) == 1335 and auto_logits_chunk_size(151_936) == 441
    assert auto_logits_chunk_size(10**12) == 1
    vocab = 20_000
    model_path = save_tiny_gpt2(tmp_path / "wide-vocab", default_tokenizer, vocab_size=vocab)
    saved = {}
    for name, chunk, budget in [("one pass", None, None), ("chunks of 8", 8, None),
                                ("auto, fits", "auto", None), ("auto, 8 fit", "auto", 8 * vocab * LOGITS_BYTES_PER_WORD)]:
        agent = make_agent("ppo", tiny_env(model_path), n_steps=8, seed=0, policy_kwargs={"logits_chunk_size": chunk})
        if budget is not None:
            agent.policy.logits_budget_bytes = budget
        batch = next(collect_one_rollout(agent).get(None))
        assert len(batch.actions) > 8 * 2  # several chunks
        saved[name] = bytes_saved_for_backward(agent, batch)
    assert agent.policy.update_logits_chunk(len(batch.actions)) == 8
    assert saved["auto, fits"] == saved["one pass"] and saved["auto, 8 fit"] == saved["chunks of 8"], saved
    assert saved["one pass"] > saved["chunks of 8"], saved
