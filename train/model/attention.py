"""Packed attention for the CPU path: one sdpa call per packed sample instead of a dense mask.

transformers turns restarting position ids into a dense [L, L] block-diagonal mask for sdpa, so
a pack of L tokens costs L^2 attention however short its samples are (flash-attention's varlen
kernel does not have that cost, but it needs a GPU). ``packed_sdpa`` reads the sample boundaries
from the position ids (a sample starts where its position id is 0, flash-attention's rule) and runs
causal sdpa on each sample: attention cost grows with the samples' lengths, not the pack's. Anything else
(padding masks, tree masks, generation with a cache) falls through to transformers' sdpa.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "packed_sdpa"


def sample_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Offsets (after the first) where a packed sample starts in a single row: where its position id is 0.

    Not transformers' ``diff != 1`` rule: V2PE's fractional ids (train/model/v2pe.py) step by δ inside a sample,
    but still start every sample at exactly 0 (as flash-attention's ``prepare_fa_kwargs_from_position_ids``
    assumes), and equality with 0 has no rounding to go wrong however long the sample.
    """
    return (position_ids.reshape(-1)[1:] == 0).nonzero().flatten() + 1


def sample_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the packed samples (plus the end) of a single row of position ids."""
    return [0, *sample_starts(position_ids).tolist(), int(position_ids.numel())]


def is_packed_call(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> bool:
    """One packed row with no padding mask and no cache: the samples can be read off the position ids."""
    return (
        attention_mask is None
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
    )


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if not is_packed_call(query, key, attention_mask, position_ids):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    value = repeat_kv(value, query.shape[1] // value.shape[1])
    bounds = sample_bounds(position_ids.reshape(-1))
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
            )
            for s, e in zip(bounds[:-1], bounds[1:])
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def packed_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No dense mask when there is no padding mask (the attention splits the samples itself)."""
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
