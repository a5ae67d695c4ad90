"""Held-out perplexity on text samples: how well the model predicts every supervised token.

The pre-training demo's language metric (exact match covers the image questions): the text
records of the eval meta file are packed like training samples and scored token by token,
exp(total NLL / total tokens), over all ranks. Every rank runs the same number of forward passes
(a rank short of samples repeats one and discards it), as ZeRO-3 needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from vlmtune.data.collate import collate_packed
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.train.model.forward import batch_to_device
from vlmtune.train.objectives.logps import forward_weighted_nll


def perplexity(nll_sum: float, num_tokens: float) -> float:
    """exp(mean NLL per token); inf when nothing was scored."""
    return math.exp(nll_sum / num_tokens) if num_tokens > 0 else math.inf


@torch.no_grad()
def packed_nll(model: Any, samples: list[dict]) -> tuple[float, int]:
    """(sum of -log p over the supervised next-token targets, their number) for samples in one pack."""
    batch = batch_to_device(collate_packed(samples, "token"), model)
    targets, weights = batch["targets"], batch["weights"]
    keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    nll = forward_weighted_nll(model, batch, keep, targets[:, keep], weights[:, keep])
    return float(nll), int((targets != IGNORE_INDEX).sum())


def text_perplexity(model: Any, samples: list[dict], batch_size: int = 8) -> dict[str, float]:
    """``text_nll`` (per token), ``text_perplexity``, ``text_tokens`` and ``text_samples`` of ``samples``.

    ``samples`` is the full list on every rank; each rank scores its share.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = samples[rank::world]
    n_batches = -(-len(samples) // (batch_size * world))
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for b in range(n_batches):
        batch = mine[b * batch_size : (b + 1) * batch_size]
        nll, count = packed_nll(model, batch or samples[:1])
        if batch:
            sums += torch.tensor([nll, count], dtype=torch.float64)
    if was_training:
        model.train()
    if world > 1:
        dist.all_reduce(sums)
    nll_sum, tokens = sums.tolist()
    return {
        "text_nll": nll_sum / max(tokens, 1.0),
        "text_perplexity": perplexity(nll_sum, tokens),
        "text_tokens": int(tokens),
        "text_samples": len(samples),
    }
