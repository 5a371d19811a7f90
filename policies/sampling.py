"""Exact sampling of next tokens from logits, cheaper than ``torch.multinomial``.

Inverse-CDF sampling: one uniform number per row and a binary search in the
cumulative distribution. It needs ``n`` random numbers instead of the ``n * V`` of
the Gumbel/exponential-race tricks; on CPU it beats SB3's ``Categorical.sample``
(``torch.multinomial``) several-fold at LM vocabularies (``scripts/benchmark.py``
measures it).

Exactness. A float32 CDF cannot resolve probabilities below its spacing (2**-24
on [0.5, 1)): at a 152k vocabulary most tokens are that small, and a float32 CDF
(and a float32 uniform) gives each of them either nothing or several times its
probability (on CUDA, where cumsum accumulates in float32, rounding also builds
up along the row). So the uniform and the CDF are float64, and above
``ONE_LEVEL_MAX_VOCAB`` tokens the CDF is two-level: the total of each block of
~sqrt(V) probabilities, a CDF over the blocks, then a CDF inside the one chosen
block. Each token is then drawn with its float32 softmax probability up to a
relative ~1e-7 (the rounding of its block's float32 total), and there is no
full-width cumsum left to pay for.
"""

from __future__ import annotations

import math

import torch

#: Up to this many tokens a single float64 CDF is faster than the two-level one.
ONE_LEVEL_MAX_VOCAB = 4096


def sample_tokens(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` (``(n, V)``), drawn from ``softmax(logits)``.

    ``-inf`` masks a token (it is never drawn). NaN or ``+inf``, or a row whose
    logits are all ``-inf``, raise ``ValueError``. ``uniform`` (``n`` numbers in
    [0, 1)) replaces the random draw: the result is then the inverse CDF at those
    points (reproducible draws, common random numbers, tests).
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    n, vocab = probs.shape
    if vocab <= ONE_LEVEL_MAX_VOCAB:  # small rows: one float64 CDF is cheapest
        cdf = probs.double().cumsum_(-1)
        u = _uniform_below_total(logits, cdf[:, -1:], generator, uniform)
        return torch.searchsorted(cdf, u, right=True)[:, 0]

    block = 1 << math.ceil(math.log2(vocab) / 2)
    n_full, rest = divmod(vocab, block)
    # Block totals in float32 (pairwise sums: relative error ~1e-7 each; a float64
    # reduction costs up to 10x more on CPU), accumulated in float64.
    sums = probs[:, : n_full * block].view(n, n_full, block).sum(-1)
    if rest:
        sums = torch.cat([sums, probs[:, n_full * block :].sum(-1, keepdim=True)], dim=1)
    block_cdf = sums.double().cumsum_(-1)
    u = _uniform_below_total(logits, block_cdf[:, -1:], generator, uniform)
    b = torch.searchsorted(block_cdf, u, right=True)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    width = block_cdf.gather(1, b) - before

    columns = b * block + torch.arange(block, device=probs.device)
    inside = columns < vocab
    inner_cdf = probs.gather(1, columns.clamp(max=vocab - 1)).masked_fill_(~inside, 0.0).double().cumsum_(-1)
    inner_total = inner_cdf[:, -1:]
    # Where u falls inside the chosen block, on the scale of that block's own CDF.
    target = ((u - before) * (inner_total / width)).clamp_(min=0.0)
    target = torch.minimum(target, torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    return (b * block + torch.searchsorted(inner_cdf, target, right=True))[:, 0]


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean ``(n, V)``: the smallest set of most likely tokens whose mass reaches ``top_p``
    (the most likely token is always in it). NLPO's action mask (``policies.masked``)."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _uniform_below_total(
    logits: torch.Tensor, total: torch.Tensor, generator: torch.Generator | None, uniform: torch.Tensor | None
) -> torch.Tensor:
    """Check the rows' total mass, then one float64 point per row in [0, total)."""
    # NaN and +inf logits, and all-masked rows, make the softmax NaN: one cheap check.
    if not bool((total > 0).all()):
        raise _bad_logits_error(logits, (~(total[:, 0] > 0)).nonzero()[:, 0].tolist())
    if uniform is None:
        u = torch.rand(total.shape, device=total.device, generator=generator, dtype=torch.float64)
    else:
        u = uniform.to(device=total.device, dtype=torch.float64).reshape(total.shape)
    # Strictly below the total, so the search always lands on a token (or block) with
    # positive mass, never past a masked tail.
    return torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))


def _bad_logits_error(logits: torch.Tensor, rows: list[int]) -> ValueError:
    """Say which rows are broken and how (only on the error path, so it may be slow)."""
    details = []
    for row in rows[:5]:
        values = logits[row].float()
        if bool(values.isnan().any()):
            details.append(f"row {row}: NaN")
        elif bool((values == math.inf).any()):
            details.append(f"row {row}: +inf")
        else:
            details.append(f"row {row}: every logit is -inf (all tokens masked)")
    more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
    return ValueError(
        f"Cannot sample tokens: the logits in {'row' if len(rows) == 1 else 'rows'} {rows[:5]}{more} "
        f"of {logits.shape[0]} are not a distribution ({'; '.join(details)}). NaN or +inf logits "
        "usually mean the model diverged (NaN weights or loss: lower the learning rate, clip "
        "gradients, use bf16 rather than fp16) or a logit processor wrote NaN/+inf. -inf is a "
        "valid mask, but at least one token per row must keep a finite logit."
    )


def log_prob_of(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[action]`` per row: one formula for the rollout (the policy's
    ``forward``, the decoder's ``act``) and the update (``chunked_log_prob_entropy``), so
    that the probability ratio is exactly 1 before the first update."""
    return torch.log_softmax(logits, dim=-1).gather(1, actions.reshape(-1, 1).long())[:, 0]
