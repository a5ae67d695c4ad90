"""What turns a batch into a loss: the only part that differs between SFT, MPO and pre-training.

An objective has two calls. ``weight_totals(batch)`` returns the batch's contribution to the
step's normalisers (e.g. the sum of token weights); the loop sums them over all micro-batches of
the step and all ranks before any backward. ``__call__(model, batch, totals)`` returns the
micro-batch's share of the step loss and metric shares that add up, over micro-batches and ranks,
to the step's values. This is what makes the gradient independent of the split.

Between steps an objective may carry running state (BCO's reward shift): ``on_step_end`` updates it
after the optimizer step (``applied=False``: the step was skipped for a non-finite loss or gradient on
every rank alike, and its values must not enter the state), ``state_dict``/``load_state_dict`` put it
in checkpoints.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Objective(Protocol):
    """Batch -> (loss, metrics): what the one training loop calls for every method."""

    def weight_totals(self, batch: dict[str, Any]) -> torch.Tensor: ...

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, Any], totals: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def on_step_end(self, applied: bool = True) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
