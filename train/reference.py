"""The reference policy of preference training: a frozen copy of the starting model.

Under ZeRO-3 the copy is sharded like the policy (its own DeepSpeed engine, no optimizer state),
so it costs 1/world of the weights per rank. (The adapter-disabled reference for LoRA and the
precomputed log-prob cache are the LoRA and later MPO work.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from train.objectives.mpo import response_logps


def frozen_copy_reference(model: torch.nn.Module, ds_config: dict) -> Callable[[dict, Any], torch.Tensor]:
    """Copy ``model`` now (before the policy trains) and return ``(batch, shared_images) -> logps [B, 2]``."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    module: Any = reference
    if ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
            "zero_optimization": {
                k: v
                for k, v in ds_config["zero_optimization"].items()
                if not k.startswith("offload_optimizer")
            },
            "bf16": ds_config["bf16"],
        }
        module, *_ = deepspeed.initialize(model=reference, config=config)
        module.eval()
    elif torch.cuda.is_available():
        module = reference.to(torch.device("cuda", torch.cuda.current_device()))

    @torch.no_grad()
    def logps(batch: dict, shared_images: Any) -> torch.Tensor:
        return response_logps(module, batch, shared_images)[0]

    return logps
