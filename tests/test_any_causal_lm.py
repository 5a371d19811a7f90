"""Any causal LM: a matrix of real architectures (tiny random weights, built offline by
``tests/model_zoo.py``): GPT-2; Llama with a SentencePiece-style tokenizer, no pad token
and bf16 weights; Qwen2 with vocabulary rows padded beyond the tokenizer; Gemma-2 with
logit soft-capping; Granite with logit scaling; a Llama-3-style model whose generation
config lists two EOS ids.

For each: the policy's logits (update path and KV-cached rollout path) equal the model's
own ``forward`` within 1e-5, and so do the slots' after chunks of inserted tokens, every EOS id ends an episode, completions decode as they read
after the prompt, the weights are float32 whatever the checkpoint's dtype, and PPO trains,
saves and loads to the same outputs.
"""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.utils import obs_as_tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents import load_agent, make_agent, make_text_vec_env
from conftest import assert_same_policy_outputs
from policies.observations import unpack_observation

PROMPTS = ["hello world", "the cat sat on the", "a"]


def completion_length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(len(completion)) for completion in completions]


def zoo_env(zoo_model, n_envs: int = 3, seed: int = 0):
    return make_text_vec_env(
        "textenv/TextGen-v0", n_envs=n_envs, seed=seed,
        env_kwargs=dict(prompts=PROMPTS, model=str(zoo_model.path), reward=completion_length_reward,
                        max_prompt_len=12, max_new_tokens=5, device="cpu"),
    )


def own_forward_last_logits(zoo_model, prompt_ids: list[list[int]]) -> torch.Tensor:
    """The checkpoint's own ``forward`` on each unpadded prompt, in float32: ``(n, V)``."""
    model = AutoModelForCausalLM.from_pretrained(zoo_model.path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(torch.tensor([ids])).logits[0, -1] for ids in prompt_ids])


def test_policy_logits_equal_the_models_own_forward(zoo_model):
    env = zoo_env(zoo_model)
    agent = make_agent("ppo", env, seed=0)
    obs = obs_as_tensor(env.reset(), agent.device)
    rows = [env.task.prompt_ids[i] for i in env._prompt_index]
    expected = own_forward_last_logits(zoo_model, rows)
    policy = agent.policy
    with torch.no_grad():
        update_path = policy.action_logits(policy.last_hidden_state(obs))
        decoder = policy.rollout_decoder(env.num_envs, env.task.width)
        decoder.start(*unpack_observation(obs))
    assert update_path.shape == expected.shape == (env.num_envs, zoo_model.vocab_size)
    torch.testing.assert_close(update_path, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder.logits, expected, atol=1e-5, rtol=0)


def test_slots_extended_by_inserted_chunks_equal_the_models_own_forward(zoo_model):
    """``SlotDecoder.step`` with rows that gained several tokens after their action (a
    multi-turn env's reply): a chunk of 1-5 tokens encoded into the slot, beside rows that
    decode one token and a row left out, gives the logits of a full forward of each row."""
    from textenv.lm.slot_decoding import SlotDecoder, lm_logits, positions_of

    model = AutoModelForCausalLM.from_pretrained(zoo_model.path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    n, width, prompt_end = 4, 24, 6
    input_ids = torch.randint(3, zoo_model.vocab_size, (n, width), generator=generator)
    mask = torch.zeros(n, width, dtype=torch.long)
    for row, length in enumerate([3, 6, 2, 4]):  # left-padded prompts
        mask[row, prompt_end - length : prompt_end] = 1
    slots = SlotDecoder(model, n, width)
    slots.prefill_rows(torch.arange(n), input_ids, mask)

    def full_forward_logits(mask: torch.Tensor) -> torch.Tensor:
        last = (mask * torch.arange(width)).argmax(-1)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        return logits[torch.arange(n), last]

    next_column = torch.full((n,), prompt_end)
    for gained in ([1, 4, 1, 5], [3, 1, 2, 1]):  # tokens per row this step: the action, then any reply
        mask = mask.clone()
        for row, count in enumerate(gained):
            mask[row, next_column[row] : next_column[row] + count] = 1
        extend_from = torch.where(torch.tensor(gained) > 1, next_column, -1)
        skip = torch.tensor([False, False, False, gained[3] == 1])  # a row whose result is not needed
        hidden = slots.step(input_ids.gather(1, next_column[:, None])[:, 0], input_ids, mask,
                            extend_from=extend_from, skip=skip)
        expected = full_forward_logits(mask)
        kept = ~skip
        torch.testing.assert_close(lm_logits(model, hidden)[kept], expected[kept], atol=1e-5, rtol=0)
        if bool(skip.any()):  # bring the skipped row up to date for the next step
            slots.prefill_rows(skip.nonzero()[:, 0], input_ids[skip], mask[skip])
        next_column = next_column + torch.tensor(gained)


def test_policy_and_reference_are_float32_whatever_the_checkpoint(zoo_model):
    env = zoo_env(zoo_model)
    agent = make_agent("ppo", env, seed=0)
    assert {p.dtype for p in agent.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in env.task.reference.parameters()} == {torch.float32}
    if zoo_model.kind == "llama-sp":  # saved in bf16, as Llama and Qwen are published
        assert AutoModelForCausalLM.from_pretrained(zoo_model.path).dtype == torch.bfloat16


def test_every_eos_id_ends_the_episode(zoo_model):
    assert zoo_model.eos_token_ids
    for eos in zoo_model.eos_token_ids:
        env = zoo_env(zoo_model)
        assert eos in env.task.eos_token_ids
        env.reset()
        other = next(t for t in range(10, 400) if t not in env.task.eos_token_ids)
        _, _, dones, infos = env.step(np.array([eos, other, other]))
        assert dones.tolist() == [True, False, False]
        assert infos[0]["budget_exhausted"] is False and infos[0]["completion"] == ""


def test_completions_read_as_they_follow_the_prompt(zoo_model):
    """Prompt text + completion text == the decoded whole; for a SentencePiece tokenizer
    the completion's first word keeps its space ("hello world" + " world", not "world")."""
    tokenizer = AutoTokenizer.from_pretrained(zoo_model.path)
    env = zoo_env(zoo_model, n_envs=1)
    env.reset()
    completion_ids = tokenizer(" hello world", add_special_tokens=False)["input_ids"]
    if zoo_model.kind == "llama-sp":
        assert tokenizer.decode(completion_ids[:1]) == "hello"  # what decoding the completion alone gives
    infos = None
    for token in [*completion_ids, min(zoo_model.eos_token_ids)]:
        _, _, dones, infos = env.step(np.array([token]))
        if dones[0]:
            break
    prompt = infos[0]["prompt"]
    prompt_ids = env.task.prompt_ids[PROMPTS.index(prompt)]
    whole = tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    assert prompt + infos[0]["completion"] == whole
    assert infos[0]["completion"].startswith(" hello")


def test_ppo_trains_saves_and_loads_to_the_same_outputs(zoo_model, tmp_path):
    env = zoo_env(zoo_model)
    agent = make_agent("ppo", env, n_steps=8, batch_size=12, n_epochs=2, seed=0, learning_rate=1e-3)
    before = [p.detach().clone() for p in agent.policy.parameters()]
    agent.learn(2 * 8 * env.num_envs)
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))
    agent.save(tmp_path / "agent.zip")
    loaded = load_agent(str(tmp_path / "agent.zip"), env=env)
    assert_same_policy_outputs(agent, loaded, env, atol=1e-6)
