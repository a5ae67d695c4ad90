"""On a CUDA GPU in bf16: packed_varlen with V2PE ids (δ < 1) equals the unpacked run, as in
tests/train/test_gpu.py, with the kernel seeing the real sample bounds. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.train.model.test_gpu import GRAD_TOL, LOGIT_TOL, _flat, _model, _run, _samples, rel

pytestmark = pytest.mark.gpu

DELTA = 0.25


def test_packed_varlen_with_v2pe_equals_unpacked_in_bf16(monkeypatch):
    import torch.nn.attention.varlen as varlen

    reference = _model("packed_varlen")
    samples = _samples(reference)
    logits_plain, _ = _run(reference, samples, packed=False)
    reference.config.v2pe_delta = DELTA
    logits32, grads32 = _run(reference, samples, packed=False)  # fp32: the kernel takes no fp32, sdpa runs
    assert rel(logits32, logits_plain) > 5e-3  # V2PE is in effect (fp32: 1.5e-2 on CPU; noise ~1e-6)

    bounds: list[list[int]] = []
    real_kernel = varlen.varlen_attn
    monkeypatch.setattr(
        varlen,
        "varlen_attn",
        lambda q, k, v, cu, *a, **kw: bounds.append(cu.tolist()) or real_kernel(q, k, v, cu, *a, **kw),
    )
    model = copy.deepcopy(reference).to(torch.bfloat16)
    logits_p, grads_p = _run(model, samples, packed=True)
    lengths = [len(s["input_ids"]) for s in samples]
    expected = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert bounds and all(b == expected for b in bounds)  # one sample per kernel segment, not per image token
    bounds.clear()
    logits_u, grads_u = _run(model, samples, packed=False)

    assert rel(logits_p, logits32) < LOGIT_TOL
    assert rel(logits_p, logits32) <= 1.5 * rel(logits_u, logits32) + 2e-3
    g32 = _flat(grads32)
    assert rel(_flat(grads_p), g32) < GRAD_TOL
    assert rel(_flat(grads_p), g32) <= 1.5 * rel(_flat(grads_u), g32) + 5e-3
