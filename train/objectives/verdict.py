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
import torch.nn.functional as F

from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.train.model.forward import batch_to_device, forward_logits
from vlmtune.train.model.sequence_parallel import active_sequence_parallel, owned, sequence_parallel_forward
from vlmtune.train.objectives.sft import SFTObjective


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


class PRMObjective(SFTObjective):
    """SFT's objective with the two-way verdict loss: the LM head runs for the ``+`` and ``-`` rows only,
    at the verdict positions; the normalisers (token / sample / square averaging) are SFT's."""

    def __init__(self, reduction: str, positive_id: int, negative_id: int) -> None:
        super().__init__(reduction)
        self.ids = (positive_id, negative_id)

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, Any], totals: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch_to_device(batch, model)
        targets, weights = batch["targets"], batch["weights"]
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
        rows = list(self.ids)

        def two_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = hidden @ weight[rows].t()
            return out if bias is None else out + bias[rows]

        with sequence_parallel_forward(model):
            mine = owned(active_sequence_parallel(), keep, batch["input_ids"])
            kept_targets, kept_weights = targets[:, keep], weights[:, keep]
            if mine is not None:
                keep, kept_targets, kept_weights = keep[mine], kept_targets[:, mine], kept_weights[:, mine]
            pair = forward_logits(model, batch, keep, head=two_rows)
            loss_sum = verdict_nll_sum(pair, kept_targets, kept_weights, *self.ids)
        loss = loss_sum / totals[0].to(loss_sum.device, loss_sum.dtype)
        return loss, {"loss": loss.item()}
