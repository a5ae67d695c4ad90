"""A process reward model's training loss: the verdicts' cross-entropy over ``+`` and ``-`` alone.

VisualPRM trains with plain next-token loss on the verdicts (arXiv 2503.10291, section 3.2), the softmax
over the whole vocabulary; the score it is read by is the softmax over the two verdict logits
(train/objectives/prm.py). Training on that same two-way softmax, -log P(label | {+, -}), optimises the
score itself and nothing else. Measured on the tiny model (a plain PyTorch loop, same base, data and
steps: 300 steps of 8 chats, lr 1e-3, noise-free step labels): held-out step-0 AUC 0.81 with the two-way
loss, 0.49 (chance) with the full-vocabulary one, whose gradient is first spent moving mass from the base's other
tokens onto the verdicts and wipes out the features the comparison needs. The full-vocabulary loss stays
one command away: `vlmtune sft` on the same PRM data.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmtune.train.objectives.logps import forward_verdict_nll
from vlmtune.train.objectives.sft import SFTObjective


class PRMObjective(SFTObjective):
    """SFT's objective with the two-way verdict loss (`logps.forward_verdict_nll`); the positions, the
    sequence-parallel shares and the normalisers (token / sample / square averaging) are SFT's."""

    def __init__(self, reduction: str, positive_id: int, negative_id: int) -> None:
        super().__init__(reduction)
        self.ids = (positive_id, negative_id)

    def loss_sum(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        keep: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        return forward_verdict_nll(model, batch, keep, targets, weights, self.ids)
