"""Pure loss maths of the language-model objective: the weighted NLL sum.

The weights themselves (token/sample/square averaging) come with the batch: data/token_weights.py.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vlmtune.data.conversation import IGNORE_INDEX

LossReduction = Literal["token", "sample", "square"]


def weighted_nll_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over positions of weight * (-log p(target)); positions with IGNORE_INDEX contribute 0."""
    nll = F.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none")
    return (nll * weights * (targets != IGNORE_INDEX)).sum()
