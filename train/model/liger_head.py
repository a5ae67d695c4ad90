"""The LM head's log-probs through Liger's fused linear cross-entropy (``model.head_kernel=liger``): the GPU
counterpart of train/model/lm_head.py, with its two entry points and their results.

Liger's kernel (``liger_kernel.ops.fused_linear_cross_entropy``) with ``reduction="none"`` gives each row's
-log p(target) a chunk of logits at a time, chunks sized to the hidden states' memory. Only liger-kernel
0.8.2 and later fold a per-token upstream gradient into the logits' gradient before it is summed into the
weight's; earlier versions scale the summed gradient afterwards, which is silently wrong for any
non-uniform per-token gradient (MPO's preference terms, SFT's loss weights), so ``require_liger_head``
refuses them.

The kernel's function is called from Functions of our own, not through Liger's
``LigerFusedLinearCrossEntropyFunction``: that one saves ``weight.detach()`` for its backward, and under
ZeRO-3 (whose release only swaps ``param.data``) that keeps the gathered full head weight alive from the
forward to the backward. Saving the parameter itself, as the chunked head does, lets ZeRO-3 release it after
the forward and gather it again for the backward (``head_replaced`` in train/model/forward.py): one gather
per call either way, never one per chunk. For SFT's weighted sum the gradients are made in the forward
pass, as ``weighted_logp_sum`` makes them: 3 head-sized matmuls, not 4.
"""

from __future__ import annotations

import importlib.metadata
import os

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from vlmtune.train.model.lm_head import grads_needed, hand_over, keep_for_backward

#: The first liger-kernel whose reduction="none" backward is exact for per-token upstream gradients.
MIN_LIGER_VERSION = "0.8.2"
_IGNORE_INDEX = -100  # Liger's ignore_index; our negative targets all map to it

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def liger_version() -> str | None:
    """The installed liger-kernel's version, or None without it."""
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_liger_head() -> None:
    """Raise ValueError unless Liger's head can run here: liger-kernel >= 0.8.2 and a CUDA GPU, or Triton's
    interpreter (``TRITON_INTERPRET=1`` before triton is imported; CPU tensors, slow: how the tests run it)."""
    from packaging.version import Version

    version = liger_version()
    if version is None:
        raise ValueError(
            f"model.head_kernel=liger needs liger-kernel>={MIN_LIGER_VERSION}: pip install 'vlmtune[liger]'"
        )
    if Version(version) < Version(MIN_LIGER_VERSION):
        raise ValueError(
            f"model.head_kernel=liger needs liger-kernel>={MIN_LIGER_VERSION}, found {version}: before "
            f"{MIN_LIGER_VERSION} its reduction='none' backward scales the already summed weight gradient, "
            "silently wrong for per-token gradients that differ (MPO, weighted SFT). "
            f"pip install 'liger-kernel>={MIN_LIGER_VERSION}', or set model.head_kernel=chunked"
        )
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "model.head_kernel=liger needs a CUDA GPU (Liger's kernels are Triton); "
            "set model.head_kernel=chunked"
        )


def _fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    token_grad: torch.Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, Grads]:
    """Liger's per-token loss -log p [N] (fp32) and, where ``needs`` asks, the gradients of
    sum_i token_grad_i * loss_i for hidden, weight and bias (weight's accumulated in fp32)."""
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    loss, _, _, _, grad_h, grad_w, grad_b = fused_linear_cross_entropy_forward(
        _input=hidden,
        weight=weight,
        target=targets,
        bias=bias,
        ignore_index=_IGNORE_INDEX,
        reduction="none",
        accum_dtype=torch.float32,
        token_grad_output=token_grad,
        compute_gradients=any(needs),
        weight_requires_grad=needs[1],
    )
    return loss, (grad_h if needs[0] else None, grad_w, grad_b if needs[2] else None)


class _LigerTokenLogps(torch.autograd.Function):
    """Per-token log-probs; the backward reruns Liger's kernel with the upstream gradient folded in."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        loss, _ = _fused(hidden, weight, bias, targets, None, (False, False, False))
        ctx.save_for_backward(hidden, weight, bias, targets)  # the parameter itself, for ZeRO-3
        return loss.neg_()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets = ctx.saved_tensors
        _, grads = _fused(hidden, weight, bias, targets, -grad_out, ctx.needs_input_grad[:3])
        return (*grads, None)


class _LigerWeightedLogpSum(torch.autograd.Function):
    """sum_i w_i log p_i with its gradients made in the forward pass (the upstream gradient is a scalar)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        weights: torch.Tensor,
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        loss, grads = _fused(hidden, weight, bias, targets, -weights, needs)
        keep_for_backward(ctx, grads)
        return -(weights * loss).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = hand_over(ctx, "liger_weighted_logp_sum", "liger_token_logps")
        return (*(None if g is None else g * grad_out.to(g.dtype) for g in grads), None, None, None)


def _liger_targets(targets: torch.Tensor) -> torch.Tensor:
    """Negative targets (IGNORE_INDEX and any other) as Liger's ignore_index: they give 0 and no gradient."""
    return targets.masked_fill(targets < 0, _IGNORE_INDEX)


def liger_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``lm_head.token_logps`` through Liger's kernel: log p(target_i | hidden_i) [N] in fp32, exact for any
    per-token upstream gradient; negative targets give 0."""
    return _LigerTokenLogps.apply(hidden, weight, bias, _liger_targets(targets))


def liger_weighted_logp_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lm_head.weighted_logp_sum`` through Liger's kernel: sum_i weights_i log p(target_i | hidden_i),
    ``weights`` [N] data (fp32, no gradient), negative targets contributing 0."""
    needs = grads_needed(hidden, weight, bias)
    return _LigerWeightedLogpSum.apply(hidden, weight, bias, _liger_targets(targets), weights, needs)
