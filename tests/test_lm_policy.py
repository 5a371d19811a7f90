"""``policies.lm_policy.LMActorCriticPolicy`` on its own, through SB3's policy API.

The policy is built directly (no env, no agent) on tiny random checkpoints saved in a
temporary folder. The reference for every number is the Hugging Face model itself, run
on each state's tokens without padding: its logits give the log-probs and entropies,
its body's last hidden state under the value head gives the values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from transformers import AutoModelForCausalLM

from policies.lm_policy import LMActorCriticPolicy
from policies.sequences import TokenSequences
from model_zoo import save_tiny_lm  # tests/ is on sys.path, as for conftest

VOCAB = 64
MAX_PROMPT_LEN, MAX_NEW_TOKENS = 5, 4
WIDTH = MAX_PROMPT_LEN + MAX_NEW_TOKENS
PAD = 7
ATOL = 1e-5




@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    return save_tiny_lm("gpt2", tmp_path_factory.mktemp("gpt2"))


def spaces_for(vocab: int = VOCAB, width: int = WIDTH):
    observation_space = spaces.Dict({
        "input_ids": spaces.Box(0, vocab - 1, (width,), np.int64),
        "attention_mask": spaces.Box(0, 1, (width,), np.int64),
    })
    return observation_space, spaces.Discrete(vocab)


def make_policy(path: str, learning_rate: float = 1e-3, **kwargs) -> LMActorCriticPolicy:
    observation_space, action_space = spaces_for()
    kwargs.setdefault("value_head_init_std", 1.0)  # values of order 1, so that 1e-5 checks mean something
    torch.manual_seed(0)  # the same value head every time
    return LMActorCriticPolicy(observation_space, action_space, lambda _: learning_rate,
                               model_name_or_path=path, **kwargs)


def states(seed: int = 0) -> list[list[int]]:
    """Token lists of a few states: prompts of 1..5 tokens followed by 0..4 generated tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [(5, 0), (3, 2), (1, 4), (4, 1), (2, 3), (5, 4)]
    return [(p, torch.randint(1, VOCAB, (p + g,), generator=generator).tolist()) for p, g in lengths]


def observations(rows) -> dict[str, torch.Tensor]:
    """The env's layout (left-padded prompt, generated tokens after it) as float tensors,
    as SB3 hands them over (it casts every Box to float)."""
    ids = torch.full((len(rows), WIDTH), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), WIDTH), dtype=torch.long)
    for i, (p, tokens) in enumerate(rows):
        first = MAX_PROMPT_LEN - p
        ids[i, first: first + len(tokens)] = torch.tensor(tokens)
        mask[i, first: first + len(tokens)] = 1
    return {"input_ids": ids.float(), "attention_mask": mask.float()}


def value_head_of(policy) -> torch.nn.Module:
    """The policy's value head, wherever the policy keeps it (found by its name)."""
    heads = [module for name, module in policy.named_modules() if name.split(".")[-1] == "value_head"]
    assert len(heads) == 1, [name for name, _ in policy.named_modules()]
    return heads[0]


@torch.no_grad()
def reference(policy: LMActorCriticPolicy, path: str, rows, actions: torch.Tensor):
    """Values, log-probs and entropies from the checkpoint's own forward on each state's bare
    tokens (no padding, default positions), and the policy's value head."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    values, log_probs, entropies = [], [], []
    for (_, tokens), action in zip(rows, actions):
        output = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
        log_p = torch.log_softmax(output.logits[0, -1].float(), -1)
        log_probs.append(log_p[action])
        entropies.append(-(log_p.exp() * log_p).sum())
        hidden = model.base_model(input_ids=torch.tensor([tokens])).last_hidden_state[0, -1]
        values.append(value_head_of(policy)(hidden)[0])
    return torch.stack(values), torch.stack(log_probs), torch.stack(entropies)


def test_evaluate_actions_equals_the_models_own_forward(tiny_lm_path):
    policy = make_policy(tiny_lm_path)
    rows = states()
    actions = torch.tensor([3, 60, 0, 17, 42, 9])
    with torch.no_grad():
        values, log_prob, entropy = policy.evaluate_actions(observations(rows), actions)
    expected_values, expected_log_prob, expected_entropy = reference(policy, tiny_lm_path, rows, actions)
    assert values.shape == (len(rows), 1) and log_prob.shape == entropy.shape == (len(rows),)
    torch.testing.assert_close(log_prob, expected_log_prob, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(entropy, expected_entropy, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(values[:, 0], expected_values, atol=ATOL, rtol=ATOL)
    assert values.abs().max() > 0.1  # the value head is not ~0: the comparison has teeth
    with torch.no_grad():
        torch.testing.assert_close(policy.predict_values(observations(rows)), values, atol=1e-6, rtol=0)


def test_token_sequences_evaluate_every_step_of_a_row_as_its_own_observation(tiny_lm_path):
    """One row holding a whole episode, read at several columns, gives what the single-state
    observations of those steps give."""
    policy = make_policy(tiny_lm_path)
    rows = states(seed=1)
    obs = observations(rows)
    # Row 5 (prompt 5, 4 generated): its states end at columns 4..7, with the next token as action.
    full_ids, full_mask = obs["input_ids"][5].long(), obs["attention_mask"][5].long()
    columns = torch.tensor([4, 5, 6, 7])
    actions = full_ids[columns + 1]
    sequences = TokenSequences(input_ids=torch.stack([full_ids, obs["input_ids"][2].long()]),
                               attention_mask=torch.stack([full_mask, obs["attention_mask"][2].long()]),
                               token_rows=torch.tensor([0, 0, 0, 0, 1]),
                               token_columns=torch.cat([columns, torch.tensor([MAX_PROMPT_LEN + 3])]))
    all_actions = torch.cat([actions, torch.tensor([11])])
    tokens = rows[5][1]
    step_rows = [(5, tokens[: c - MAX_PROMPT_LEN + 6]) for c in columns.tolist()] + [rows[2]]
    with torch.no_grad():
        values, log_prob, entropy = policy.evaluate_actions(sequences, all_actions)
    expected_values, expected_log_prob, expected_entropy = reference(policy, tiny_lm_path, step_rows, all_actions)
    torch.testing.assert_close(log_prob, expected_log_prob, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(entropy, expected_entropy, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(values[:, 0], expected_values, atol=ATOL, rtol=ATOL)


def test_forward_returns_consistent_actions_values_and_log_probs(gpt2_path):
    policy = make_policy(gpt2_path)
    rows = states(seed=2)
    obs = observations(rows)
    with torch.no_grad():
        actions, values, log_prob = policy(obs, deterministic=True)
        expected_values, expected_log_prob, _ = reference(policy, gpt2_path, rows, actions)
        model = AutoModelForCausalLM.from_pretrained(gpt2_path).eval()
        greedy = [int(model(input_ids=torch.tensor([t])).logits[0, -1].argmax()) for _, t in rows]
    assert actions.tolist() == greedy
    torch.testing.assert_close(log_prob, expected_log_prob, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(values[:, 0], expected_values, atol=ATOL, rtol=ATOL)
    # the SB3 distribution: same log-probs
    with torch.no_grad():
        distribution = policy.get_distribution(obs)
    torch.testing.assert_close(distribution.log_prob(actions), expected_log_prob, atol=ATOL, rtol=ATOL)


def test_chunked_logits_give_the_same_outputs_and_gradients(gpt2_path):
    rows = states(seed=3)
    actions = torch.tensor([1, 2, 3, 4, 5, 6])
    results = []
    for chunk in (None, 4, 1):
        policy = make_policy(gpt2_path, logits_chunk_size=chunk)
        values, log_prob, entropy = policy.evaluate_actions(observations(rows), actions)
        (log_prob.sum() + 0.1 * entropy.sum() + values.sum()).backward()
        gradients = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
        results.append((values.detach(), log_prob.detach(), entropy.detach(), gradients))
    (values, log_prob, entropy, gradients), *chunked = results
    assert len(gradients) == sum(1 for _ in policy.parameters())  # every parameter got a gradient
    for other_values, other_log_prob, other_entropy, other_gradients in chunked:
        torch.testing.assert_close(other_values, values, atol=1e-6, rtol=0)
        torch.testing.assert_close(other_log_prob, log_prob, atol=1e-6, rtol=0)
        torch.testing.assert_close(other_entropy, entropy, atol=1e-6, rtol=0)
        assert other_gradients.keys() == gradients.keys()
        for name in gradients:
            torch.testing.assert_close(other_gradients[name], gradients[name], atol=1e-5, rtol=1e-5, msg=name)


def test_bad_chunk_size_and_precision_are_refused(gpt2_path):
    with pytest.raises(ValueError, match="logits_chunk_size"):
        make_policy(gpt2_path, logits_chunk_size=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        make_policy(gpt2_path, precision="fp16")


def test_precisions(gpt2_path):
    """fp32: float32 weights, exact outputs; bf16-mixed: float32 weights, forward under bf16
    autocast (outputs float32, close to fp32 but not equal); bf16: bf16 body weights; values
    and log-probs float32 in every case."""
    rows = states(seed=4)
    actions = torch.tensor([5, 6, 7, 8, 9, 10])
    outputs = {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        policy = make_policy(gpt2_path, precision=precision)
        body_dtypes = {p.dtype for name, p in policy.named_parameters() if "value_head" not in name}
        assert body_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision
        with torch.no_grad():
            outputs[precision] = policy.evaluate_actions(observations(rows), actions)
        for tensor in outputs[precision]:
            assert tensor.dtype == torch.float32, precision
    exact = outputs["fp32"]
    for precision in ("bf16-mixed", "bf16"):
        for got, expected in zip(outputs[precision], exact):
            torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05, msg=precision)
        assert not torch.equal(outputs[precision][1], exact[1]), f"{precision} computed in fp32"


def test_optimizer_holds_exactly_the_trainable_parameters(gpt2_path):
    policy = make_policy(gpt2_path, learning_rate=3e-4)
    in_optimizer = [p for group in policy.optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len({id(p) for p in in_optimizer})  # none twice
    assert {id(p) for p in in_optimizer} == {id(p) for p in policy.parameters()}
    assert all(p.requires_grad for p in policy.parameters())
    assert [group["lr"] for group in policy.optimizer.param_groups] == [3e-4]


def test_lora_trains_only_the_adapters_and_the_value_head(gpt2_path):
    policy = make_policy(gpt2_path, lora={"r": 4})
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert all("lora_" in name or "value_head" in name for name in trainable), trainable
    assert {id(p) for p in value_head_of(policy).parameters()} == {
        id(p) for name, p in policy.named_parameters() if p.requires_grad and "lora_" not in name}
    assert any("lora_A" in name for name in trainable) and any("lora_B" in name for name in trainable)
    frozen = {name for name, p in policy.named_parameters() if not p.requires_grad}
    assert any("wte" in name for name in frozen)  # the base weights stay frozen
    by_id = {id(p): name for name, p in policy.named_parameters()}
    in_optimizer = [by_id[id(p)] for group in policy.optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(trainable)
    # B = 0 at the start: the LoRA policy computes what the base checkpoint computes
    rows = states(seed=5)
    actions = torch.tensor([1, 2, 3, 4, 5, 6])
    with torch.no_grad():
        values, log_prob, _ = policy.evaluate_actions(observations(rows), actions)
    expected_values, expected_log_prob, _ = reference(policy, gpt2_path, rows, actions)
    torch.testing.assert_close(log_prob, expected_log_prob, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(values[:, 0], expected_values, atol=ATOL, rtol=ATOL)


def test_a_separate_critic_has_its_own_body_and_learning_rate(gpt2_path):
    policy = make_policy(gpt2_path, learning_rate=1e-3, critic="separate", critic_learning_rate=5e-4)
    groups = policy.optimizer.param_groups
    assert len(groups) == 2 and [group["lr"] for group in groups] == [1e-3, 5e-4]
    actor, critic = ({id(p) for p in group["params"]} for group in groups)
    assert not actor & critic
    assert actor | critic == {id(p) for p in policy.parameters() if p.requires_grad}
    critic_names = {name for name, p in policy.named_parameters() if id(p) in critic}
    assert {id(p) for p in value_head_of(policy).parameters()} <= critic
    assert len(critic_names) > 2 and all("value_head" in name or "critic" in name for name in critic_names)
    assert not any("value_head" in name or "critic" in name
                   for name, p in policy.named_parameters() if id(p) in actor)
    # The critic's body starts as a copy of the policy's: its values are the reference's.
    rows = states(seed=6)
    with torch.no_grad():
        values = policy.predict_values(observations(rows))
    expected_values, _, _ = reference(policy, gpt2_path, rows, torch.zeros(len(rows), dtype=torch.long))
    torch.testing.assert_close(values[:, 0], expected_values, atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="critic='separate'"):
        make_policy(gpt2_path, critic_learning_rate=5e-4)


def test_spaces_that_do_not_fit_are_refused(gpt2_path):
    observation_space, _ = spaces_for()
    with pytest.raises(ValueError, match="vocabulary"):
        LMActorCriticPolicy(observation_space, spaces.Discrete(VOCAB + 1), lambda _: 1e-3,
                            model_name_or_path=gpt2_path)
    with pytest.raises(TypeError, match="Discrete"):
        LMActorCriticPolicy(observation_space, spaces.Box(0, 1, (VOCAB,)), lambda _: 1e-3,
                            model_name_or_path=gpt2_path)
    with pytest.raises(TypeError, match="input_ids"):
        LMActorCriticPolicy(spaces.Box(0, VOCAB, (WIDTH,)), spaces.Discrete(VOCAB), lambda _: 1e-3,
                            model_name_or_path=gpt2_path)


def test_train_and_eval_mode_compute_the_same_function(gpt2_path):
    """Dropout is off: the probability ratio is exactly 1 before the first update, even for
    a checkpoint saved with dropout on (GPT-2's default config has 0.1 everywhere)."""
    policy = make_policy(gpt2_path)
    rows = states(seed=7)
    actions = torch.tensor([1, 2, 3, 4, 5, 6])
    with torch.no_grad():
        policy.set_training_mode(False)
        evaluation = policy.evaluate_actions(observations(rows), actions)
        policy.set_training_mode(True)
        training = policy.evaluate_actions(observations(rows), actions)
    for a, b in zip(evaluation, training):
        assert torch.equal(a, b)
