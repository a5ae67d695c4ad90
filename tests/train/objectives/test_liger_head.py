"""Liger's fused linear cross-entropy as the LM head (``model.head_kernel=liger``, train/model/liger_head.py)
equals the full-logits path: loss and every gradient, for SFT's weighted NLL (non-uniform weights, ignored
positions) and for per-token log-probs under a non-uniform upstream gradient, the case liger-kernel before
0.8.2 got wrong; and the objectives route through it.

Triton's interpreter runs Liger's kernels on CPU tensors, so the numerical checks run in a subprocess with
``TRITON_INTERPRET=1`` (it must be set before triton is imported); on a GPU the function-level ones also run
on CUDA tensors in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmtune.train.model.liger_head as liger_head
from tests.train.helpers import tiny_model

REPO = Path(__file__).resolve().parents[3]
REL = 1e-5


def _needs_liger() -> None:
    version = liger_head.liger_version()
    if version is None:
        pytest.skip("liger-kernel is not installed (pip install 'vlmtune[liger]')")
    from packaging.version import Version

    if Version(version) < Version(liger_head.MIN_LIGER_VERSION):
        pytest.skip(f"liger-kernel {version} < {liger_head.MIN_LIGER_VERSION}")


def _in_interpreter(check: str) -> str:
    """Run ``check()`` from this module in a fresh Python with Triton's interpreter on; its stdout."""
    _needs_liger()
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"from tests.train.objectives.test_liger_head import {check}; {check}()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    return proc.stdout


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Max |diff| within REL of the reference's max |value|; prints the ratio reached."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    print(f"{name}: max |diff| / max |ref| = {err / scale:.2e}")
    assert err <= REL * scale, f"{name}: max |diff| {err:.3g}, max |ref| {scale:.3g}"


def _inputs(device: str, bias: bool) -> tuple[torch.Tensor, ...]:
    """24 tokens, hidden 16, vocab 50, fp32; four positions ignored, one of them with a target of -1."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, 16, generator=g)
    weight = torch.randn(50, 16, generator=g) * 0.5
    b = torch.randn(50, generator=g) if bias else None
    targets = torch.randint(0, 50, (24,), generator=g)
    targets[[0, 5, 11]] = -100
    targets[17] = -1
    coeffs = torch.rand(24, generator=g) * 3 - 1  # weights or upstream gradients, of both signs
    return tuple(None if x is None else x.to(device) for x in (hidden, weight, b, targets, coeffs))


def _grads(fn, hidden, weight, bias, targets, coeffs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [None if x is None else x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = fn(*leaves, targets, coeffs)
    out.backward()
    return out.detach(), [x.grad for x in leaves if x is not None]


def _full(hidden, weight, bias, targets, coeffs) -> torch.Tensor:
    from vlmtune.train.model.lm_head import full_token_logps

    return (coeffs * full_token_logps(hidden, weight, targets, bias=bias)).sum()


def _weighted(hidden, weight, bias, targets, coeffs) -> torch.Tensor:
    return liger_head.liger_weighted_logp_sum(hidden, weight, targets, coeffs, bias=bias)


def _per_token(hidden, weight, bias, targets, coeffs) -> torch.Tensor:
    """Per-token log-probs under a non-uniform upstream gradient (``coeffs``): MPO's case."""
    logps = liger_head.liger_token_logps(hidden, weight, targets, bias=bias)
    assert bool((logps[targets < 0] == 0).all())
    return (coeffs * logps).sum()


def check_functions(device: str = "cpu") -> None:
    """Both entry points against the full logits, with and without a bias."""
    for bias in (False, True):
        inputs = _inputs(device, bias)
        want = _grads(_full, *inputs)
        for name, fn in (("weighted_logp_sum", _weighted), ("token_logps", _per_token)):
            got = _grads(fn, *inputs)
            tag = f"{name}{' +bias' if bias else ''}"
            assert_close(f"{tag} value", got[0], want[0])
            for part, g, w in zip(("hidden", "weight", "bias"), got[1], want[1]):
                assert_close(f"{tag} grad {part}", g, w)


def _count_liger_calls() -> dict[str, int]:
    """Counts the Liger Functions' forwards from now on, in this process: a test of the path must take it."""
    calls = {"n": 0}
    for cls in (liger_head._LigerTokenLogps, liger_head._LigerWeightedLogpSum):
        original = cls.forward

        def forward(ctx, *args, _original=original):
            calls["n"] += 1
            return _original(ctx, *args)

        cls.forward = staticmethod(forward)
    return calls


def check_objectives() -> None:
    """SFT (packed and padded) and MPO (both layouts) through the tiny model: Liger's head equals the full
    logits, loss and every trained parameter's gradient, and the Liger Functions did run."""
    from tests.train.objectives.test_chunked_head import sft_samples
    from tests.train.objectives.test_mpo import make_pairs
    from vlmtune.data.collate import collate_packed, collate_padded, collate_pairs
    from vlmtune.train.model.lm_head import HEAD_CHUNK_ATTR, HEAD_KERNEL_ATTR
    from vlmtune.train.objectives.mpo import MPOLossConfig, MPOObjective
    from vlmtune.train.objectives.reference import frozen_copy_reference
    from vlmtune.train.objectives.sft import SFTObjective

    calls = _count_liger_calls()

    def loss_and_grads(model, objective, batch, kernel: str):
        setattr(model, HEAD_KERNEL_ATTR, kernel)
        setattr(model, HEAD_CHUNK_ATTR, 0 if kernel == "chunked" else 1024)
        model.zero_grad(set_to_none=True)
        loss, _ = objective(model, batch, objective.weight_totals(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def compare(tag, model, objective, batch, expect_calls: int) -> None:
        want = loss_and_grads(model, objective, batch, "chunked")
        before = calls["n"]
        got = loss_and_grads(model, objective, batch, "liger")
        assert calls["n"] - before == expect_calls, (tag, calls["n"] - before)
        assert "lm_head.weight" in want[1] and any("vision_tower" in n for n in want[1])
        assert got[1].keys() == want[1].keys()
        assert_close(f"{tag} loss", got[0], want[0])
        worst = max(
            ((got[1][n] - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for n, w in want[1].items()
        )
        print(f"{tag}: worst parameter gradient max |diff| / max |ref| = {worst:.2e}")
        for name, w in want[1].items():
            err, scale = (got[1][name] - w).abs().max().item(), w.abs().max().item()
            assert err <= REL * max(scale, 1e-30), f"{tag} {name}: {err:.3g} vs {scale:.3g}"

    model = tiny_model(head_kernel="liger")  # build_model's guard passes under the interpreter
    for layout in ("packed", "padded"):
        collate = collate_packed if layout == "packed" else (lambda s, r: collate_padded(s, r, 0))
        objective = SFTObjective("square")
        compare(f"sft {layout}", model, objective, collate(sft_samples(model), "square"), 1)

    model = tiny_model().eval()
    setattr(model, HEAD_CHUNK_ATTR, 0)
    reference = frozen_copy_reference(model, {"zero_optimization": {"stage": 0}})
    torch.manual_seed(1)
    with torch.no_grad():  # the policy moves away from the reference: the preference terms are not flat
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = MPOLossConfig(
        preference="sigmoid", preference_weight=0.8, quality_weight=0.2, generation_weight=1.0
    )
    for layout in ("tree", "separate"):
        objective = MPOObjective(cfg, reference, share_vision=False)
        objective.shift.total, objective.shift.count = 0.3, 3
        compare(f"mpo {layout}", model, objective, collate_pairs(make_pairs(model), layout, "token"), 1)


def zero3_rank(kind: str, out: Path) -> None:
    """One rank of tests/train/dist_{,mpo_}grad_check.py's ZeRO-3 step with the run's head through Liger
    (the one-process reference keeps the full logits); run by torchrun with this file as the script."""
    import tests.train.dist_grad_check as sft_check
    import tests.train.dist_mpo_grad_check as mpo_check

    calls = _count_liger_calls()
    for module in (sft_check, mpo_check):
        module.tiny_model = lambda _build=module.tiny_model, **kw: _build(head_kernel="liger", **kw)
    if kind == "sft":
        sft_check.main(out, "square", 3)
    else:
        mpo_check.main(out, "sigmoid", "token", 3)
    assert calls["n"] >= 2, calls  # both micro-batches went through Liger's head


@pytest.mark.parametrize("kind", [pytest.param("sft", marks=pytest.mark.slow), "mpo"])
def test_zero3_two_ranks_through_liger_head(tmp_path, monkeypatch, kind):
    """Under ZeRO-3 the head weight is gathered by the head module's own hooks, once per call, and the
    backward (per-token for MPO) reads the parameter gathered again, not a copy saved in the forward."""
    from tests.train.helpers import check_one_step_against_reference

    _needs_liger()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_one_step_against_reference(tmp_path, "objectives/test_liger_head.py", kind, 3)


def test_liger_head_functions_equal_full_logits_in_interpreter():
    out = _in_interpreter("check_functions")
    assert "token_logps grad weight" in out


@pytest.mark.slow  # 21 s; the functions' test and ZeRO-3's MPO step run by default
def test_objectives_through_liger_head_equal_full_logits_in_interpreter():
    out = _in_interpreter("check_objectives")
    assert "mpo separate" in out


@pytest.mark.gpu
def test_liger_head_functions_equal_full_logits_on_cuda():
    _needs_liger()
    check_functions("cuda")


def test_liger_before_0_8_2_is_refused(monkeypatch):
    monkeypatch.setattr(liger_head, "liger_version", lambda: "0.8.1")
    with pytest.raises(ValueError, match=r"liger-kernel>=0\.8\.2, found 0\.8\.1: .*silently wrong"):
        liger_head.require_liger_head()
    with pytest.raises(ValueError, match=r"found 0\.8\.1"):  # at start, from the config
        tiny_model(head_kernel="liger")
    monkeypatch.setattr(liger_head, "liger_version", lambda: None)
    with pytest.raises(ValueError, match=r"needs liger-kernel>=0\.8\.2: pip install"):
        liger_head.require_liger_head()


def test_liger_head_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(liger_head, "liger_version", lambda: "0.8.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        liger_head.require_liger_head()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    liger_head.require_liger_head()


def test_head_kernel_config_is_checked():
    with pytest.raises(ValueError, match=r"model.head_kernel must be one of \('chunked', 'liger'\)"):
        tiny_model(head_kernel="fused")
    with pytest.raises(ValueError, match="head_chunk_size=0"):
        tiny_model(head_kernel="liger", head_chunk_size=0)


if __name__ == "__main__":
    zero3_rank(sys.argv[2], Path(sys.argv[1]))
