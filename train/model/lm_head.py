"""Per-token log-probabilities through the LM head without materialising the [N, V] logits.

With InternVL3's 151,674-token vocabulary the fp32 logits of a 16k-token fully supervised pack are
16384 x 151674 x 4 B = 9.9 GB, the log-softmax kept for the backward pass as much again, and the
backward's gradient of the logits a third copy. ``token_logps`` computes log p(target_i | hidden_i)
a chunk of rows at a time: the forward keeps only each row's log-sum-exp ([N], fp32), the backward
recomputes one chunk's logits at a time and applies the exact gradient for any per-token upstream
gradient, so SFT's weighted NLL and MPO's per-token preference terms (a different upstream gradient
per token) get the gradient the full-logits path gives, with one chunk of logits alive at a time.

Numerics follow the current path (``objectives/losses.py``: ``lm_head`` in the model's dtype, then
``cross_entropy(logits.float())``): the head's matmul runs in the weight's dtype and the softmax in
fp32 (fp64 inputs stay fp64). The price is one more matmul: the backward recomputes the logits (4
head-sized matmuls instead of 3). Where the per-token weights are known before the loss (SFT,
pre-training: a weighted sum of log-probs, so the upstream gradient is one scalar), ``weighted_logp_sum``
makes the gradients in the forward pass while each chunk's logits are at hand: 3 matmuls, as the full path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

# Rows per chunk. One chunk's fp32 logits take chunk_size x V x 4 B: 621 MB at InternVL3's vocabulary,
# large enough for the head's matmul to run at full speed, small beside a long pack's full logits.
DEFAULT_CHUNK_SIZE = 1024
#: Where build_model records ``model.head_chunk_size`` on the model instance (not in its config.json).
HEAD_CHUNK_ATTR = "vlmtune_head_chunk_size"
#: What computes the head beyond the full logits (``model.head_kernel``): this module's chunked head, or
#: Liger's fused kernel (train/model/liger_head.py). build_model records it as HEAD_KERNEL_ATTR.
HEAD_KERNELS = ("chunked", "liger")
HEAD_KERNEL_ATTR = "vlmtune_head_kernel"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax's dtype: fp32 for bf16/fp16/fp32 (as the current path's ``logits.float()``), fp64 kept."""
    return torch.promote_types(dtype, torch.float32)


def _check(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"token_logps takes hidden [N, H], weight [V, H], targets [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden, weight and bias must share a dtype (as lm_head needs); got {hidden.dtype}, "
            f"{weight.dtype}, {None if bias is None else bias.dtype}"
        )
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be int64, got {targets.dtype}")


def full_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(target_i | hidden_i) through the full [N, V] logits: the reference, and the small-input path.

    Logits in the weight's dtype, log-softmax in fp32 (fp64 kept), as the current SFT path computes them.
    Negative targets (IGNORE_INDEX) give 0 and no gradient.
    """
    _check(hidden, weight, targets, bias)
    logits = F.linear(hidden, weight, bias)
    logp = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)
    picked = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return picked.masked_fill(targets < 0, 0.0)


def _dtype(x: torch.Tensor | None) -> torch.dtype | None:
    return None if x is None else x.dtype


def _kept_rows(targets: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows with a target, or None when all have one: ignored rows never go through the head."""
    valid = targets >= 0
    return None if bool(valid.all()) else valid.nonzero().squeeze(1)


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def grads_needed(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[bool, bool, bool]:
    """Which of hidden, weight and bias want a gradient (none under no_grad): what a Function that makes its
    gradients in the forward pass is told, since ``ctx.needs_input_grad`` only holds in the backward. Used
    here and by Liger's head (train/model/liger_head.py)."""
    grad_on = torch.is_grad_enabled()
    return tuple(grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias))


def keep_for_backward(ctx: FunctionCtx, grads: Any) -> None:
    """Hold the gradients a forward pass made (not save_for_backward: they are neither inputs nor outputs)
    until the backward takes them, once, with ``hand_over``."""
    ctx.grads, ctx.handed_over = grads, False


def hand_over(ctx: FunctionCtx, name: str, per_token: str) -> Any:
    """The gradients ``keep_for_backward`` held, freed from ``ctx`` as they are handed over; a second
    backward through the same graph is an error (``name``: the entry point; ``per_token``: the one to use
    instead), not a silent zero."""
    if ctx.handed_over:
        raise RuntimeError(
            f"{name}'s backward runs once: its gradients, made in the forward pass, were handed over and "
            f"freed (use {per_token} to backpropagate through the head more than once)"
        )
    grads, ctx.grads, ctx.handed_over = ctx.grads, None, True
    return grads


class _ChunkBuffers:
    """One chunk's logits, in the compute dtype and (for a bf16/fp16 head) the weight's, allocated once per
    call and reused by every chunk. The peak is then exactly these buffers; and on the CPU a fresh buffer
    per chunk would pay its page faults every time (a 621 MB chunk buffer costs as much to first touch as an
    exp over it). On the GPU the caching allocator would reuse the blocks anyway."""

    def __init__(self, rows: int, weight: torch.Tensor, dtype: torch.dtype) -> None:
        vocab, device = weight.shape[0], weight.device
        self.full = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.low = (
            None if weight.dtype == dtype else torch.empty(rows, vocab, dtype=weight.dtype, device=device)
        )

    def logits(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``h``'s logits (the head's matmul in the weight's dtype) in the compute dtype, as a buffer view."""
        c = h.shape[0]
        out = self.full[:c] if self.low is None else self.low[:c]
        if bias is None:
            torch.mm(h, weight.T, out=out)
        else:
            torch.addmm(bias, h, weight.T, out=out)
        return out if self.low is None else self.full[:c].copy_(out)

    def lowered(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """A chunk's gradient of the logits in the weight's dtype, as autograd casts it for the head's own
        backward."""
        return grad_logits if self.low is None else self.low[: grad_logits.shape[0]].copy_(grad_logits)


def _chunk_lse_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp, in place (one chunk buffer, not two): ``logits`` becomes exp(logits - max).
    Returns (lse, sum of that exp)."""
    top = logits.amax(1, keepdim=True)
    total = logits.sub_(top).exp_().sum(1)
    return total.log().add_(top.squeeze(1)), total


class _HeadGrads:
    """The head's gradients summed over chunks: hidden's rows, the weight's (accumulated in fp32 at least,
    rounded to its dtype once at the end) and the bias's."""

    def __init__(
        self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple[bool, ...]
    ) -> None:
        self.weight = weight
        acc = _compute_dtype(weight.dtype)
        device = weight.device
        self.hidden = torch.empty(h.shape, dtype=acc, device=device) if needs[0] else None
        self.weight_grad = torch.zeros(weight.shape, dtype=acc, device=device) if needs[1] else None
        self.bias_grad = torch.zeros(weight.shape[0], dtype=acc, device=device) if needs[2] else None
        # A bf16 head's per-chunk weight gradient, before it joins the fp32 sum (also reused).
        self.weight_part = (
            torch.empty(weight.shape, dtype=weight.dtype, device=device)
            if needs[1] and weight.dtype != acc
            else None
        )

    def add(
        self, start: int, h_chunk: torch.Tensor, grad_logits: torch.Tensor, buffers: _ChunkBuffers
    ) -> None:
        """Rows ``start:`` of a chunk, from its gradient of the logits [c, V] in the compute dtype."""
        if self.bias_grad is not None:
            self.bias_grad += grad_logits.sum(0)
        low = buffers.lowered(grad_logits)
        if self.hidden is not None:
            self.hidden[start : start + len(h_chunk)] = low @ self.weight
        if self.weight_grad is not None:
            if self.weight_part is None:
                self.weight_grad.addmm_(low.T, h_chunk)
            else:
                self.weight_grad += torch.mm(low.T, h_chunk, out=self.weight_part)

    def result(
        self,
        hidden: tuple[torch.Size, torch.dtype],
        bias_dtype: torch.dtype | None,
        rows: torch.Tensor | None,
        scale: torch.Tensor | float = 1.0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The three gradients times ``scale`` in their inputs' dtypes (``hidden``: its shape and dtype),
        hidden's ignored rows zero."""
        self.weight_part = None
        grad_h = grad_w = grad_b = None
        if self.hidden is not None:
            shape, dtype = hidden
            kept = (self.hidden * scale).to(dtype)
            grad_h = kept if rows is None else kept.new_zeros(shape).index_copy_(0, rows, kept)
        if self.weight_grad is not None:
            grad_w = self.weight_grad.mul_(scale).to(self.weight.dtype)
        if self.bias_grad is not None:
            grad_b = (self.bias_grad * scale).to(bias_dtype)
        return grad_h, grad_w, grad_b


class _ChunkedTokenLogps(torch.autograd.Function):
    """The chunked head: saves hidden, weight, bias, the kept rows and their log-sum-exp, nothing [N, V]."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        dtype = _compute_dtype(hidden.dtype)
        rows = _kept_rows(targets)
        h, t = _take(hidden, rows), _take(targets, rows)
        n = h.shape[0]
        buffers = _ChunkBuffers(min(chunk_size, n), weight, dtype)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        picked = torch.empty_like(lse)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = buffers.logits(h[start:end], weight, bias)
            picked[start:end] = logits.gather(1, t[start:end, None]).squeeze(1)
            lse[start:end] = _chunk_lse_(logits)[0]
        del buffers
        logps = picked.sub_(lse)
        if rows is not None:
            logps = logps.new_zeros(hidden.shape[0]).index_copy_(0, rows, logps)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, rows)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, weight, bias, targets, lse, rows = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        h, t = _take(hidden, rows), _take(targets, rows)
        g = _take(grad_out, rows).to(lse.dtype)
        n = h.shape[0]
        grads = _HeadGrads(h, weight, bias, ctx.needs_input_grad[:3])
        buffers = _ChunkBuffers(min(chunk_size, n), weight, lse.dtype)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            g_c = g[start:end, None]
            # d logp_i / d logits_i = onehot(t_i) - softmax_i, times the upstream g_i; in place.
            grad_logits = buffers.logits(h[start:end], weight, bias)
            grad_logits.sub_(lse[start:end, None]).exp_().mul_(-g_c)
            grad_logits.scatter_add_(1, t[start:end, None], g_c)
            grads.add(start, h[start:end], grad_logits, buffers)
        del buffers
        return (*grads.result((hidden.shape, hidden.dtype), _dtype(bias), rows), None, None)


class _ChunkedWeightedLogpSum(torch.autograd.Function):
    """sum_i w_i log p(t_i | h_i) with its gradient computed in the forward pass, one chunk at a time: the
    upstream gradient of a scalar is one number, so nothing needs recomputing (3 matmuls, as the full path)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        weights: torch.Tensor,
        chunk_size: int,
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        dtype = _compute_dtype(hidden.dtype)
        rows = _kept_rows(targets)
        h, t = _take(hidden, rows), _take(targets, rows)
        w = _take(weights, rows)
        w_low = w.to(dtype)
        n = h.shape[0]
        grads = _HeadGrads(h, weight, bias, needs) if any(needs) else None
        buffers = _ChunkBuffers(min(chunk_size, n), weight, dtype)
        logps = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = buffers.logits(h[start:end], weight, bias)
            picked = logits.gather(1, t[start:end, None]).squeeze(1)
            lse, total = _chunk_lse_(logits)
            logps[start:end] = picked - lse
            if grads is not None:
                # logits now holds exp(logits - max): the softmax is one division away.
                w_c = w_low[start:end, None]
                logits.div_(total[:, None]).mul_(-w_c).scatter_add_(1, t[start:end, None], w_c)
                grads.add(start, h[start:end], logits, buffers)
        del buffers
        if grads is not None:
            grads.weight_part = None  # the per-chunk scratch goes now; the sums wait for the backward
        keep_for_backward(ctx, grads)
        ctx.rows, ctx.meta = rows, ((hidden.shape, hidden.dtype), _dtype(bias))
        out_dtype = torch.promote_types(dtype, weights.dtype)
        return (w.to(out_dtype) * logps.to(out_dtype)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = hand_over(ctx, "weighted_logp_sum", "token_logps")
        if grads is None:
            return (None,) * 7
        hidden, bias_dtype = ctx.meta
        scale = grad_out.to(_compute_dtype(hidden[1]))
        return (*grads.result(hidden, bias_dtype, ctx.rows, scale), None, None, None, None)


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``token_logps`` always through the chunked autograd Function (even for one chunk): what tests pin."""
    _check(hidden, weight, targets, bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size)


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log p(target_i | hidden_i) for hidden [N, H], the head's weight [V, H] (and bias [V]), targets [N].

    Returns [N] in fp32 (fp64 for fp64 inputs); a negative target (IGNORE_INDEX) gives 0 and no gradient.
    Exact for any upstream gradient, with at most ``chunk_size`` rows of logits alive at once: more rows
    than that go through the chunked Function, fewer through the full logits (one chunk's memory anyway,
    and one matmul fewer).
    """
    if hidden.shape[0] <= chunk_size:
        return full_token_logps(hidden, weight, targets, bias=bias)
    return chunked_token_logps(hidden, weight, targets, bias=bias, chunk_size=chunk_size)


def weighted_logp_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """sum_i weights_i * log p(target_i | hidden_i): SFT's and pre-training's loss (negated), weights known
    before the loss. Equals ``(token_logps(...) * weights).sum()`` and its gradients, but computes them in
    the forward pass, chunk by chunk, while the logits are at hand: 3 head-sized matmuls, not 4. Holds
    hidden's and the weight's gradients (fp32) from the forward to the backward. Exact for any scalar
    upstream gradient; for a per-token one (MPO's preference terms) use ``token_logps``.
    ``weights`` [N] are data (no gradient); negative targets contribute 0.
    """
    _check(hidden, weight, targets, bias)
    if weights.shape != targets.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match targets {tuple(targets.shape)}")
    if weights.requires_grad:
        raise ValueError("weighted_logp_sum takes no gradient for weights: pass weights.detach()")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    needs = grads_needed(hidden, weight, bias)
    return _ChunkedWeightedLogpSum.apply(hidden, weight, bias, targets, weights, chunk_size, needs)
