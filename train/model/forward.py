"""Calling the model on our batches: the forward shared by every objective.

The language-model head runs only on positions that carry a target (``logits_to_keep`` with an
index tensor): with a 151k vocabulary and long image prompts, full logits would dominate memory.
A batch without images still runs the vision tower on one blank tile, contributing exactly zero,
so that under ZeRO-3 every rank gathers the same parameters in the same order (otherwise ranks
whose batch is text-only hang, or with gloo abort on mismatched collectives). The zero enters at
the input embeddings, where real image features enter, so that the backward pass also reaches the
vision tower last on every rank: ZeRO-3 gathers partitions again in the backward pass, in the
order autograd visits the modules. Under sequence parallelism each rank encodes its share of the
tiles and the features are all-gathered (`encode_images`); a rank whose share is empty runs the tower
on one blank tile likewise, its features entering the gather, whose backward gives them zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmtune.train.model.build import tile_size
from vlmtune.train.model.lm_head import DEFAULT_CHUNK_SIZE, HEAD_CHUNK_ATTR
from vlmtune.train.model.sequence_parallel import (
    SequenceParallel,
    active_sequence_parallel,
    gather_tile_features,
    shard_row,
    tile_bounds,
)
from vlmtune.train.model.unwrap import model_device_dtype, unwrap

#: ``head(hidden [B, K, H], weight [V, H], bias [V] | None)``: what the LM head computes in its place.
Head = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def batch_to_device(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    device, dtype = model_device_dtype(model)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = (
                value.to(device, dtype)
                if value.is_floating_point() and key == "pixel_values"
                else value.to(device)
            )
        out[key] = value
    return out


def encode_images(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[Any, bool]:
    """Vision tower + projector on the batch's tiles, or on one blank tile when there are none.

    Always called before the language model, so that every rank gathers the ZeRO-3 partitions of
    the vision tower and the LLM in the same order whatever its batch holds. Returns the
    encoder output and whether it is real (False: a stand-in whose features must contribute 0).
    Within an SP forward (`sequence_parallel.sequence_parallel_forward`) this rank encodes its share
    of the tiles (`sequence_parallel.tile_bounds`; a blank tile for an empty share) and the output's
    ``pooler_output`` is every tile's features, gathered over the group (`gather_tile_features`).
    """
    inner = unwrap(model)
    count = pixel_values.shape[0] if pixel_values.numel() else 0
    sp = active_sequence_parallel()
    start, end = (0, count) if sp is None else tile_bounds(count, sp.size, sp.rank)
    if start == end:
        size = tile_size(inner.config.vision_config)
        local = torch.zeros(1, 3, size, size, device=pixel_values.device, dtype=inner.dtype)
    else:
        local = pixel_values[start:end]
    encoded = inner.model.get_image_features(pixel_values=local, return_dict=True)
    if sp is None or count == 0:
        return encoded, count > 0
    return BaseModelOutputWithPooling(
        pooler_output=gather_tile_features(encoded.pooler_output, sp, count)
    ), True


def v2pe_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids and attention mask for the model's V2PE δ (``config.v2pe_delta``, train/model/v2pe.py).

    δ = 1: both unchanged. δ < 1: V2PE's fractional ids; a packed row (no mask) under sdpa/eager also
    gets its block-causal mask built here, since transformers' own would split at every image token.
    """
    from vlmtune.train.model.v2pe import (
        DENSE_MASK_ATTENTION,
        config_delta,
        packed_causal_mask,
        v2pe_position_ids,
    )

    config = unwrap(model).config
    delta = config_delta(config)
    if delta == 1.0:
        return position_ids, attention_mask
    if attention_mask is None and config._attn_implementation in DENSE_MASK_ATTENTION:
        attention_mask = packed_causal_mask(position_ids)
    return v2pe_position_ids(position_ids, input_ids == config.image_token_id, delta), attention_mask


def forward_logits(
    model: torch.nn.Module,
    batch: dict[str, Any],
    keep: torch.Tensor,
    image_outputs: tuple[Any, bool] | None = None,
    head: Head | None = None,
) -> torch.Tensor:
    """Logits at sequence positions ``keep`` for every row: [B, len(keep), V]; with ``head``, what
    ``head(hidden [B, len(keep), H], weight, bias)`` returns instead of the LM head's logits.

    The model's V2PE δ applies here (`v2pe_inputs`), so every objective, the reference and evaluation
    see the same positions.
    ``image_outputs`` (from ``encode_images``) lets a caller encode the tiles once and reuse them.

    Under sequence parallelism (`train.model.sequence_parallel.sequence_parallel_forward`) the positions,
    V2PE ids and image features are those of the whole row, then this rank's slice goes through the
    language model: ``keep`` must lie in the slice (``sequence_parallel.owned``) and the result covers it.
    """
    encoded, real = (
        image_outputs if image_outputs is not None else encode_images(model, batch["pixel_values"])
    )
    position_ids, mask = v2pe_inputs(
        model, batch["input_ids"], batch["position_ids"], batch.get("attention_mask")
    )
    sp = active_sequence_parallel()
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "position_ids": position_ids,
        "attention_mask": mask,
        "logits_to_keep": keep,
        "use_cache": False,
    }
    if mask is not None and mask.dim() == 4 and unwrap(model).config._attn_implementation == "eager":
        dtype = model_device_dtype(model)[1]  # eager adds the mask to the scores: make it additive
        kwargs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    if real and batch.get("feature_index") is not None:  # the same images feed several sequences
        encoded = BaseModelOutputWithPooling(pooler_output=encoded.pooler_output[batch["feature_index"]])
    if sp is not None:
        kwargs = _sequence_parallel_inputs(model, sp, kwargs, encoded if real else None)
        if real:
            encoded = BaseModelOutputWithPooling(pooler_output=kwargs.pop("features"))
    with head_replaced(model, head):
        if real:
            kwargs["mm_encoder_outputs"] = {"image": encoded}
            return model(**kwargs).logits
        # The zero is added by a hook on the embedding layer, inside the model's forward as on other
        # ranks: calling the layer ourselves would gather its ZeRO-3 partition out of turn.
        zero = encoded.pooler_output.sum() * 0.0
        hook = (
            unwrap(model)
            .get_input_embeddings()
            .register_forward_hook(lambda module, args, out: out + zero.to(out.dtype))
        )
        try:
            return model(**kwargs).logits
        finally:
            hook.remove()


def _sequence_parallel_inputs(
    model: torch.nn.Module, sp: SequenceParallel, kwargs: dict[str, Any], encoded: Any
) -> dict[str, Any]:
    """``kwargs`` for this rank's slice of the row (`sequence_parallel.shard_row`), with the slice's
    image features under ``features`` when ``encoded`` is given."""
    config = unwrap(model).config
    pad = getattr(config.text_config, "pad_token_id", None)
    shard = shard_row(
        sp,
        kwargs["input_ids"],
        kwargs["position_ids"],
        kwargs["attention_mask"],
        kwargs["logits_to_keep"],
        None if encoded is None else encoded.pooler_output,
        config.image_token_id,
        0 if pad is None else pad,
    )
    out = dict(
        kwargs,
        input_ids=shard.input_ids,
        position_ids=shard.position_ids,
        attention_mask=None,
        logits_to_keep=shard.keep,
        ulysses=shard.ulysses,
    )
    if encoded is not None:
        out["features"] = shard.features
    return out


@contextmanager
def head_replaced(model: torch.nn.Module, head: Head | None) -> Iterator[None]:
    """The LM head module computes ``head(hidden, weight, bias)`` instead of its logits, for one call.

    Why inside the module and not on the model's hidden states: the call stays the head module's own
    forward, so DeepSpeed's ZeRO-3 hooks gather its partitioned weight for the forward and again for
    the backward, as for any ``nn.Linear``, and release it after.
    """
    if head is None:
        yield
        return
    lm_head = unwrap(model).get_output_embeddings()
    if type(lm_head) is not torch.nn.Linear:  # a wrapped head (adapters on it) has its own forward
        raise ValueError(
            f"the chunked LM head needs a plain nn.Linear head, found {type(lm_head).__name__}: "
            "set model.head_chunk_size=0"
        )
    lm_head.forward = lambda hidden: head(hidden, lm_head.weight, lm_head.bias)
    try:
        yield
    finally:
        del lm_head.forward


def head_chunk_size(model: torch.nn.Module) -> int:
    """Rows of LM-head logits computed at a time (``model.head_chunk_size``; 0: the full logits)."""
    return getattr(unwrap(model), HEAD_CHUNK_ATTR, DEFAULT_CHUNK_SIZE)
