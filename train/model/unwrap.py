"""The InternVL model under whatever wraps it in training (DeepSpeed engine, peft): one way to reach it."""

from __future__ import annotations

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
