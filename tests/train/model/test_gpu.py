"""On a CUDA GPU in bf16: packed = unpacked for every packed attention path, the varlen kernel against an
fp32 per-sample reference, and SFT steps through the DeepSpeed engine that learn. Skipped without CUDA
(tests/conftest.py); run by scripts/bench/gpu_check.sh on a lent GPU.

bf16 cannot match bit for bit, so each packed result is compared with the fp32 unpacked reference and
must be as close to it as the bf16 unpacked run is (packing adds no error of its own), and a control
with the sample isolation removed must land far outside the same tolerance.
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

import vlmtune.train.model.attention_varlen  # noqa: F401  (registers packed_varlen)
from tests.train.helpers import make_sample, tiny_model
from vlmtune.data.collate import collate_packed
from vlmtune.data.token_weights import loss_normaliser
from vlmtune.train.model.attention import packed_sdpa_attention
from vlmtune.train.model.forward import batch_to_device, forward_logits
from vlmtune.train.objectives.losses import weighted_nll_sum

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
# head_dim 64 (the 1B's), GQA 4:2; the tiny vision tower as it is
TEXT = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512}
# images, tiles/image, prompt, answer: samples of 30-370 tokens, several longer than a kernel block (128)
SHAPES = [(1, 3, 40, 30), (0, 0, 150, 90), (2, 1, 20, 10), (1, 1, 7, 3), (1, 6, 60, 200)]
LOGIT_TOL = 2e-2  # relative L2 error of bf16 logits against fp32
GRAD_TOL = 5e-2  # relative L2 error of all bf16 gradients together against fp32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _model(attn: str) -> torch.nn.Module:
    return tiny_model(attn_implementation=attn, text=TEXT).to(DEVICE).eval()  # eval: no dropout


def _samples(model) -> list[dict]:
    return [make_sample(model, *shape, seed=i) for i, shape in enumerate(SHAPES)]


def _run(model, samples: list[dict], packed: bool, isolate: bool = True):
    """Logits of every position (samples in order, fp32) and parameter gradients of the square-averaged loss."""
    model.zero_grad(set_to_none=True)
    z = float(loss_normaliser(collate_packed(samples, "square")["supervised_counts"], "square"))
    rows = [samples] if packed else [[s] for s in samples]
    logits = []
    for row in rows:
        batch = collate_packed(row, "square")
        if not isolate:  # one long causal sequence: every sample sees the ones before it
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        batch = batch_to_device(batch, model)
        keep = torch.arange(batch["input_ids"].shape[1], device=DEVICE)
        out = forward_logits(model, batch, keep)
        t, w = batch["targets"], batch["weights"]
        (weighted_nll_sum(out.flatten(0, 1), t.flatten(), w.flatten()) / z).backward()
        logits.append(out[0].detach().float())
    grads = {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits), grads


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


@pytest.mark.parametrize("attn", ["packed_varlen", "packed_sdpa", "sdpa"])
def test_packed_equals_unpacked_in_bf16(attn):
    reference = _model(attn)
    samples = _samples(reference)
    logits32, grads32 = _run(reference, samples, packed=False)
    model = copy.deepcopy(reference).to(torch.bfloat16)
    logits_p, grads_p = _run(model, samples, packed=True)
    logits_u, grads_u = _run(model, samples, packed=False)
    logits_x, _ = _run(model, samples, packed=True, isolate=False)

    assert rel(logits_p, logits32) < LOGIT_TOL
    assert rel(logits_p, logits32) <= 1.5 * rel(logits_u, logits32) + 2e-3
    assert rel(logits_x, logits32) > 10 * LOGIT_TOL  # the control: a leak across samples is caught
    assert grads_p.keys() == grads32.keys() and any("vision_tower" in n for n in grads_p)
    g32 = _flat(grads32)
    assert rel(_flat(grads_p), g32) < GRAD_TOL
    assert rel(_flat(grads_p), g32) <= 1.5 * rel(_flat(grads_u), g32) + 5e-3
    # no single tensor beyond bf16 noise (worst seen on CPU in bf16: 0.035, a LayerNorm bias)
    for name in grads32:
        assert rel(grads_p[name], grads32[name]) <= max(0.1, 3 * rel(grads_u[name], grads32[name])), name


def test_packed_varlen_runs_the_kernel_once_per_layer(monkeypatch):
    import torch.nn.attention.varlen as varlen

    import vlmtune.train.model.attention_varlen as av

    kernel_calls, fallthrough = [], []
    real_kernel, real_fallback = varlen.varlen_attn, av.packed_sdpa_attention
    monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: kernel_calls.append(1) or real_kernel(*a, **k))
    monkeypatch.setattr(
        av,
        "packed_sdpa_attention",
        lambda *a, **k: fallthrough.append(k.get("position_ids") is not None) or real_fallback(*a, **k),
    )
    model = _model("packed_varlen").to(torch.bfloat16)
    _run(model, _samples(model), packed=True)
    assert len(kernel_calls) == model.config.text_config.num_hidden_layers
    assert fallthrough and not any(fallthrough)  # only the vision tower (no position ids) fell through


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(14, 2, 64), (8, 8, 128)])  # InternVL3-1B's LLM; MHA
def test_varlen_kernel_equals_fp32_per_sample_attention(heads, kv_heads, head_dim):
    from vlmtune.train.model.attention_varlen import varlen_packed

    g = torch.Generator(device=DEVICE).manual_seed(0)
    lengths = [700, 1, 130, 2000, 64, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    t = sum(lengths)
    q, k, v = (
        torch.randn(1, h, t, head_dim, generator=g, device=DEVICE) for h in (heads, kv_heads, kv_heads)
    )
    grad_out = torch.randn(1, t, heads, head_dim, generator=g, device=DEVICE)
    scale = head_dim**-0.5

    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out.to(dtype))
        return out.float(), [x.grad.float() for x in leaves]

    def per_sample(qq, kk, vv, pos=positions):
        return packed_sdpa_attention(torch.nn.Module(), qq, kk, vv, None, scaling=scale, position_ids=pos)[0]

    out32, grads32 = run(per_sample, torch.float32)
    out, grads = run(lambda *x: varlen_packed(*x, positions, scale), torch.bfloat16)
    whole, _ = run(lambda *x: per_sample(*x, pos=torch.arange(t, device=DEVICE)[None]), torch.float32)
    assert rel(out, out32) < 1e-2
    for got, want in zip(grads, grads32):
        assert rel(got, want) < 2e-2
    assert rel(whole, out32) > 0.1  # the control: no isolation is far outside the tolerance


def test_sft_steps_through_the_engine_learn_in_bf16(tmp_path):
    from vlmtune.train.objectives.sft import SFTObjective
    from vlmtune.train.runtime.config import DeepSpeedConfig, OptimConfig, TrainConfig, WandbConfig
    from vlmtune.train.runtime.engine import (
        build_ds_config,
        create_engine,
        init_distributed,
        shutdown_distributed,
    )
    from vlmtune.train.runtime.loop import train_loop
    from vlmtune.train.runtime.metrics import MetricsLogger

    steps = 20
    init_distributed()
    model = tiny_model(attn_implementation="packed_varlen", text=TEXT).to(torch.bfloat16)
    samples = _samples(model)
    objective = SFTObjective("square")
    train_cfg = TrainConfig(precision="bf16", max_steps=steps)
    optim = OptimConfig(lr=1e-3, warmup_ratio=0.0, weight_decay=0.0)
    ds_config = build_ds_config(DeepSpeedConfig(zero_stage=2), train_cfg, optim, world_size=1)
    engine, _, _ = create_engine(model, ds_config, optim, steps)
    param = next(engine.module.parameters())
    assert param.is_cuda and param.dtype == torch.bfloat16
    batch = collate_packed(samples, "square")
    with torch.no_grad():
        untrained = objective(engine, batch, objective.weight_totals(batch))[0].item()
    logger = MetricsLogger(
        tmp_path, enabled=True, total_steps=steps, start_step=0, wandb_cfg=WandbConfig(), run_config={}
    )
    train_loop(
        engine,
        objective,
        itertools.repeat(samples),
        lambda mb: collate_packed(mb, "square"),
        start_step=0,
        max_steps=steps,
        gradient_accumulation_steps=1,
        out_dir=tmp_path,
        logger=logger,
    )
    logger.close()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    del engine, model
    shutdown_distributed()
    assert len(losses) == steps
    assert losses[0] == pytest.approx(untrained, rel=2e-2)  # step 1 trains on the untrained model's loss
    assert losses[-1] < 0.5 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])
