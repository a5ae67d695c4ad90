"""Pure loss maths of the language-model objective: the weighted NLL sum, and a PRM's over its two verdicts.

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


def verdict_nll_sum(
    pair_logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    positive_id: int,
    negative_id: int,
) -> torch.Tensor:
    """sum of weights * -log softmax([logit_+, logit_-])[label] over the targets that are set
    (``pair_logits`` [..., 2]: the ``+`` and ``-`` logits; ``targets`` the token ids, IGNORE_INDEX unset)."""
    on = targets != IGNORE_INDEX
    stray = on & (targets != positive_id) & (targets != negative_id)
    if stray.any():
        raise ValueError(
            f"a PRM trains on '+'/'-' verdicts (ids {positive_id}, {negative_id}) alone; found target id "
            f"{int(targets[stray][0])}: is the dataset's supervision 'assistant_content' and each gpt turn '+' or '-'?"
        )
    label = (targets == negative_id).long()
    nll = F.cross_entropy(pair_logits.float().flatten(0, -2), label.flatten(), reduction="none")
    return (nll * (weights.flatten() * on.flatten()).to(nll.dtype)).sum()
