"""Supervised fine-tuning and pre-training: weighted next-token NLL with token/sample/square averaging.

Pre-training needs no objective of its own: which tokens are targets (assistant turns, or every text
token of a ``supervision: all`` dataset) is decided by the labels the data path builds.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.token_weights import loss_normaliser
from vlmtune.train.model.forward import batch_to_device
from vlmtune.train.model.sequence_parallel import sequence_parallel_forward
from vlmtune.train.objectives.logps import forward_weighted_nll


class SFTObjective:
    """Next-token loss on the labelled tokens; the LM head runs only where a target exists (chunked when long).

    Under sequence parallelism each rank of the group returns the loss of its slice's tokens over the
    whole step's normaliser: the shares (and their gradients) sum over the group to the un-split loss.
    """

    def __init__(self, reduction: str) -> None:
        self.reduction = reduction

    def weight_totals(self, batch: dict[str, Any]) -> torch.Tensor:
        return loss_normaliser(batch["supervised_counts"], self.reduction).reshape(1)

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, Any], totals: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch_to_device(batch, model)
        targets, weights = batch["targets"], batch["weights"]
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # sequence positions with a target
        with sequence_parallel_forward(model):  # a rank of an SP group: its slice's share of the sum
            loss_sum = self.loss_sum(model, batch, keep, targets[:, keep], weights[:, keep])
        loss = loss_sum / totals[0].to(loss_sum.device, loss_sum.dtype)
        return loss, {"loss": loss.item()}

    def loss_sum(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        keep: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """The weighted loss sum at positions ``keep``: next-token NLL (a PRM's objective overrides it)."""
        return forward_weighted_nll(model, batch, keep, targets, weights)

    def on_step_end(self, applied: bool = True) -> None:
        """Nothing carries over between steps."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless: nothing to restore."""
