"""Packed forward and gradients equal the unpacked ones, sample by sample (attention isolated per sample)."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import make_sample, tiny_model
from vlmtune.data.collate import collate_packed, collate_padded
from vlmtune.data.token_weights import loss_normaliser
from vlmtune.train.model.forward import forward_logits
from vlmtune.train.objectives.losses import weighted_nll_sum


def _samples(model):
    shapes = [(1, 3, 5, 4), (0, 0, 9, 6), (2, 1, 3, 2), (1, 1, 7, 3)]  # images, tiles/image, prompt, answer
    return [make_sample(model, *shape, seed=i) for i, shape in enumerate(shapes)]


def _loss_and_logits(model, batch, reduction="square"):
    keep = torch.arange(batch["input_ids"].shape[1])
    logits = forward_logits(model, batch, keep)
    t, w = batch["targets"], batch["weights"]
    total = weighted_nll_sum(logits.flatten(0, 1), t.flatten(), w.flatten())
    return total / loss_normaliser(batch["supervised_counts"], reduction), logits


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa", "eager"])
def test_packed_equals_unpacked_logits_and_grads(attn):
    model = tiny_model(attn_implementation=attn).eval()  # eval: no dropout; grads still flow
    samples = _samples(model)

    packed = collate_packed(samples, "square")
    loss_p, logits_p = _loss_and_logits(model, packed)
    model.zero_grad()
    loss_p.backward()
    grads_p = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    z = packed["supervised_counts"]
    model.zero_grad()
    offset = 0
    for s in samples:
        single = collate_packed([s], "square")
        keep = torch.arange(single["input_ids"].shape[1])
        logits = forward_logits(model, single, keep)
        n = len(s["input_ids"])
        torch.testing.assert_close(logits_p[0, offset : offset + n], logits[0], rtol=1e-4, atol=1e-5)
        offset += n
        t, w = single["targets"], single["weights"]
        (
            weighted_nll_sum(logits.flatten(0, 1), t.flatten(), w.flatten()) / loss_normaliser(z, "square")
        ).backward()
    grads_u = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads_p.keys() == grads_u.keys()
    assert any("vision_tower" in n for n in grads_p)  # the vision path got gradients too
    for name in grads_p:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("reduction", ["token", "square"])
@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa"])
def test_padded_batch_equals_packed_loss(reduction, attn):
    model = tiny_model(attn_implementation=attn).eval()
    samples = _samples(model)
    loss_packed, _ = _loss_and_logits(model, collate_packed(samples, reduction), reduction)
    loss_padded, _ = _loss_and_logits(model, collate_padded(samples, reduction, pad_token_id=0), reduction)
    torch.testing.assert_close(loss_padded, loss_packed, rtol=1e-5, atol=1e-6)


def test_sample_bounds_from_restarting_positions():
    from vlmtune.train.model.attention import sample_bounds

    assert sample_bounds(torch.tensor([0, 1, 2, 0, 0, 1])) == [0, 3, 4, 6]
    assert sample_bounds(torch.tensor([0, 1, 2, 3])) == [0, 4]
