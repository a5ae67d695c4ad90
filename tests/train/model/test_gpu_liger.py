"""model.liger_kernels on a CUDA GPU: Liger's kernels really replace the norms, MLPs and RoPE, and the
model computes the same function (bf16 logits and gradients as close to fp32 as without Liger). Skipped
without CUDA; run by scripts/bench/gpu_check.sh on a lent GPU (needs liger-kernel, carried in .whl/)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.train.model.test_gpu import GRAD_TOL, LOGIT_TOL, _flat, _model, _run, _samples, rel
from vlmtune.train.model.build import apply_liger_kernels

pytestmark = pytest.mark.gpu


def test_liger_kernels_compute_the_same_function_in_bf16():
    pytest.importorskip("liger_kernel")
    reference = _model("packed_varlen")
    samples = _samples(reference)
    logits32, grads32 = _run(reference, samples, packed=True)
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    logits_b, grads_b = _run(plain, samples, packed=True)
    liger = copy.deepcopy(reference).to(torch.bfloat16)
    apply_liger_kernels(liger)
    llm = liger.model.language_model
    assert "Liger" in type(llm.layers[0].mlp).__name__ + repr(llm.layers[0].mlp.forward)
    assert "Liger" in repr(llm.norm.forward) + type(llm.norm).__name__
    logits_l, grads_l = _run(liger, samples, packed=True)
    assert rel(logits_l, logits32) < LOGIT_TOL
    assert rel(logits_l, logits32) <= 1.5 * rel(logits_b, logits32) + 2e-3
    assert grads_l.keys() == grads32.keys()
    g32 = _flat(grads32)
    assert rel(_flat(grads_l), g32) < GRAD_TOL
    assert rel(_flat(grads_l), g32) <= 1.5 * rel(_flat(grads_b), g32) + 5e-3
