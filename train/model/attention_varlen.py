"""Packed attention on the GPU without flash-attn: torch's own varlen FlashAttention kernel.

``flash_attention_2`` needs the flash-attn package, which must be built against the exact torch and
CUDA in use. torch >= 2.10 ships the same varlen kernel as ``torch.nn.attention.varlen.varlen_attn``:
all samples of a pack in one launch on the packed ``[T, H, D]`` layout, each attending only to
itself, so attention costs what the samples cost (no dense ``[L, L]`` mask, no per-sample loop).
The sample boundaries come from the position ids, by the rule ``packed_sdpa`` uses
(``train.attention.sample_bounds``: a sample starts at position 0). Whatever the kernel cannot take
(CPU, float32, dropout, a padding or tree mask, generation with a cache) falls through to
``packed_sdpa``, which itself falls through to transformers' sdpa.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface

from vlmtune.train.model.attention import (
    is_packed_call,
    packed_sdpa_attention,
    packed_sdpa_mask,
    sample_starts,
)

PACKED_VARLEN = "packed_varlen"
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample offsets ``[N+1]`` (int32, on the ids' device) and the longest sample's length.

    A sample starts where its position id is 0 (``sample_bounds``' rule, which holds for V2PE ids too).
    """
    pos = position_ids.reshape(-1)
    starts = sample_starts(pos)
    edge = torch.tensor([0, pos.numel()], device=pos.device, dtype=starts.dtype)
    cu = torch.cat([edge[:1], starts, edge[1:]]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


_LAST: list[Any] = [None, -1, None]  # position_ids tensor, its _version, cu_seqlens(...) of it


def _cu_seqlens_once(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` computed once per forward, not once per layer: every layer receives the same
    ``position_ids`` tensor, and each computation waits for the GPU (``nonzero`` and the max length)."""
    if _LAST[0] is position_ids and _LAST[1] == position_ids._version:
        return _LAST[2]
    _LAST[:] = [position_ids, position_ids._version, cu_seqlens(position_ids)]
    return _LAST[2]


@lru_cache(maxsize=1)
def _kernel_options() -> tuple[dict[str, Any], bool, bool]:
    """How this torch's ``varlen_attn`` asks for causal attention, whether it takes ``enable_gqa`` and ``scale``.

    torch 2.10: ``is_causal=True``, no ``scale`` (always 1/sqrt(D)); 2.11: ``window_size=(-1, 0)`` and
    ``scale``; 2.13 adds ``enable_gqa``.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return causal, "enable_gqa" in params, "scale" in params


def kernel_takes_scaling(scaling: float | None, head_dim: int) -> bool:
    """Whether this torch's kernel can apply ``scaling``: any where it takes ``scale``, else only 1/sqrt(D)."""
    return _kernel_options()[2] or scaling is None or abs(scaling * head_dim**0.5 - 1.0) < 1e-6


@lru_cache(maxsize=1)
def varlen_available() -> bool:
    """True when torch has ``varlen_attn`` and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packed_varlen_attention(
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
    usable = (
        is_packed_call(query, key, attention_mask, position_ids)
        and getattr(module, "is_causal", True)
        and dropout == 0.0
        and query.is_cuda
        and query.dtype in _KERNEL_DTYPES
        and varlen_available()
        and kernel_takes_scaling(scaling, query.shape[-1])
    )
    if not usable:
        return packed_sdpa_attention(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_ids=position_ids,
            **kwargs,
        )
    return varlen_packed(query, key, value, position_ids, scaling), None


def varlen_packed(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor,
    scaling: float | None,
    kernel: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of one packed row ``[1, H, T, D]``, each sample on its own: ``[1, T, H, D]``.

    ``kernel`` stands in for ``varlen_attn`` (same signature) where there is none, in CPU tests.
    Where the kernel takes no ``scale``, ``scaling`` must be 1/sqrt(D) (``kernel_takes_scaling``).
    """
    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn as kernel
    causal, native_gqa, takes_scale = _kernel_options()
    groups = query.shape[1] // key.shape[1]
    extra: dict[str, Any] = {"scale": scaling} if takes_scale else {}
    if groups > 1 and native_gqa:
        extra["enable_gqa"] = True
    elif groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    cu, max_len = _cu_seqlens_once(position_ids)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    out = kernel(q, k, v, cu, cu, max_len, max_len, **causal, **extra)
    return out[None]  # [1, T, H, D], the layout transformers' attention functions return


AttentionInterface.register(PACKED_VARLEN, packed_varlen_attention)
AttentionMaskInterface.register(PACKED_VARLEN, packed_sdpa_mask)
