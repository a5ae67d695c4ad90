"""The chunked LM head (train/model/lm_head.py): the full-logits path's log-probs and every gradient, for any
upstream gradient, chunking and dtype; the same for the SFT fast path ``weighted_logp_sum`` (gradients
computed in the forward pass). Through the objectives and the tiny model: tests/train/objectives/test_chunked_head.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.train.model.lm_head import (
    _ChunkedTokenLogps,
    chunked_token_logps,
    full_token_logps,
    token_logps,
    weighted_logp_sum,
)

LogpsFn = Callable[..., torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_case(n: int, hidden: int = 24, vocab: int = 53, dtype=torch.float64, seed: int = 0, bias=True):
    """Hidden states, head weight and bias, and targets with about a fifth IGNORE_INDEX (never all)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5 * 3
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = IGNORE_INDEX
    if n > 1:
        targets[0] = IGNORE_INDEX  # at least one ignored row, and at least one kept
    targets[-1] = int(torch.randint(0, vocab, (1,), generator=g))
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), targets


def sft_loss(logps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SFT / pre-training: a weighted sum of -log p with a positive weight per token (as data/token_weights)."""
    weights = torch.linspace(0.3, 2.0, len(logps), dtype=torch.float64)
    return -(logps * weights * (targets != IGNORE_INDEX)).sum()


def dpo_like_loss(logps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Preference form: -log sigmoid of a margin of segment sums (chosen vs rejected), plus a per-token
    nonlinear term, so that the upstream gradient differs between segments and between tokens."""
    quarter = max(1, len(logps) // 4)
    segments = [logps[i * quarter : (i + 1) * quarter].sum() for i in range(4)]
    margin_a = 0.7 * (segments[0] - segments[1])
    margin_b = 0.7 * (segments[2] - segments[3])
    return -F.logsigmoid(margin_a) - F.logsigmoid(-margin_b) + 0.05 * (logps**2).sum()


def random_upstream_loss(logps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """An arbitrary fixed upstream gradient per token (signs and sizes all different)."""
    g = torch.Generator().manual_seed(123)
    return (logps * torch.randn(len(logps), generator=g, dtype=torch.float64)).sum()


LOSSES = {"sft": sft_loss, "dpo_like": dpo_like_loss, "random_upstream": random_upstream_loss}


def loss_and_grads(
    fn: LogpsFn, loss_fn: LossFn, h, w, b, targets, **kw
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss, per-token log-probs and the gradients of hidden, weight and bias through ``fn``."""
    leaves = {"hidden": h.clone().requires_grad_(), "weight": w.clone().requires_grad_()}
    if b is not None:
        leaves["bias"] = b.clone().requires_grad_()
    logps = fn(leaves["hidden"], leaves["weight"], targets, bias=leaves.get("bias"), **kw)
    loss = loss_fn(logps, targets)
    loss.backward()
    return loss.detach(), logps.detach(), {k: v.grad for k, v in leaves.items()}


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """max |got - want| <= rel * max |want|: relative to the tensor's scale (elements near 0 included)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max |diff| {err:.3g} vs {rel:g} x max |ref| {scale:.3g}"


REL = {torch.float64: 1e-12, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize(
    "n, chunk_size",
    [(37, 5), (37, 8), (37, 37), (37, 64), (1, 1), (1, 4), (64, 16)],
    ids=["37/5", "37/8", "37/37", "37/64", "1/1", "1/4", "64/16"],
)
def test_chunked_equals_full_logits(dtype, loss_name, n, chunk_size):
    """Loss, log-probs and the gradients of hidden, weight and bias: chunked == full, whatever the chunking
    (not dividing N, one chunk of exactly N, a chunk larger than N, N = 1) and the upstream gradient."""
    h, w, b, targets = make_case(n, dtype=dtype, seed=n + chunk_size)
    loss_fn = LOSSES[loss_name]
    loss, logps, grads = loss_and_grads(chunked_token_logps, loss_fn, h, w, b, targets, chunk_size=chunk_size)
    ref_loss, ref_logps, ref_grads = loss_and_grads(full_token_logps, loss_fn, h, w, b, targets)
    rel = REL[dtype]
    assert_rel_close(loss, ref_loss, rel, "loss")
    assert_rel_close(logps, ref_logps, rel, "logps")
    assert logps.dtype == dtype
    for name in ref_grads:
        assert_rel_close(grads[name], ref_grads[name], rel, f"grad {name}")
    ignored = targets == IGNORE_INDEX
    assert (logps[ignored] == 0).all()
    assert (grads["hidden"][ignored] == 0).all()  # ignored rows get no gradient at all


@pytest.mark.parametrize("n, chunk_size", [(40, 16), (40, 40), (3, 16)])
def test_token_logps_either_path_equals_full(n, chunk_size):
    """The public entry point: chunked above ``chunk_size`` rows, the full logits at or below it; same numbers."""
    h, w, b, targets = make_case(n, dtype=torch.float64, seed=7)
    loss, _, grads = loss_and_grads(token_logps, dpo_like_loss, h, w, b, targets, chunk_size=chunk_size)
    ref_loss, _, ref_grads = loss_and_grads(full_token_logps, dpo_like_loss, h, w, b, targets)
    assert_rel_close(loss, ref_loss, 1e-12, "loss")
    for name in ref_grads:
        assert_rel_close(grads[name], ref_grads[name], 1e-12, f"grad {name}")


def test_without_bias_and_frozen_weight():
    """No bias (InternVL's head) and a frozen head (no weight gradient asked for): hidden's gradient still
    equals the full path's, and the weight gets none."""
    h, w, _, targets = make_case(29, dtype=torch.float64, seed=3, bias=False)
    hidden = h.clone().requires_grad_()
    sft_loss(chunked_token_logps(hidden, w, targets, chunk_size=6), targets).backward()
    ref = h.clone().requires_grad_()
    sft_loss(full_token_logps(ref, w, targets), targets).backward()
    assert_rel_close(hidden.grad, ref.grad, 1e-12, "grad hidden")
    assert not w.requires_grad and w.grad is None


def test_all_targets_ignored_gives_zero_and_zero_gradients():
    h, w, b, _ = make_case(9, dtype=torch.float64)
    targets = torch.full((9,), IGNORE_INDEX)
    loss, logps, grads = loss_and_grads(chunked_token_logps, sft_loss, h, w, b, targets, chunk_size=4)
    assert loss.item() == 0 and (logps == 0).all()
    assert all((g == 0).all() for g in grads.values())


def test_bf16_matches_full_path_computed_the_same_way():
    """bf16 hidden and weight: the head's matmul in bf16, the softmax in fp32, on both paths. The chunked path
    matches the full one to bf16 precision, and is no farther than it from the fp64 truth."""
    n, hidden, vocab = 300, 64, 1000
    h, w, b, targets = make_case(n, hidden, vocab, dtype=torch.float64, seed=11)
    lo = [x.to(torch.bfloat16) for x in (h, w, b)]
    loss, logps, grads = loss_and_grads(chunked_token_logps, dpo_like_loss, *lo, targets, chunk_size=64)
    ref_loss, ref_logps, ref_grads = loss_and_grads(full_token_logps, dpo_like_loss, *lo, targets)
    # The truth: the same bf16 inputs, all in fp64.
    _, _, true_grads = loss_and_grads(full_token_logps, dpo_like_loss, *(x.double() for x in lo), targets)
    assert logps.dtype == torch.float32
    # Forward: the same bf16 matmul then fp32 maths: equal to fp32 rounding.
    assert_rel_close(logps, ref_logps, 1e-5, "logps")
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    for name, ref in ref_grads.items():
        assert grads[name].dtype == torch.bfloat16
        assert_rel_close(grads[name].float(), ref.float(), 2e-2, f"grad {name}")
        ours = (grads[name].double() - true_grads[name]).norm()
        theirs = (ref.double() - true_grads[name]).norm()
        assert ours <= 1.5 * theirs + 1e-3 * true_grads[name].norm(), f"grad {name}: {ours} vs {theirs}"


def test_gradcheck_float64():
    """torch.autograd.gradcheck on a tiny case: the analytic Jacobian (every output's upstream gradient in
    turn, so every per-token pattern) against finite differences, for hidden, weight and bias."""
    h, w, b, targets = make_case(7, hidden=5, vocab=11, dtype=torch.float64, seed=5)
    inputs = tuple(x.clone().requires_grad_() for x in (h, w, b))
    assert torch.autograd.gradcheck(
        lambda hh, ww, bb: chunked_token_logps(hh, ww, targets, bias=bb, chunk_size=3), inputs
    )


class _UniformUpstream(_ChunkedTokenLogps):
    """A plausible wrong backward: one upstream gradient for every token (the fused-cross-entropy shortcut that
    is right for a plain mean NLL and wrong for per-token weights or preference terms)."""

    @staticmethod
    def backward(ctx, grad_out):
        return _ChunkedTokenLogps.backward(ctx, torch.full_like(grad_out, grad_out.mean().item()))


def test_a_wrong_backward_is_caught():
    """The checks above have teeth: a backward assuming a uniform upstream gradient fails gradcheck and the
    preference-form comparison, while still passing a uniform-weight NLL."""
    h, w, b, targets = make_case(7, hidden=5, vocab=11, dtype=torch.float64, seed=5)

    def wrong(hh, ww, tt, bias=None, chunk_size=3):
        return _UniformUpstream.apply(hh, ww, bias, tt, chunk_size)

    inputs = tuple(x.clone().requires_grad_() for x in (h, w, b))
    assert not torch.autograd.gradcheck(
        lambda hh, ww, bb: wrong(hh, ww, targets, bias=bb), inputs, raise_exception=False
    )
    _, _, bad = loss_and_grads(wrong, dpo_like_loss, h, w, b, targets)
    _, _, ref = loss_and_grads(full_token_logps, dpo_like_loss, h, w, b, targets)
    assert (bad["hidden"] - ref["hidden"]).abs().max() > 1e-3

    def uniform_nll(logps, tt):
        return -logps.sum()

    _, _, ok = loss_and_grads(wrong, uniform_nll, h, w, b, targets)
    _, _, ok_ref = loss_and_grads(full_token_logps, uniform_nll, h, w, b, targets)
    assert_rel_close(ok["weight"], ok_ref["weight"], 1e-12, "uniform upstream")


def test_nothing_of_size_n_by_v_is_kept_for_backward():
    """What the autograd graph keeps: hidden, weight, bias, targets and [N] rows; never [N, V] logits."""
    n, hidden, vocab = 64, 8, 97
    h, w, b, targets = make_case(n, hidden, vocab, dtype=torch.float32, seed=2)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_token_logps(leaves[0], leaves[1], targets, bias=leaves[2], chunk_size=16).sum().backward()
    assert saved and max(saved) <= max(n * hidden, vocab * hidden) < n * vocab
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_token_logps(*leaves[:2], targets, bias=leaves[2]).sum()
    assert max(saved) >= n * vocab  # the hook does see the full path's logits: the check is live


def test_rejects_mismatched_inputs():
    h, w, b, targets = make_case(5, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        token_logps(h, w.double(), targets)
    with pytest.raises(ValueError, match="shapes"):
        token_logps(h[:4], w, targets)
    with pytest.raises(ValueError, match="int64"):
        token_logps(h, w, targets.int())
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(h, w, targets, chunk_size=0)


def weighted_sum_fns(weights: torch.Tensor, chunk_size: int) -> tuple[LogpsFn, LogpsFn]:
    """sum_i w_i log p_i through ``weighted_logp_sum`` and through the full logits (the reference)."""

    def fused(hh, ww, tt, bias=None):
        return weighted_logp_sum(hh, ww, tt, weights, bias=bias, chunk_size=chunk_size)

    def full(hh, ww, tt, bias=None):
        return (full_token_logps(hh, ww, tt, bias=bias) * weights).sum()

    return fused, full


def scaled_nll(weighted_sum: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SFT's loss: minus the weighted sum over the step's weight total, times a loss scale: upstream != 1."""
    return -weighted_sum / 7.3 * 2.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "n, chunk_size",
    [(37, 5), (37, 37), (37, 64), (1, 1), (64, 16)],
    ids=["37/5", "37/37", "37/64", "1/1", "64/16"],
)
def test_weighted_logp_sum_equals_full_logits(dtype, n, chunk_size):
    """The SFT fast path: the weighted sum and the gradients of hidden, weight and bias equal the full path's,
    with a scalar upstream gradient other than 1 (applied in the backward to gradients made in the forward)."""
    h, w, b, targets = make_case(n, dtype=dtype, seed=100 + n + chunk_size)
    weights = torch.linspace(0.3, 2.0, n, dtype=torch.float64)
    fused, full = weighted_sum_fns(weights, chunk_size)
    loss, value, grads = loss_and_grads(fused, scaled_nll, h, w, b, targets)
    ref_loss, ref_value, ref_grads = loss_and_grads(full, scaled_nll, h, w, b, targets)
    rel = REL[dtype]
    assert value.dtype == torch.float64  # as the current path: fp32 log-probs times fp64 weights
    assert_rel_close(value, ref_value, rel, "weighted sum")
    assert_rel_close(loss, ref_loss, rel, "loss")
    for name in ref_grads:
        assert_rel_close(grads[name], ref_grads[name], rel, f"grad {name}")
    assert (grads["hidden"][targets == IGNORE_INDEX] == 0).all()


def test_weighted_logp_sum_bf16_matches_full_path():
    n, hidden, vocab = 300, 64, 1000
    h, w, b, targets = make_case(n, hidden, vocab, dtype=torch.float64, seed=12)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fused, full = weighted_sum_fns(weights, 64)
    lo = [x.to(torch.bfloat16) for x in (h, w, b)]
    loss, _, grads = loss_and_grads(fused, scaled_nll, *lo, targets)
    ref_loss, _, ref_grads = loss_and_grads(full, scaled_nll, *lo, targets)
    _, _, true_grads = loss_and_grads(full, scaled_nll, *(x.double() for x in lo), targets)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    for name, ref in ref_grads.items():
        assert grads[name].dtype == torch.bfloat16
        assert_rel_close(grads[name].float(), ref.float(), 2e-2, f"grad {name}")
        ours = (grads[name].double() - true_grads[name]).norm()
        theirs = (ref.double() - true_grads[name]).norm()
        assert ours <= 1.5 * theirs + 1e-3 * true_grads[name].norm(), f"grad {name}: {ours} vs {theirs}"


def test_weighted_logp_sum_against_finite_differences():
    """Its gradients against central differences along random directions of hidden, weight and bias (fp64).
    Not gradcheck: that backpropagates twice through one graph, which this Function refuses (below)."""
    h, w, b, targets = make_case(7, hidden=5, vocab=11, dtype=torch.float64, seed=6)
    weights = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    inputs = [x.clone().requires_grad_() for x in (h, w, b)]
    weighted_logp_sum(*inputs[:2], targets, weights, bias=inputs[2], chunk_size=3).backward()
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(5):
        dirs = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (h, w, b)]

        def at(step: float, dirs: list[torch.Tensor] = dirs) -> float:
            hh, ww, bb = (x + step * d for x, d in zip((h, w, b), dirs))
            return weighted_logp_sum(hh, ww, targets, weights, bias=bb, chunk_size=3).item()

        numeric = (at(eps) - at(-eps)) / (2 * eps)
        analytic = sum((x.grad * d).sum().item() for x, d in zip(inputs, dirs))
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_weighted_logp_sum_refuses_a_second_backward():
    """Its gradients are freed once handed over: a second backward through the same graph is an error, not a
    silent zero."""
    h, w, b, targets = make_case(7, hidden=5, vocab=11, dtype=torch.float64, seed=6)
    hidden = h.clone().requires_grad_()
    value = weighted_logp_sum(hidden, w, targets, torch.ones(7, dtype=torch.float64), chunk_size=3)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        value.backward()


def test_weighted_logp_sum_without_grad_and_with_a_frozen_head():
    """Under no_grad (a reference model, evaluation) only the value; with a frozen head and no bias only
    hidden's gradient, equal to the full path's."""
    h, w, _, targets = make_case(29, dtype=torch.float64, seed=4, bias=False)
    weights = torch.ones(29, dtype=torch.float64)
    fused, full = weighted_sum_fns(weights, 6)
    hidden = h.clone().requires_grad_()
    with torch.no_grad():
        value = fused(hidden, w, targets)
    assert not value.requires_grad
    assert_rel_close(value, full(h, w, targets), 1e-12, "value under no_grad")
    scaled_nll(fused(hidden, w, targets), targets).backward()
    ref = h.clone().requires_grad_()
    scaled_nll(full(ref, w, targets), targets).backward()
    assert_rel_close(hidden.grad, ref.grad, 1e-12, "grad hidden")
    assert w.grad is None


def test_weighted_logp_sum_rejects_bad_weights():
    h, w, _, targets = make_case(5, dtype=torch.float32, bias=False)
    with pytest.raises(ValueError, match="no gradient for weights"):
        weighted_logp_sum(h, w, targets, torch.ones(5, requires_grad=True))
    with pytest.raises(ValueError, match="must match targets"):
        weighted_logp_sum(h, w, targets, torch.ones(4))


def test_against_deepspeeds_tiled_fused_logits_loss():
    """DeepSpeed's ``TiledFusedLogitsLoss`` (the tiled head it ships) as a second reference for the SFT sum:
    with the loss used as it is, its loss and gradients equal ``weighted_logp_sum``'s. Why vlmtune does not
    call it: it makes the head weight's gradient in its forward pass and never scales it by the gradient
    that arrives later, so a loss divided after it (SFT's normaliser, DeepSpeed's own gradient-accumulation
    scaling) leaves that gradient unscaled; and a scalar loss only, so MPO's per-token terms cannot use it."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    h, w, _, targets = make_case(23, dtype=torch.float64, bias=False)
    weights = torch.linspace(0.3, 2.0, len(targets), dtype=torch.float64) * (targets != IGNORE_INDEX)

    def nll_sum(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(head(x), y.clamp(min=0), reduction="none")
        return (nll * mask).sum()

    def deepspeed_grads(scale: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
        head.weight.data.copy_(w)
        x = h.clone()[None].requires_grad_()
        loss = TiledFusedLogitsLoss.apply(
            nll_sum, head, x, targets[None], weights[None], 4, [head.weight], "sum"
        )
        (loss / scale).backward()
        return loss.item(), x.grad[0], head.weight.grad

    def ours(scale: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        x, weight = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = -weighted_logp_sum(x, weight, targets, weights, chunk_size=6)
        (loss / scale).backward()
        return loss.item(), x.grad, weight.grad

    ds_loss, ds_hidden, ds_weight = deepspeed_grads(1.0)
    loss, hidden, weight = ours(1.0)
    assert loss == pytest.approx(ds_loss, rel=1e-12)
    assert_rel_close(hidden, ds_hidden, 1e-12, "hidden")
    assert_rel_close(weight, ds_weight, 1e-12, "weight")

    _, ds_hidden, ds_weight = deepspeed_grads(8.0)
    _, hidden, weight = ours(8.0)
    assert_rel_close(hidden, ds_hidden, 1e-12, "hidden")  # the input's gradient is scaled by both
    assert_rel_close(weight, ds_weight / 8, 1e-12, "weight")  # the head's only by ours
    assert not torch.allclose(ds_weight, weight)
