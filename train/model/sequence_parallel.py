"""DeepSpeed-Ulysses sequence parallelism for the language model (``train.sequence_parallel_size``).

A 64-frame video (16k+ image tokens) or a long document needs more context than one GPU holds. Ulysses
(Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv:2309.14509) splits a sequence over the P ranks of a
sequence-parallel (SP) group: each rank runs the language model on a contiguous 1/P of the tokens, and each
attention layer trades the sequence shard for a head shard with one all-to-all (``[S/P, H] -> [S, H/P]``),
attends over the whole sequence for its heads, and trades back. Everything else in a decoder layer is per
token, so RoPE reads the local position ids as they are (V2PE's fractional ids too).

Why not DeepSpeed's HF wrapper (``deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF``):
it replaces the attention function table globally, which InternViT's attention also uses, and its data
adapter refuses ``pixel_values`` (DeepSpeed issue #7834). So, as ms-swift does, the split happens here
*after* the vision features (encoded a share of the tiles per rank, then gathered: see Decisions) are
merged into the embeddings (`train.model.forward.forward_logits`), and only the LLM's layers get the
Ulysses attention (``config.text_config``; the vision tower keeps its own). The all-to-all is DeepSpeed's
(``deepspeed.sequence.layer._SeqAllToAll``, works with gloo on CPU), and so are the groups
(``parallel_state_sp``: consecutive ranks).

The gradient: each rank's loss is the *share* of its slice (its tokens' terms over the step's global
normaliser; a term of the whole sample, such as MPO's preference loss on the all-reduced log-prob sums,
1/P of it on each rank), so the shares add up over the group to the un-split loss, and the loop's usual
scale (``gas * world``) with DeepSpeed's usual average over all world ranks gives the un-split gradient:
the SP group is not given to ``deepspeed.initialize``. Given it as ``mpu``, DeepSpeed 0.19.8 divides by
world / P instead in ZeRO-0/1/2 and ZeRO-3's all-reduce path but by the world in ZeRO-3's default
reduce-scatter (``coalesced_collectives.reduce_scatter_coalesced``): measured at P = 2, a ZeRO-3 step
came out half the gradient.

Decisions:
- The vision tower's work is split too (`train.model.forward.encode_images`): each SP rank encodes a
  contiguous share of the batch's tiles (`tile_bounds`: ceil or floor of n / P, uneven counts allowed) and
  the projected features are all-gathered (`gather_tile_features`), so every rank merges the same whole
  row's features and takes its slice's as before. The backward sums over the group the gradients on each
  rank's own tiles: every rank's loss is a share and the shares add up to the un-split loss, so a tile's
  feature gradient is the sum of the ranks' (no 1/P), and DeepSpeed's average over the world then gives the
  un-split vision gradient, as for the LLM's weights. Vision compute and activations are divided by P; the
  price is one all-gather of the features forward and one all-reduce of their gradient backward (the size of
  the row's image embeddings, [n, T, H]). ZeRO-3's rule that every rank calls the same modules in the same
  order holds: a rank whose share is empty (fewer tiles than ranks) runs the tower on one blank tile, as a
  text-only batch does, and its features enter the gather, whose backward gives them an exact zero, so the
  backward also visits the tower on every rank (measured under ZeRO-3 on 2 CPU ranks: a rank that skips the
  tower's forward hangs the parameter gathers). Tested equal to the one-rank run, odd tile counts and one
  tile over two ranks included, and under ZeRO-3 (tests/train/dist_sp_check.py).
- Supported core attention: ``packed_sdpa`` and ``packed_varlen`` (both read the packed samples off the
  whole row's position ids, which every rank has: no gather needed). ``sdpa``/``eager`` build their mask
  from the local shard's ids and are refused, as are flash_attention_2/3 (not verified under SP here: use
  ``packed_varlen``, torch's own varlen flash kernel). An MPO tree's dense mask is applied over the whole
  row on the head shard.
- Heads must divide by P. KV heads must divide by P, or P by them: with fewer KV heads than ranks each
  KV head is replicated P / KV times before the all-to-all (DeepSpeed's ulysses_sp rule), so every rank
  gets the KV head its query heads use; the copies' gradients sum back into the one head.
- SP applies only inside an objective's training forward (`sequence_parallel_forward`): evaluation shards
  its samples by rank and must not split them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface

from vlmtune.train.model.attention import PACKED_SDPA, packed_sdpa_attention, packed_sdpa_mask
from vlmtune.train.model.attention_varlen import PACKED_VARLEN, packed_varlen_attention
from vlmtune.train.model.unwrap import unwrap

ULYSSES_PREFIX = "ulysses_"
#: model.attn_implementation values the Ulysses attention wraps (it runs them on its head shard)
SP_ATTENTION = {PACKED_SDPA: packed_sdpa_attention, PACKED_VARLEN: packed_varlen_attention}
#: where `enable_sequence_parallel` records the SP group on the model instance (not in its config.json)
SP_ATTR = "vlmtune_sequence_parallel"


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """This rank's SP group: ``size`` ranks that hold the same parameters and see the same samples."""

    group: Any  # torch.distributed ProcessGroup
    size: int
    rank: int

    def __deepcopy__(self, memo: dict) -> SequenceParallel:
        return self  # a copy of the model (MPO's frozen reference) shares the group; groups cannot be copied


def shard_bounds(length: int, size: int, rank: int) -> tuple[int, int, int]:
    """(start, end, padded length) of ``rank``'s contiguous slice of a row of ``length`` tokens padded to a
    multiple of ``size``: every rank gets ``padded / size`` tokens (the all-to-all needs equal shards)."""
    padded = -(-length // size) * size
    chunk = padded // size
    return rank * chunk, (rank + 1) * chunk, padded


def check_sequence_parallel(size: int, heads: int, kv_heads: int, attn_implementation: str) -> None:
    """Refuse at start what the all-to-all cannot split, naming the numbers."""
    if size < 1:
        raise ValueError(f"train.sequence_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if attn_implementation not in SP_ATTENTION:
        raise ValueError(
            f"train.sequence_parallel_size={size} with model.attn_implementation={attn_implementation!r}: "
            f"sequence parallelism wraps {' or '.join(SP_ATTENTION)} (they read packed samples off the whole "
            "row's position ids); sdpa/eager build their masks from one rank's shard and flash_attention_2/3 "
            "are not verified under it. Set model.attn_implementation=packed_varlen (GPU) or packed_sdpa"
        )
    check_heads(size, heads, kv_heads)


def check_heads(size: int, heads: int, kv_heads: int) -> None:
    """The heads (and KV heads) an SP group of ``size`` can split, or a refusal naming the numbers."""
    if heads % size:
        raise ValueError(
            f"train.sequence_parallel_size={size} does not divide the LLM's {heads} attention heads: "
            "each rank of the group attends with heads / size of them"
        )
    if kv_heads % size and size % kv_heads:
        raise ValueError(
            f"train.sequence_parallel_size={size} and the LLM's {kv_heads} key/value heads: one must divide "
            f"the other (fewer KV heads than ranks are replicated {size} / {kv_heads} times, which must be whole)"
        )


def check_world(size: int, world: int) -> None:
    if size < 1 or world % size:
        raise ValueError(
            f"train.sequence_parallel_size={size} must divide the world size {world} (ranks x nodes): the world "
            "is split into world / size data-parallel groups of size ranks each"
        )


def data_parallel_rank(rank: int, world: int, size: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world): the stream's shard. DeepSpeed's SP groups are consecutive
    ranks (``parallel_state_sp``: ranks ``[i*size, (i+1)*size)``), so the ranks of one group read one shard."""
    check_world(size, world)
    return rank // size, world // size


def sequence_parallel_group(size: int) -> SequenceParallel:
    """This rank's group of DeepSpeed's SP groups (``parallel_state_sp``: consecutive ranks), made once per
    process (every rank must call this: creating groups is a collective); a second run reuses them."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as groups

    if groups._SEQUENCE_PARALLEL_GROUP is None:
        groups.initialize_sequence_parallel(sequence_parallel_size=size)
    elif groups.get_sequence_parallel_world_size() != size:
        raise ValueError(
            f"this process already has sequence-parallel groups of {groups.get_sequence_parallel_world_size()} "
            f"ranks; train.sequence_parallel_size={size} needs a new process"
        )
    return SequenceParallel(groups.get_sequence_parallel_group(), size, groups.get_sequence_parallel_rank())


def enable_sequence_parallel(model: torch.nn.Module, size: int) -> SequenceParallel | None:
    """Give the LLM's layers (only them) the Ulysses attention and record the SP group on ``model``.

    Refuses a head count, KV head count or attention implementation it cannot split. Size 1: nothing.
    """
    inner = unwrap(model)
    text = inner.config.text_config
    attn = text._attn_implementation.removeprefix(ULYSSES_PREFIX)
    heads = text.num_attention_heads
    check_sequence_parallel(size, heads, getattr(text, "num_key_value_heads", None) or heads, attn)
    if size == 1:
        return None
    import torch.distributed as dist

    check_world(size, dist.get_world_size())
    sp = sequence_parallel_group(size)
    inner.set_attn_implementation({"text_config": ULYSSES_PREFIX + attn})
    setattr(inner, SP_ATTR, sp)
    return sp


_ACTIVE: contextvars.ContextVar[SequenceParallel | None] = contextvars.ContextVar(
    "vlmtune_sequence_parallel", default=None
)


def sequence_parallel_of(model: torch.nn.Module) -> SequenceParallel | None:
    """The SP group `enable_sequence_parallel` gave ``model`` (under any wrapper), or None."""
    return getattr(unwrap(model), SP_ATTR, None)


@contextmanager
def sequence_parallel_forward(model: torch.nn.Module) -> Iterator[SequenceParallel | None]:
    """Within it, `forward_logits` splits rows over ``model``'s SP group (the policy's and the reference's
    forwards alike); yields the group, or None when ``model`` has none."""
    sp = sequence_parallel_of(model)
    token = _ACTIVE.set(sp)
    try:
        yield sp
    finally:
        _ACTIVE.reset(token)


def active_sequence_parallel() -> SequenceParallel | None:
    return _ACTIVE.get()


def tile_bounds(count: int, size: int, rank: int) -> tuple[int, int]:
    """(start, end) of ``rank``'s contiguous share of ``count`` tiles over ``size`` ranks: the first
    ``count % size`` ranks take one more (``torch.tensor_split``'s rule); a share may be empty."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


class _GatherTiles(torch.autograd.Function):
    """All-gather of the ranks' tile features; backward: the group's sum of the gradients on this rank's
    tiles (every rank's loss is a share of the un-split loss, so the sum is the un-split gradient)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sp: SequenceParallel, count: int) -> torch.Tensor:
        import torch.distributed as dist

        bounds = [tile_bounds(count, sp.size, r) for r in range(sp.size)]
        start, end = bounds[sp.rank]
        width = bounds[0][1] - bounds[0][0]  # the largest share: all_gather takes equal shapes
        send = local.new_zeros((width, *local.shape[1:]))
        send[: end - start] = local[: end - start]
        parts = [torch.empty_like(send) for _ in range(sp.size)]
        dist.all_gather(parts, send, group=sp.group)
        ctx.sp, ctx.start, ctx.end, ctx.local_shape = sp, start, end, local.shape
        return torch.cat([part[: e - s] for part, (s, e) in zip(parts, bounds)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.sp.group)
        out = grad.new_zeros(ctx.local_shape)  # a blank tile's rows (an empty share) stay exactly 0
        out[: ctx.end - ctx.start] = grad[ctx.start : ctx.end]
        return out, None, None


def gather_tile_features(local: torch.Tensor, sp: SequenceParallel, count: int) -> torch.Tensor:
    """The features of all ``count`` tiles [count, T, H] on every rank of ``sp``, from each rank's share
    (`tile_bounds`) ``local`` [share, T, H]; a rank with an empty share passes its blank tile's [1, T, H],
    which receives a zero gradient. Every rank of the group must call it (a collective)."""
    return _GatherTiles.apply(local, sp, count)


def sp_all_reduce(values: torch.Tensor, sp: SequenceParallel | None) -> torch.Tensor:
    """Sum over the SP group with a gradient: backward sums the upstream gradients of every rank, so each
    rank's local terms get the derivative of the group's total loss (MPO's per-pair log-prob sums)."""
    if sp is None:
        return values
    import torch.distributed.nn.functional as dist_nn

    return dist_nn.all_reduce(values, group=sp.group)


def owned(
    sp: SequenceParallel | None, positions: torch.Tensor, input_ids: torch.Tensor
) -> torch.Tensor | None:
    """Which of ``positions`` (of the row ``input_ids`` [1, L]) lie in this rank's slice; None without SP."""
    if sp is None:
        return None
    _check_one_row(input_ids, None)
    start, end, _ = shard_bounds(input_ids.shape[-1], sp.size, sp.rank)
    return (positions >= start) & (positions < end)


def _check_one_row(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if input_ids.shape[0] != 1 or (attention_mask is not None and attention_mask.dim() != 4):
        raise ValueError(
            "sequence parallelism splits one packed row (packing.enabled=true); got "
            f"{input_ids.shape[0]} rows{' with a padding mask' if attention_mask is not None else ''}"
        )


@dataclass(frozen=True, eq=False)
class UlyssesInputs:
    """What every LLM attention layer of one SP forward receives (the ``ulysses`` keyword)."""

    sp: SequenceParallel
    position_ids: torch.Tensor  # the whole (padded) row's [1, S]: where its packed samples start
    attention_mask: torch.Tensor | None  # the whole row's boolean [1, 1, S, S] (an MPO tree), or None


@dataclass(frozen=True)
class RowShard:
    """This rank's part of one packed row, ready for the model's forward."""

    input_ids: torch.Tensor  # [1, S/P]
    position_ids: torch.Tensor  # [1, S/P]
    keep: torch.Tensor  # logit positions, relative to the shard's start
    features: torch.Tensor | None  # the image features of the shard's <IMG_CONTEXT> tokens, [1, n, H]
    ulysses: UlyssesInputs


def shard_row(
    sp: SequenceParallel,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    keep: torch.Tensor,
    features: torch.Tensor | None,
    image_token_id: int,
    pad_token_id: int,
) -> RowShard:
    """Pad the row to a multiple of P and take this rank's slice.

    Padding tokens are text (``pad_token_id``) whose position ids continue the last sample, so no sample
    starts among them, and they are never kept; in a tree mask they attend only to each other. ``keep``
    must lie in this rank's slice (`owned`). ``features`` are the row's image features in order ([n, T, H]).
    """
    _check_one_row(input_ids, attention_mask)
    if pad_token_id == image_token_id:
        raise ValueError(f"the padding token {pad_token_id} is the image token")
    length = input_ids.shape[1]
    start, end, padded = shard_bounds(length, sp.size, sp.rank)
    if keep.numel() and (int(keep.min()) < start or int(keep.max()) >= end):
        raise ValueError(f"logit positions outside this rank's slice [{start}, {end}) of {length}")
    extra = padded - length
    if extra:
        steps = torch.arange(1, extra + 1, device=position_ids.device, dtype=position_ids.dtype)
        input_ids = torch.cat([input_ids, input_ids.new_full((1, extra), pad_token_id)], dim=1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + steps[None]], dim=1)
        if attention_mask is not None:
            grown = torch.zeros(1, 1, padded, padded, dtype=torch.bool, device=attention_mask.device)
            grown[..., :length, :length] = attention_mask
            grown[..., length:, length:] = torch.ones(extra, extra, dtype=torch.bool).tril()
            attention_mask = grown
    local = input_ids[:, start:end]
    if features is not None:
        flat = features.reshape(-1, features.shape[-1])
        before = int((input_ids[:, :start] == image_token_id).sum())
        here = int((local == image_token_id).sum())
        features = flat[before : before + here][None]
    return RowShard(
        local,
        position_ids[:, start:end],
        keep - start,
        features,
        UlyssesInputs(sp, position_ids, attention_mask),
    )


def _sequence_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[1, H, S/P, D] (this rank's tokens, all heads) -> [1, H/P, S, D] (all tokens, this rank's heads)."""
    from deepspeed.sequence.layer import _SeqAllToAll

    return _SeqAllToAll.apply(group, x.transpose(1, 2).contiguous(), 2, 1, 0).transpose(1, 2)


def _heads_to_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[1, S, H/P, D] (the attention output of this rank's heads) -> [1, S/P, H, D] (this rank's tokens)."""
    from deepspeed.sequence.layer import _SeqAllToAll

    return _SeqAllToAll.apply(group, x.contiguous(), 1, 2, 0)


def ulysses_attention(core: Any) -> Any:
    """The LLM attention for core implementation ``core``: without ``ulysses`` (generation, evaluation) it
    is ``core``; with it, all-to-all to a head shard, ``core`` over the whole row, all-to-all back."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        ulysses: UlyssesInputs | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if ulysses is None:
            return core(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        group, size = ulysses.sp.group, ulysses.sp.size
        if key.shape[1] < size:  # fewer KV heads than ranks: one copy per rank
            key = key.repeat_interleave(size // key.shape[1], dim=1)
            value = value.repeat_interleave(size // value.shape[1], dim=1)
        q, k, v = (_sequence_to_heads(t, group) for t in (query, key, value))
        kwargs.pop("position_ids", None)  # the shard's; the samples are read off the whole row's
        if ulysses.attention_mask is None:
            out, _ = core(
                module,
                q,
                k,
                v,
                None,
                dropout=dropout,
                scaling=scaling,
                position_ids=ulysses.position_ids,
                **kwargs,
            )
        else:  # a tree mask over the whole row (as packed_sdpa's fall-through to transformers' sdpa)
            groups = q.shape[1] // k.shape[1]
            out = F.scaled_dot_product_attention(
                q,
                repeat_kv(k, groups),
                repeat_kv(v, groups),
                attn_mask=ulysses.attention_mask,
                dropout_p=dropout,
                scale=scaling,
            ).transpose(1, 2)
        return _heads_to_sequence(out, group), None

    return attention


for _core, _function in SP_ATTENTION.items():
    AttentionInterface.register(ULYSSES_PREFIX + _core, ulysses_attention(_function))
    AttentionMaskInterface.register(ULYSSES_PREFIX + _core, packed_sdpa_mask)
