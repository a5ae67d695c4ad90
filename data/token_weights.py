"""Per-token loss weights: token/sample/square averaging, computed where batches are built.

InternVL2.5/3 weight each sample's token losses by 1/x^p, x its number of supervised tokens:
p = 0 ("token": every token counts the same, long answers dominate), p = 1 ("sample": every
sample counts the same, short answers dominate), p = 0.5 ("square": InternVL's compromise, the
InternVL2.5 report, section 4.3). The weighted sum is divided by the sum of the weights over the
*whole optimizer step* (all packs, micro-batches, accumulation steps and data-parallel ranks), so
the gradient does not depend on how the samples were split; peers divide per micro-batch, which
makes the effective weighting depend on the packing.

The weights live on the data side because the collate functions attach them to every batch (one
pass over the labels); the objectives only read them.
"""

from __future__ import annotations

import torch

from vlmtune.data.conversation import IGNORE_INDEX

_EXPONENT: dict[str, float] = {"token": 0.0, "square": 0.5, "sample": 1.0}


def reduction_exponent(reduction: str) -> float:
    """The p of 1/x^p for a reduction name; unknown names are a clear error."""
    try:
        return _EXPONENT[reduction]
    except KeyError:
        raise ValueError(f"loss_reduction must be one of {sorted(_EXPONENT)}, got {reduction!r}") from None


def per_token_weight(num_tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weight 1/x^p given to each supervised token of a sample with x supervised tokens (0 if x = 0)."""
    x = num_tokens.to(torch.float64)
    w = x.clamp(min=1.0).pow(-reduction_exponent(reduction))
    return torch.where(x > 0, w, torch.zeros_like(w))


def loss_normaliser(num_tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum of all token weights, x * 1/x^p per sample: the divisor that makes the loss a weighted mean."""
    return (num_tokens.to(torch.float64) * per_token_weight(num_tokens, reduction)).sum()


def shift_targets(labels: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Next-token targets for a packed row: position t predicts labels[t+1] of the same sample.

    The last position of every sample gets IGNORE_INDEX so that nothing is learnt across a
    pack boundary (a sample's last token must not predict the next sample's first token).
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    ends = torch.cumsum(torch.tensor(lengths), 0) - 1
    targets[..., ends] = IGNORE_INDEX
    return targets


def token_weights(
    targets: torch.Tensor, lengths: list[int], reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position weights for a packed row of shifted targets, and each sample's supervised count."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    supervised = targets != IGNORE_INDEX
    counts = torch.zeros(len(lengths), dtype=torch.long).index_add_(0, seg, supervised.long())
    weights = per_token_weight(counts, reduction)[seg].to(torch.float32) * supervised
    return weights, counts
