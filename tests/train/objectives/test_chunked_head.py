"""The objectives through the chunked LM head (``model.head_chunk_size``) equal the full-logits path
(``head_chunk_size=0``, the path as it was before): loss and the gradient of every trained parameter,
for SFT packs with images, a ``supervision: all`` text record, MPO pairs in both layouts (the whole
loss: generation, preference and quality terms) and the precomputed reference."""

from __future__ import annotations

import pytest
import torch

import vlmtune.train.model.lm_head as lm_head
from tests.train.helpers import make_sample, tiny_model
from tests.train.objectives.test_mpo import make_pairs
from vlmtune.data.collate import collate_packed, collate_padded, collate_pairs
from vlmtune.train.model.lm_head import HEAD_CHUNK_ATTR
from vlmtune.train.objectives.mpo import MPOLossConfig, MPOObjective
from vlmtune.train.objectives.reference import frozen_copy_reference, precompute_reference
from vlmtune.train.objectives.sft import SFTObjective


class ChunkedCalls:
    """Counts the chunked autograd Functions' forwards: a test of the chunked path must take it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for cls in (lm_head._ChunkedTokenLogps, lm_head._ChunkedWeightedLogpSum):
            original = cls.forward

            def forward(ctx, *args, _original=original):
                self.calls += 1
                return _original(ctx, *args)

            monkeypatch.setattr(cls, "forward", staticmethod(forward))


def loss_and_grads(model, objective, batch, chunk: int) -> tuple[float, dict[str, torch.Tensor]]:
    setattr(model, HEAD_CHUNK_ATTR, chunk)
    model.zero_grad(set_to_none=True)
    loss, _ = objective(model, batch, objective.weight_totals(batch))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got: tuple[float, dict], want: tuple[float, dict], rel: float = 1e-6) -> None:
    assert got[0] == pytest.approx(want[0], rel=rel)
    assert got[1].keys() == want[1].keys()
    assert any("vision_tower" in n for n in want[1]) and "lm_head.weight" in want[1]
    for name, ref in want[1].items():
        err, scale = (got[1][name] - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 1e-5 * max(scale, 1e-30), f"{name}: max |diff| {err:.3g}, max |ref| {scale:.3g}"


def sft_samples(model) -> list[dict]:
    samples = [make_sample(model, 1, 2, 6, 9, 0), make_sample(model, 2, 1, 3, 5, 1)]
    text = make_sample(model, 0, 0, 10, 6, 2)  # a pre-training text record: every token a target
    text["labels"] = text["input_ids"].clone()
    return [*samples, text]


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("reduction", ["token", "square"])
def test_sft_chunked_equals_full_logits(monkeypatch, layout, reduction):
    model = tiny_model()
    samples = sft_samples(model)
    collate = collate_packed if layout == "packed" else (lambda s, r: collate_padded(s, r, 0))
    batch = collate(samples, reduction)
    objective = SFTObjective(reduction)
    full = loss_and_grads(model, objective, batch, 0)
    calls = ChunkedCalls(monkeypatch)
    assert_same(loss_and_grads(model, objective, batch, 7), full)  # several chunks, the last one short
    assert calls.calls == 1
    assert_same(loss_and_grads(model, objective, batch, 4096), full)  # fewer rows than a chunk: full logits
    assert calls.calls == 1


@pytest.mark.parametrize("layout", ["tree", "separate"])
def test_mpo_chunked_equals_full_logits(monkeypatch, layout):
    model = tiny_model().eval()
    setattr(model, HEAD_CHUNK_ATTR, 0)
    reference = frozen_copy_reference(model, {"zero_optimization": {"stage": 0}})
    torch.manual_seed(1)
    with torch.no_grad():  # the policy moves away from the reference, so the preference terms are not flat
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = MPOLossConfig(
        preference="sigmoid", preference_weight=0.8, quality_weight=0.2, generation_weight=1.0
    )
    objective = MPOObjective(cfg, reference, share_vision=False)
    objective.shift.total, objective.shift.count = 0.3, 3  # delta 0.1
    batch = collate_pairs(make_pairs(model), layout, "token")
    full = loss_and_grads(model, objective, batch, 0)
    calls = ChunkedCalls(monkeypatch)
    assert_same(loss_and_grads(model, objective, batch, 5), full)
    assert calls.calls == 1  # the policy's response tokens (the reference runs at chunk 0)


def test_precomputed_reference_chunked_equals_full_logits(monkeypatch):
    model = tiny_model().eval()
    pairs = make_pairs(model)
    for i, p in enumerate(pairs):
        p["source"] = f"pairs.jsonl:{i + 1}"

    def cache(chunk: int) -> dict[str, list[float]]:
        setattr(model, HEAD_CHUNK_ATTR, chunk)
        return precompute_reference(
            model, pairs, lambda ps: collate_pairs(ps, "tree", "token"), batch_pairs=2
        )

    full = cache(0)
    calls = ChunkedCalls(monkeypatch)
    chunked = cache(3)
    assert calls.calls == 2  # one per batch of pairs
    assert chunked.keys() == full.keys()
    for key in full:
        assert chunked[key] == pytest.approx(full[key], rel=1e-6)


def test_a_negative_chunk_size_is_refused():
    with pytest.raises(ValueError, match="head_chunk_size must be >= 0"):
        tiny_model(head_chunk_size=-1)
