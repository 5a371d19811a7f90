"""``textenv.lm.slot_decoding`` on its own: one KV-cache slot per parallel episode.

The reference throughout is the model's plain ``forward`` on each episode's tokens
*without any padding* (default positions, no mask): whatever the slot cache does with
left padding, per-row columns, restarts and appended chunks must give the logits of that
forward (fp32, 1e-5). Models are tiny, random and built in memory: a GPT-2 (learned
positions) and a Llama (rotary positions, grouped-query attention).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from textenv.lm.slot_decoding import (
    SlotDecoder,
    additive_mask,
    chunk_additive_mask,
    last_token_index,
    lm_logits,
    positions_of,
)

VOCAB = 48
PAD = 7  # an ordinary token id: padding must be ignored because of the mask, not the id
ATOL = 1e-5


def tiny_lm(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=0, pad_token_id=None)
        return LlamaForCausalLM(config).eval()
    raise ValueError(kind)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_lm(request.param)


@torch.no_grad()
def unpadded_logits(model, tokens: list[int]) -> torch.Tensor:
    """``(len(tokens), V)``: the model's own forward on the bare sequence."""
    return model(input_ids=torch.tensor([tokens])).logits[0].float()


def observation(rows: list[list[int]], prompt_lengths: list[int], max_prompt_len: int, width: int):
    """The env's layout: each row's first ``prompt_lengths[i]`` tokens left-padded into
    ``max_prompt_len`` columns, the rest of the row right after; pad elsewhere."""
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompt_lengths)):
        prompt, generated = row[:p], row[p:]
        ids[i, max_prompt_len - p: max_prompt_len] = torch.tensor(prompt)
        mask[i, max_prompt_len - p: max_prompt_len] = 1
        ids[i, max_prompt_len: max_prompt_len + len(generated)] = torch.tensor(generated, dtype=torch.long)
        mask[i, max_prompt_len: max_prompt_len + len(generated)] = 1
    return ids, mask


def random_tokens(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=generator).tolist()


# --------------------------------------------------------------------- small functions


def test_positions_skip_left_padding_and_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 1]])
    positions = positions_of(mask)
    for row in range(3):
        real = mask[row] == 1
        assert positions[row][real].tolist() == list(range(int(real.sum())))
        first_real = int(real.nonzero()[0])
        assert positions[row][:first_real].tolist() == [0] * first_real  # left padding
    assert last_token_index(mask).tolist() == [4, 5, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_mask_is_zero_where_attended_and_the_dtype_minimum_elsewhere(dtype):
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    additive = additive_mask(mask, dtype)
    assert additive.shape == (2, 1, 1, 4) and additive.dtype == dtype
    lowest = torch.finfo(dtype).min
    for row in range(2):
        for column in range(4):
            expected = 0.0 if mask[row, column] else lowest
            assert additive[row, 0, 0, column].item() == expected


def test_chunk_mask_is_causal_within_the_chunk_and_skips_padding():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    query_columns = torch.tensor([[2, 3, 4], [3, 4, 5]])
    additive = chunk_additive_mask(mask, query_columns, torch.float32)
    assert additive.shape == (2, 1, 3, 6)
    lowest = torch.finfo(torch.float32).min
    for row in range(2):
        for q in range(3):
            for column in range(6):
                attended = bool(mask[row, column]) and column <= int(query_columns[row, q])
                assert additive[row, 0, q, column].item() == (0.0 if attended else lowest), (row, q, column)


# --------------------------------------------------------------------- the slot decoder


def test_decoding_token_by_token_gives_the_logits_of_the_full_forward(model):
    """Prefill left-padded prompts of different lengths, then decode one token per row per
    step: every step's logits equal the unpadded forward's at that token."""
    max_prompt_len, new = 6, 5
    width = max_prompt_len + new
    generator = torch.Generator().manual_seed(1)
    prompt_lengths = [6, 3, 1]
    rows = [random_tokens(generator, p + new) for p in prompt_lengths]
    references = [unpadded_logits(model, row) for row in rows]

    decoder = SlotDecoder(model, n_slots=3, width=width)
    ids, mask = observation([r[:p] for r, p in zip(rows, prompt_lengths)], prompt_lengths, max_prompt_len, width)
    hidden = decoder.prefill_rows(torch.arange(3), ids, mask)
    expected = torch.stack([references[i][p - 1] for i, p in enumerate(prompt_lengths)])
    torch.testing.assert_close(lm_logits(model, hidden), expected, atol=ATOL, rtol=ATOL)

    for step in range(new):
        ids, mask = observation([r[: p + step + 1] for r, p in zip(rows, prompt_lengths)], prompt_lengths,
                                max_prompt_len, width)
        tokens = torch.tensor([r[p + step] for r, p in zip(rows, prompt_lengths)])
        hidden = decoder.step(tokens, ids, mask)
        expected = torch.stack([references[i][p + step] for i, p in enumerate(prompt_lengths)])
        torch.testing.assert_close(lm_logits(model, hidden), expected, atol=ATOL, rtol=ATOL, msg=f"step {step}")


def test_restarting_one_slot_leaves_the_others_alone(model):
    """Row 1 restarts with a prompt shorter than what its slot held (stale keys stay in the
    columns beyond it): the other rows get the very logits of a decoder without the restart,
    and the restarted row decodes its new episode as the full forward does."""
    max_prompt_len, new = 5, 5
    width = max_prompt_len + new
    generator = torch.Generator().manual_seed(2)
    prompt_lengths = [5, 4, 2]
    rows = [random_tokens(generator, p + new) for p in prompt_lengths]
    restarted = random_tokens(generator, 2 + new)  # prompt of 2, then its own tokens

    plain, restarting = SlotDecoder(model, 3, width), SlotDecoder(model, 3, width)
    ids, mask = observation([r[:p] for r, p in zip(rows, prompt_lengths)], prompt_lengths, max_prompt_len, width)
    for decoder in (plain, restarting):
        decoder.prefill_rows(torch.arange(3), ids, mask)
    for step in range(3):
        ids, mask = observation([r[: p + step + 1] for r, p in zip(rows, prompt_lengths)], prompt_lengths,
                                max_prompt_len, width)
        tokens = torch.tensor([r[p + step] for r, p in zip(rows, prompt_lengths)])
        for decoder in (plain, restarting):
            decoder.step(tokens, ids, mask)

    # Step 3: row 1's episode ended; its observation is now the new prompt alone.
    current = [r[: p + 4] for r, p in zip(rows, prompt_lengths)]
    current[1] = restarted[:2]
    lengths = [prompt_lengths[0], 2, prompt_lengths[2]]
    ids, mask = observation(current, lengths, max_prompt_len, width)
    tokens = torch.tensor([r[p + 3] for r, p in zip(rows, prompt_lengths)])
    refill = torch.tensor([False, True, False])
    hidden = restarting.step(tokens, ids, mask, refill=refill)
    ids_plain, mask_plain = observation([r[: p + 4] for r, p in zip(rows, prompt_lengths)], prompt_lengths,
                                        max_prompt_len, width)
    hidden_plain = plain.step(tokens, ids_plain, mask_plain)
    torch.testing.assert_close(hidden[[0, 2]], hidden_plain[[0, 2]], atol=1e-6, rtol=0)
    reference = unpadded_logits(model, restarted)
    torch.testing.assert_close(lm_logits(model, hidden[1]), reference[1], atol=ATOL, rtol=ATOL)

    # Two more decode steps: the restarted row continues its new episode only.
    references = [unpadded_logits(model, r) for r in rows]
    for extra in range(2):
        current = [r[: p + 5 + extra] for r, p in zip(rows, prompt_lengths)]
        current[1] = restarted[: 3 + extra]
        ids, mask = observation(current, lengths, max_prompt_len, width)
        tokens = torch.tensor([row[-1] for row in current])
        logits = lm_logits(model, restarting.step(tokens, ids, mask))
        expected = torch.stack([references[0][len(current[0]) - 1], reference[len(current[1]) - 1],
                                references[2][len(current[2]) - 1]])
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=ATOL, msg=f"after the restart, step {extra}")


def test_extending_a_slot_by_a_chunk_equals_the_full_forward(model):
    """A multi-turn row gains its action and three tokens the env inserted after it; the
    chunk is encoded in one pass (``extend_from``) while the other rows decode one token.
    Then every row decodes one more token as usual."""
    max_prompt_len, new = 4, 8
    width = max_prompt_len + new
    generator = torch.Generator().manual_seed(3)
    prompt_lengths = [4, 2, 3]
    rows = [random_tokens(generator, p + new) for p in prompt_lengths]
    references = [unpadded_logits(model, r) for r in rows]
    decoder = SlotDecoder(model, 3, width)
    ids, mask = observation([r[:p] for r, p in zip(rows, prompt_lengths)], prompt_lengths, max_prompt_len, width)
    decoder.prefill_rows(torch.arange(3), ids, mask)

    taken = [p + 1 for p in prompt_lengths]  # tokens of each row the slot will have seen
    taken[1] += 3  # row 1: its action, then three inserted tokens
    ids, mask = observation([r[:n] for r, n in zip(rows, taken)], prompt_lengths, max_prompt_len, width)
    tokens = torch.tensor([r[p] for r, p in zip(rows, prompt_lengths)])  # the actions
    action_columns = torch.full((3,), max_prompt_len)
    extend_from = torch.tensor([-1, int(action_columns[1]), -1])
    hidden = decoder.step(tokens, ids, mask, extend_from=extend_from)
    expected = torch.stack([references[i][n - 1] for i, n in enumerate(taken)])
    torch.testing.assert_close(lm_logits(model, hidden), expected, atol=ATOL, rtol=ATOL)

    taken = [n + 1 for n in taken]
    ids, mask = observation([r[:n] for r, n in zip(rows, taken)], prompt_lengths, max_prompt_len, width)
    tokens = torch.tensor([r[n - 1] for r, n in zip(rows, taken)])
    hidden = decoder.step(tokens, ids, mask)
    expected = torch.stack([references[i][n - 1] for i, n in enumerate(taken)])
    torch.testing.assert_close(lm_logits(model, hidden), expected, atol=ATOL, rtol=ATOL)


def test_skipped_rows_do_not_change_the_other_rows():
    model = tiny_lm("llama")
    max_prompt_len, width = 3, 6
    generator = torch.Generator().manual_seed(4)
    rows = [random_tokens(generator, 5) for _ in range(2)]
    decoders = [SlotDecoder(model, 2, width) for _ in range(2)]
    ids, mask = observation([r[:3] for r in rows], [3, 3], max_prompt_len, width)
    for decoder in decoders:
        decoder.prefill_rows(torch.arange(2), ids, mask)
    ids, mask = observation([r[:4] for r in rows], [3, 3], max_prompt_len, width)
    tokens = torch.tensor([r[3] for r in rows])
    both = decoders[0].step(tokens, ids, mask)
    only_first = decoders[1].step(tokens, ids, mask, skip=torch.tensor([False, True]))
    torch.testing.assert_close(only_first[0], both[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(lm_logits(model, both), torch.stack([unpadded_logits(model, r)[3] for r in rows]),
                               atol=ATOL, rtol=ATOL)


def test_a_sliding_window_shorter_than_the_width_is_refused():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                           max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    model = MistralForCausalLM(config).eval()
    with pytest.raises(ValueError, match="sliding window"):
        SlotDecoder(model, 2, width=8)
    SlotDecoder(model, 2, width=4)  # within the window: full attention


def test_lm_logits_applies_the_architectures_logit_transform():
    """Granite divides its logits by ``logits_scaling``: ``lm_logits`` on the body's hidden
    states must give the model's own ``forward`` logits."""
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, logits_scaling=4.0,
                           max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    for model in (GraniteForCausalLM(config).eval(), tiny_lm("gpt2")):
        ids = torch.tensor([[3, 9, 11, 4, 20]])
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids).last_hidden_state
            expected = model(input_ids=ids).logits.float()
            logits = lm_logits(model, hidden)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=ATOL)
        if isinstance(model, GraniteForCausalLM):  # the scaling matters: the raw head differs
            raw = model.get_output_embeddings()(hidden)
            assert (raw - expected).abs().max() > 1e-2
