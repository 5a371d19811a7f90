"""``policies.sampling.sample_tokens``: exact inverse-CDF sampling, and loud failures on bad logits."""

from __future__ import annotations

import math

import pytest
import torch

from policies.sampling import sample_tokens

QWEN_VOCAB = 152_064
HEAD, TAIL = 3, 2  # heavy tokens at the start (frequent BPE tokens have low ids) and at the end


def _reference_cdf(logits: torch.Tensor) -> torch.Tensor:
    """The float64 CDF of ``softmax(logits)`` (one row), normalised to end at 1."""
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    return cdf / cdf[-1]


def _tiny_tail_logits(vocab: int = QWEN_VOCAB) -> torch.Tensor:
    """``vocab`` logits: HEAD heavy tokens (mass ~0.6), then tiny ones, then TAIL heavy tokens.

    Each tiny token has probability 2**-24 / 3, a third of float32's spacing on
    [0.5, 1), where the CDF sits while the tiny tokens are summed (the head holds
    more than half the mass). A float32 CDF (or a float32 uniform) gives such a token
    either no probability or 3x its own, although the tail's total stays right.
    """
    n_tiny = vocab - HEAD - TAIL
    p_tiny = 2.0**-24 / 3
    # Z = (HEAD + TAIL) + n_tiny * e^L and e^L / Z = p_tiny; solve for e^L.
    tiny_logit = math.log(p_tiny * (HEAD + TAIL) / (1 - n_tiny * p_tiny))
    logits = torch.full((1, vocab), tiny_logit)
    logits[0, :HEAD] = 0.0
    logits[0, -TAIL:] = 0.0
    return logits


def _first_uniform_reaching(logits: torch.Tensor, tokens: torch.Tensor, around: torch.Tensor) -> torch.Tensor:
    """For each token k, the smallest u with ``sample_tokens(u) >= k`` (bisection, float64).

    Inverse-CDF sampling is monotone in u, so the share of [0, 1) that maps to token k,
    its probability under the sampler, is the distance between two such boundaries.
    The search starts within 1e-6 of ``around`` (where the float64 CDF puts them).
    """
    rows = logits.expand(len(tokens), -1)
    low, high = (around - 1e-6).clamp(min=0.0), (around + 1e-6).clamp(max=1 - 2.0**-53)
    assert (sample_tokens(rows, uniform=low) < tokens).all() and (sample_tokens(rows, uniform=high) >= tokens).all()
    for _ in range(24):  # 2e-6 / 2**24 ~ 1e-13: 0.001% of a tiny token's probability
        middle = (low + high) / 2
        reached = sample_tokens(rows, uniform=middle) >= tokens
        high, low = torch.where(reached, middle, high), torch.where(reached, low, middle)
    return high


@pytest.mark.parametrize("vocab", [4_096, QWEN_VOCAB])  # one- and two-level CDF
def test_every_token_gets_its_probability(vocab):
    logits = _tiny_tail_logits(vocab)
    probs = torch.softmax(logits[0].double(), -1)
    cdf = _reference_cdf(logits[0])
    assert 0.5 < cdf[HEAD - 1] and cdf[-TAIL - 1] < 1.0  # the tail is summed on [0.5, 1)
    tiny = torch.linspace(HEAD + 1, vocab - TAIL - 2, 12).round().long()
    tokens = torch.cat([tiny, tiny + 1, torch.tensor([1, vocab - 1])])
    boundaries = _first_uniform_reaching(logits, tokens, cdf[tokens - 1])
    n = len(tiny)
    sampler_probability = torch.cat([
        boundaries[n : 2 * n] - boundaries[:n],  # tiny token k: from its boundary to k + 1's
        boundaries[-2:-1],  # token 0: everything below token 1's boundary
        1 - boundaries[-1:],  # the last token: everything above its boundary
    ])
    expected = torch.cat([probs[tiny], probs[:1], probs[-1:]])
    relative_error = (sampler_probability / expected - 1).abs()
    assert relative_error.max() < 1e-4, (
        f"sampling probabilities differ from the softmax by up to {relative_error.max().item():.0%}: "
        f"{sampler_probability[:4].tolist()} for tokens {tokens[:4].tolist()}, expected {expected[:4].tolist()}"
    )


def test_fixed_uniforms_choose_the_float64_reference_token_at_a_qwen_sized_vocabulary():
    # Many small-mass tokens, then a few large-mass ones at the end of the vocabulary.
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, QWEN_VOCAB, generator=generator) * 2
    logits[0, -4:] = torch.tensor([12.0, 12.5, 13.0, 13.5])
    cdf = _reference_cdf(logits[0])
    uniform = torch.rand(1_000, generator=generator, dtype=torch.float64)
    uniform = torch.cat([uniform, torch.tensor([0.0, 1 - 2.0**-53], dtype=torch.float64)])
    expected = torch.searchsorted(cdf, uniform[:, None], right=True)[:, 0]
    # Leave out uniforms within 1e-6 of a boundary, where float32 logits cannot decide.
    clear = ((uniform - cdf[expected - 1].where(expected > 0, 0.0)) > 1e-6) & ((cdf[expected] - uniform) > 1e-6)
    assert clear.sum() > 500 and (expected[clear] < QWEN_VOCAB - 4).sum() > 150
    drawn = sample_tokens(logits.expand(len(uniform), -1), uniform=uniform)
    wrong = ((drawn != expected) & clear).nonzero()[:, 0]
    assert len(wrong) == 0, (
        f"{len(wrong)} fixed uniforms chose another token than the float64 CDF, e.g. "
        f"u={uniform[wrong[0]].item()!r}: token {drawn[wrong[0]].item()} instead of {expected[wrong[0]].item()}"
    )


def test_empirical_frequencies_at_a_qwen_sized_vocabulary():
    # ~152k tiny-mass tokens (0.4 of the mass together), then four large-mass ones.
    logits = torch.zeros(1, QWEN_VOCAB)
    tail_mass = torch.tensor([0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    logits[0, -4:] = torch.log(tail_mass / 0.4 * (QWEN_VOCAB - 4)).float()
    probs = torch.softmax(logits[0].double(), -1)
    generator = torch.Generator().manual_seed(0)
    n_draws, chunk = 2_048, 256
    draws = torch.cat([sample_tokens(logits.expand(chunk, -1), generator=generator) for _ in range(n_draws // chunk)])
    counts = torch.bincount(draws, minlength=QWEN_VOCAB).double()
    quarters = torch.arange(QWEN_VOCAB - 4).chunk(4)
    groups = {f"token {t}": torch.tensor([t]) for t in range(QWEN_VOCAB - 4, QWEN_VOCAB)}
    groups.update({f"tiny tokens, quarter {i}": ids for i, ids in enumerate(quarters)})
    for name, ids in groups.items():
        p = probs[ids].sum().item()
        observed = counts[ids].sum().item() / n_draws
        standard_error = math.sqrt(p * (1 - p) / n_draws)
        assert abs(observed - p) <= 5 * standard_error, (
            f"{name}: frequency {observed:.4f}, softmax probability {p:.4f} (standard error {standard_error:.4f})"
        )


def test_draws_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, -30.0, 1.0]]).expand(200_000, -1)
    tokens = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(tokens, minlength=5).double() / logits.shape[0]
    torch.testing.assert_close(frequency, torch.softmax(logits[0].double(), -1), atol=4e-3, rtol=0)
    assert frequency[3] == 0  # a token with probability ~1e-14 is (practically) never drawn


# Both code paths: one float64 CDF (small vocabularies) and the two-level one.
VOCABS = [300, 20_000]


@pytest.mark.parametrize("vocab", VOCABS)
def test_uniforms_at_the_ends_never_choose_a_masked_token(vocab):
    logits = torch.full((4, vocab), -math.inf)
    logits[:, 2:5] = torch.tensor([0.5, 3.0, -1.0])
    uniform = torch.tensor([0.0, 0.5, 1 - 2.0**-53, 1 - 2.0**-24], dtype=torch.float64)
    assert sample_tokens(logits, uniform=uniform).tolist() == [2, 3, 4, 4]


@pytest.mark.parametrize("vocab", VOCABS)
def test_neg_inf_is_a_mask_only_finite_tokens_are_drawn(vocab):
    generator = torch.Generator().manual_seed(1)
    rows = 200
    logits = torch.randn(rows, vocab, generator=generator)
    masked = torch.rand(rows, vocab, generator=generator) < 0.9
    masked[:, :5] = True  # never all masked: keep a random survivor per row
    masked[torch.arange(rows), torch.randint(5, vocab, (rows,), generator=generator)] = False
    logits[masked] = -math.inf
    tokens = sample_tokens(logits.repeat(10, 1), generator=generator)
    assert not masked.repeat(10, 1).gather(1, tokens[:, None]).any()


def test_masked_distribution_matches_the_softmax_of_the_rest():
    logits = torch.tensor([[2.0, -math.inf, 0.0, -1.0, -math.inf]]).expand(100_000, -1)
    tokens = sample_tokens(logits, generator=torch.Generator().manual_seed(2))
    frequency = torch.bincount(tokens, minlength=5).double() / logits.shape[0]
    expected = torch.softmax(logits[0].double(), -1)
    torch.testing.assert_close(frequency, expected, atol=5e-3, rtol=0)
    assert frequency[1] == 0 and frequency[4] == 0


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("bad, word", [(math.nan, "NaN"), (math.inf, r"\+inf")])
def test_nan_or_inf_logits_raise_naming_the_rows(bad, word, vocab):
    logits = torch.randn(5, vocab)
    logits[3, 7] = bad
    logits[1, 0] = bad
    with pytest.raises(ValueError, match=rf"rows? \[1, 3\].*{word}.*diverged"):
        sample_tokens(logits)


@pytest.mark.parametrize("vocab", VOCABS)
def test_a_row_of_only_neg_inf_raises(vocab):
    logits = torch.randn(3, vocab)
    logits[2] = -math.inf
    with pytest.raises(ValueError, match=r"row 2\b.*every logit is -inf.*at least one token"):
        sample_tokens(logits)


def test_half_precision_logits_and_a_tiny_vocabulary():
    tokens = sample_tokens(torch.tensor([[0.0, 30.0], [30.0, 0.0]], dtype=torch.bfloat16))
    assert tokens.tolist() == [1, 0] and tokens.dtype == torch.long
