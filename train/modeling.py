"""Calling the model on our batches: the forward shared by every objective.

The language-model head runs only on positions that carry a target (``logits_to_keep`` with an
index tensor): with a 151k vocabulary and long image prompts, full logits would dominate memory.
A batch without images still runs the vision tower on one blank tile, contributing exactly zero,
so that under ZeRO-3 every rank gathers the same parameters (otherwise text-only ranks hang).
"""

from __future__ import annotations

from typing import Any

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The InternVLForConditionalGeneration under DeepSpeed / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DeepSpeed engine
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    inner = unwrap(model)
    emb = inner.get_input_embeddings().weight
    return emb.device, inner.dtype


def batch_to_device(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    device, dtype = model_device_dtype(model)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() and key == "pixel_values" else value.to(device)
        out[key] = value
    return out


def vision_keepalive(model: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
    """Zero that depends on every vision/projector parameter: run the tower on one blank tile."""
    inner = unwrap(model)
    size = inner.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    blank = torch.zeros(1, 3, size, size, device=like.device, dtype=inner.dtype)
    feats = inner.model.get_image_features(pixel_values=blank, return_dict=True).pooler_output
    return feats.sum() * 0.0


def forward_logits(model: torch.nn.Module, batch: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """Logits at sequence positions ``keep`` for every row: [B, len(keep), V]."""
    pixel_values = batch["pixel_values"]
    has_images = pixel_values.numel() > 0
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": batch.get("attention_mask"),
        "logits_to_keep": keep,
        "use_cache": False,
    }
    if has_images:
        kwargs["pixel_values"] = pixel_values
    logits = model(**kwargs).logits
    if not has_images:
        logits = logits + vision_keepalive(model, logits).to(logits.dtype)
    return logits
