"""The log-probs every objective takes, through the LM head: per token (MPO, the reference) or as
SFT's weighted sum.

Long inputs go through the chunked head (train/model/lm_head.py): at InternVL3's 151,674-token
vocabulary a 16k-token fully supervised pack's fp32 logits alone are 9.9 GB. ``model.head_chunk_size``
sets the rows per chunk; 0 keeps the full logits (the reference path, as before the chunked head).
``model.head_kernel=liger`` puts Liger's fused linear cross-entropy (train/model/liger_head.py) in the
chunked head's place on every call but those at 0: one routing point, ``_head_ops``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch

from vlmtune.train.model.forward import forward_logits, head_chunk_size
from vlmtune.train.model.liger_head import liger_token_logps, liger_weighted_logp_sum
from vlmtune.train.model.lm_head import HEAD_KERNEL_ATTR, token_logps, weighted_logp_sum
from vlmtune.train.model.sequence_parallel import active_sequence_parallel, owned
from vlmtune.train.model.unwrap import unwrap
from vlmtune.train.objectives.losses import verdict_nll_sum, weighted_nll_sum


class HeadOps(NamedTuple):
    """What the LM head computes in its place: ``token_logps(hidden [N, H], weight, targets, bias=)`` [N],
    and ``weighted_logp_sum(hidden, weight, targets, weights, bias=)``, SFT's sum of weighted log-probs."""

    token_logps: Callable[..., torch.Tensor]
    weighted_logp_sum: Callable[..., torch.Tensor]


def _head_ops(model: torch.nn.Module, rows: int | None = None) -> HeadOps | None:
    """None: the full logits (``head_chunk_size`` 0, whatever the kernel; or a chunked head's ``rows``
    within one chunk); else Liger's fused kernel on every call (``model.head_kernel=liger``) or the
    chunked head."""
    chunk = head_chunk_size(model)
    if chunk == 0:
        return None
    if getattr(unwrap(model), HEAD_KERNEL_ATTR, "chunked") == "liger":
        return HeadOps(liger_token_logps, liger_weighted_logp_sum)
    if rows is not None and rows <= chunk:
        return None
    return HeadOps(partial(token_logps, chunk_size=chunk), partial(weighted_logp_sum, chunk_size=chunk))


def forward_token_logps(
    model: torch.nn.Module,
    batch: dict[str, Any],
    keep: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    image_outputs: tuple[Any, bool] | None = None,
) -> torch.Tensor:
    """log p(targets[n] | the hidden state at kept position ``rows[n]`` of the flattened [B x len(keep)])
    as [N] fp32, with an exact backward for any per-token gradient (MPO's preference terms, the reference).

    Several targets may share a position (a shared prompt's last token predicts both answers' first).
    Long inputs go through the chunked head (train/model/lm_head.py), all through Liger's kernel under
    ``model.head_kernel=liger``; ``head_chunk_size`` 0 keeps the full [B, len(keep), V] logits, the
    reference path. Under sequence parallelism (one row) a rank computes the targets whose position lies
    in its slice and gives 0 for the others'.
    """
    mine = owned(active_sequence_parallel(), keep, batch["input_ids"])
    if mine is not None:
        here = mine[rows]
        local = _local_token_logps(
            model, batch, keep[mine], (mine.cumsum(0) - 1)[rows[here]], targets[here], image_outputs
        )
        return local.new_zeros(rows.shape[0]).masked_scatter(here, local)
    return _local_token_logps(model, batch, keep, rows, targets, image_outputs)


def _local_token_logps(
    model: torch.nn.Module,
    batch: dict[str, Any],
    keep: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    image_outputs: tuple[Any, bool] | None,
) -> torch.Tensor:
    ops = _head_ops(model)
    if ops is None:
        logits = forward_logits(model, batch, keep, image_outputs)
        return torch.log_softmax(logits.flatten(0, 1).float(), -1)[rows, targets]

    def head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.token_logps(hidden.flatten(0, 1)[rows], weight, targets, bias=bias)

    return forward_logits(model, batch, keep, image_outputs, head=head)


def forward_weighted_nll(
    model: torch.nn.Module,
    batch: dict[str, Any],
    keep: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """sum of weights * -log p(targets) at positions ``keep`` ([B, len(keep)] each; IGNORE_INDEX gives 0):
    SFT's and pre-training's loss sum. Beyond ``head_chunk_size`` rows the chunked head computes it a
    chunk of logits at a time (Liger's kernel on every input under ``model.head_kernel=liger``), with its
    gradients made in the forward pass (no fourth matmul). Under sequence parallelism (one row) it is the
    sum over this rank's slice."""
    keep, targets, weights = _own_slice(batch, keep, targets, weights)
    ops = _head_ops(model, targets.numel())
    if ops is None:
        logits = forward_logits(model, batch, keep)
        return weighted_nll_sum(logits.flatten(0, 1), targets.flatten(), weights.flatten())

    def head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat_weights = weights.flatten().to(torch.promote_types(weight.dtype, torch.float32)).detach()
        return -ops.weighted_logp_sum(
            hidden.flatten(0, 1), weight, targets.flatten(), flat_weights, bias=bias
        )

    return forward_logits(model, batch, keep, head=head)


def forward_verdict_nll(
    model: torch.nn.Module,
    batch: dict[str, Any],
    keep: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    verdict_ids: tuple[int, int],
) -> torch.Tensor:
    """A PRM's loss sum (losses.verdict_nll_sum) at positions ``keep``, as `forward_weighted_nll` takes SFT's:
    the LM head runs for the ``+`` and ``-`` rows only. Under sequence parallelism, this rank's slice."""
    keep, targets, weights = _own_slice(batch, keep, targets, weights)
    rows = list(verdict_ids)

    def two_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = hidden @ weight[rows].t()
        return out if bias is None else out + bias[rows]

    pair = forward_logits(model, batch, keep, head=two_rows)
    return verdict_nll_sum(pair, targets, weights, *verdict_ids)


def _own_slice(
    batch: dict[str, Any], keep: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept positions (and their targets and weights) in this rank's sequence-parallel slice; all of
    them outside sequence parallelism."""
    mine = owned(active_sequence_parallel(), keep, batch["input_ids"])
    if mine is None:
        return keep, targets, weights
    return keep[mine], targets[:, mine], weights[:, mine]
