"""packed_varlen on the CPU: its sample offsets, its [T, H, D] plumbing (through a stand-in kernel) and its
fall-through. The kernel itself runs only on CUDA: tests/train/test_gpu.py checks it there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmtune.train.model.attention import packed_sdpa_attention, sample_bounds
from vlmtune.train.model.attention_varlen import cu_seqlens, packed_varlen_attention, varlen_packed

varlen = pytest.importorskip("torch.nn.attention.varlen")


@pytest.mark.parametrize(
    "positions",
    [[0, 1, 2, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0], [3, 4, 5, 0, 1, 7, 8]],  # a row may start mid-sample
)
def test_cu_seqlens_are_the_sample_bounds(positions):
    cu, longest = cu_seqlens(torch.tensor(positions)[None])
    bounds = sample_bounds(torch.tensor(positions))
    assert cu.dtype == torch.int32
    assert cu.tolist() == bounds
    assert longest == max(e - s for s, e in zip(bounds[:-1], bounds[1:]))


def _reference_kernel(calls: list):
    """varlen_attn's contract in plain sdpa: [T, H, D] inputs, causal within each [cu[i], cu[i+1])."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(kw)
        scale = kw.get("scale")
        causal = kw.get("is_causal", False) or kw.get("window_size") == (-1, 0)
        assert causal, kw
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        out = []
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
            out.append(
                F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale, enable_gqa=kw.get("enable_gqa", False)
                ).transpose(0, 1)
            )
        return torch.cat(out)

    return kernel


@pytest.mark.parametrize(
    "options",
    [
        ({"is_causal": True}, False, False),
        ({"window_size": (-1, 0)}, False, True),
        ({"window_size": (-1, 0)}, True, True),
    ],
    ids=["torch2.10", "torch2.11", "torch2.13"],  # causal flag; GQA native or by repeating kv; scale
)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_varlen_plumbing_equals_per_sample_causal_attention(kv_heads, options, monkeypatch):
    from vlmtune.train.model import attention_varlen

    monkeypatch.setattr(attention_varlen, "_kernel_options", lambda: options)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    t = sum(lengths)
    q = torch.randn(1, 4, t, 8, generator=g)
    k, v = (torch.randn(1, kv_heads, t, 8, generator=g) for _ in range(2))
    scale = 0.3 if options[2] else 8**-0.5  # without a scale argument only the default is allowed
    calls: list = []
    out = varlen_packed(q, k, v, positions, scale, kernel=_reference_kernel(calls))
    assert out.shape == (1, t, 4, 8)
    expected, _ = packed_sdpa_attention(
        torch.nn.Module(), q, k, v, None, scaling=scale, position_ids=positions
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1  # one launch for the whole pack
    assert calls[0].get("enable_gqa", False) == (options[1] and kv_heads < 4)
    assert ("scale" in calls[0]) == options[2]
    # the same row laid out as one sample gives a different answer: the isolation is what is tested
    whole, _ = packed_sdpa_attention(
        torch.nn.Module(), q, k, v, None, scaling=scale, position_ids=torch.arange(t)[None]
    )
    assert (whole - expected).abs().max() > 0.1


def test_a_kernel_without_scale_takes_only_the_default(monkeypatch):
    import vlmtune.train.model.attention_varlen as av

    monkeypatch.setattr(av, "_kernel_options", lambda: ({"is_causal": True}, False, False))
    assert av.kernel_takes_scaling(None, 64) and av.kernel_takes_scaling(64**-0.5, 64)
    assert not av.kernel_takes_scaling(0.3, 64)
    monkeypatch.setattr(av, "_kernel_options", lambda: ({"window_size": (-1, 0)}, False, True))
    assert av.kernel_takes_scaling(0.3, 64)


def test_without_cuda_it_is_packed_sdpa():
    g = torch.Generator().manual_seed(1)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g) for _ in range(3))
    got, _ = packed_varlen_attention(torch.nn.Module(), q, k, v, None, position_ids=positions)
    expected, _ = packed_sdpa_attention(torch.nn.Module(), q, k, v, None, position_ids=positions)
    assert torch.equal(got, expected)
