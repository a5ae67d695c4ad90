"""V2PE (variable visual position encoding): image tokens advance the position by δ, text tokens by 1.

InternVL3 (model card, "可变视觉位置编码"; Ge et al. 2024, arXiv:2412.09616) gives visual tokens a
smaller position increment than text, so a long multimodal context spends fewer RoPE positions on its
hundreds of tokens per tile; the card's ablation sweeps δ = 1, 1/2, 1/4, ... 1/256 and finds small δ best
even on ordinary contexts. The recurrence is ``p_0 = 0``, ``p_i = p_{i-1} + (δ if token i is
<IMG_CONTEXT> else 1)``: RoPE takes fractional positions as they are.

Everything is derived from the ordinary integer position ids, which already encode the layout (restart at
0 for every packed sample; an MPO tree's rejected branch continues from its prompt), so one formula serves
packed rows, padded rows and both MPO layouts. δ = 1 returns the ids unchanged: the plain path, exactly.

δ lives on the model config (``config.v2pe_delta``), where `train.modeling.forward_logits` (every
objective, the reference, evaluation) reads it, and `save_pretrained` writes it to config.json, so an
exported model loaded back uses the δ it was trained with. Note that transformers itself does not read
it: calling the model directly gives standard positions (use `forward_logits` or `v2pe_position_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmtune.train.model.unwrap import unwrap

#: Attention implementations whose packed path finds samples where the position id is 0 (ours, and
#: flash-attention's `prepare_fa_kwargs_from_position_ids`), or which get an explicit block mask from
#: `forward_logits` (sdpa, eager). Others (e.g. flex_attention) would split packs at every image token.
V2PE_ATTENTION = ("packed_sdpa", "packed_varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3")
DENSE_MASK_ATTENTION = ("sdpa", "eager")


@dataclass
class V2PEConfig:
    """The ``v2pe`` group: the position increment of visual tokens (configs/v2pe/)."""

    delta: float | None = None
    """δ in (0, 1]: each <IMG_CONTEXT> token advances the position by δ, text by 1 (1 = standard positions).
    None: the model's own (its config.json's ``v2pe_delta``, else 1), so fine-tuning a V2PE model keeps it."""

    def __post_init__(self) -> None:
        check_delta(self.delta, "v2pe.delta")


def check_delta(delta: float | None, where: str) -> None:
    """Refuse a δ outside (0, 1] at start: 0 would put every image token at one position, > 1 is not V2PE."""
    if delta is None:
        return
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) <= 1.0:
        raise ValueError(f"{where}={delta!r}: V2PE's visual position increment must be in (0, 1]")


def config_delta(config: Any) -> float:
    """The δ a model config carries (1.0 when it has none)."""
    delta = getattr(config, "v2pe_delta", None)
    return 1.0 if delta is None else float(delta)


def apply_v2pe_config(model: torch.nn.Module, cfg: V2PEConfig) -> float:
    """Set ``config.v2pe_delta`` of ``model`` (the InternVL model under any wrapper) from the run config;
    refuse an attention implementation whose packed path would mistake fractional ids for sample starts.
    Call it before anything copies the model (the MPO reference) so that both use the same δ."""
    config = unwrap(model).config
    delta = config_delta(config) if cfg.delta is None else float(cfg.delta)
    check_delta(delta, "config.json: v2pe_delta" if cfg.delta is None else "v2pe.delta")
    attn = config._attn_implementation
    if delta != 1.0 and attn not in V2PE_ATTENTION:
        raise ValueError(
            f"v2pe.delta={delta} with model.attn_implementation={attn!r}: its packed path would split samples "
            f"at every image token; use one of {', '.join(V2PE_ATTENTION)}"
        )
    config.v2pe_delta = delta
    return delta


def v2pe_position_ids(
    position_ids: torch.Tensor, is_visual: torch.Tensor, delta: float | torch.Tensor
) -> torch.Tensor:
    """V2PE positions [B, L] (float32) from ordinary ids [B, L] and the <IMG_CONTEXT> mask [B, L].

    Token i of a sample gets ``p_i - (1 - δ) * v_i``, with ``v_i`` the visual tokens after the sample's
    first token up to and including i. A sample starts where its position id is 0 (the rule the attention
    uses too: `train.attention.sample_bounds`), so a tree's rejected branch, which restarts at the prompt
    length, keeps counting its prompt's image tokens; this needs the image tokens to sit in the shared
    prompt, never in a response (true of every layout here). Rows must hold whole samples (no cache).
    ``delta`` may be a tensor broadcastable to [B, L] (a δ per token). δ = 1 returns ``position_ids``.
    """
    if not isinstance(delta, torch.Tensor) and float(delta) == 1.0:
        return position_ids
    if position_ids.shape != is_visual.shape:
        raise ValueError(
            f"position_ids {tuple(position_ids.shape)} and is_visual {tuple(is_visual.shape)} differ"
        )
    pos = position_ids.to(torch.float64)
    start = position_ids == 0
    saved = (is_visual & ~start).to(torch.float64) * (1.0 - torch.as_tensor(delta, dtype=torch.float64))
    total = saved.cumsum(-1)
    # what the row had saved before each sample's start, carried along the sample (total never decreases)
    before = torch.where(start, total - saved, torch.zeros_like(total)).cummax(-1).values
    return (pos - (total - before)).to(torch.float32)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, L]: query i may attend key j when both are in the same sample and j <= i.

    For sdpa/eager with fractional ids: transformers would read packed samples off the ids itself with
    its ``diff != 1`` rule (masking_utils.find_packed_sequence_indices), which splits at every image token.
    """
    sample = (position_ids == 0).cumsum(-1)
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (sample[:, :, None] == sample[:, None, :]))[:, None]


def prompt_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, config: Any) -> torch.Tensor:
    """Position ids of left-padded prompts [B, L] for generation under ``config``'s δ.

    The ids `generate` would derive itself (``cumsum(mask) - 1``, pads at 0), made V2PE; `generate`
    continues each row by 1 per new token from its last prompt position (generated tokens are text).
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return v2pe_position_ids(positions, input_ids == config.image_token_id, config_delta(config))


def v2pe_key(model: torch.nn.Module) -> dict[str, float]:
    """What cached log-probs (MPO's precomputed reference) depend on from V2PE: ``{}`` at δ = 1, so the
    keys of caches made with standard positions stay valid."""
    delta = config_delta(unwrap(model).config)
    return {} if delta == 1.0 else {"v2pe_delta": delta}
