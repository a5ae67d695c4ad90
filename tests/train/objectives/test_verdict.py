"""The PRM's two-way verdict loss: equal to -log softmax([logit_+, logit_-]) computed by hand from the
model's full logits (loss and every gradient), SFT's normalisers, and a target that is not a verdict is
refused."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import make_sample, tiny_model, tiny_tokenizer
from vlmtune.data.collate import collate_packed, collate_padded
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.train.model.forward import forward_logits
from vlmtune.train.objectives.losses import verdict_nll_sum
from vlmtune.train.objectives.verdict import PRMObjective
from vlmtune.train.runtime.prm_score import verdict_ids


def verdict_sample(model, seed: int, verdicts: list[str], tiles: int) -> dict:
    """A chat-shaped sample whose supervised tokens are single verdicts among unsupervised text."""
    plus, minus = verdict_ids(tiny_tokenizer())
    sample = make_sample(model, 1 if tiles else 0, tiles, 5, 1, seed)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    ids, labels = ids[:-2], labels[:-2]  # drop the random answer and its <|im_end|>
    g = torch.Generator().manual_seed(seed)
    for v in verdicts:
        filler = torch.randint(300, 1000, (3,), generator=g).tolist()
        target = plus if v == "+" else minus
        ids += [*filler, target]
        labels += [IGNORE_INDEX] * 3 + [target]
    sample["input_ids"], sample["labels"] = torch.tensor(ids), torch.tensor(labels)
    return sample


def hand_loss(model, batch, plus: int, minus: int, reduction: str) -> torch.Tensor:
    """-log P(label | {+, -}) from the full logits at every position, weighted as SFT weights tokens."""
    positions = torch.arange(batch["input_ids"].shape[1])
    logits = forward_logits(model, batch, positions)
    pair = torch.log_softmax(torch.stack([logits[..., plus], logits[..., minus]], -1), -1)
    targets = batch["targets"]
    on = targets != IGNORE_INDEX
    nll = -torch.where(targets == minus, pair[..., 1], pair[..., 0])
    total = PRMObjective(reduction, plus, minus).weight_totals(batch)[0]
    return (nll * batch["weights"] * on).sum() / total


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("reduction", ["token", "square"])
def test_verdict_loss_and_gradients_equal_the_hand_computation(layout, reduction):
    model = tiny_model()
    plus, minus = verdict_ids(tiny_tokenizer())
    samples = [verdict_sample(model, 0, ["+", "-", "-"], 2), verdict_sample(model, 1, ["-", "+"], 1)]
    collate = collate_packed if layout == "packed" else (lambda s, r: collate_padded(s, r, 0))
    batch = collate(samples, reduction)
    objective = PRMObjective(reduction, plus, minus)

    def run(loss_of) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got = run(lambda: objective(model, batch, objective.weight_totals(batch))[0])
    want = run(lambda: hand_loss(model, batch, plus, minus, reduction))
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got[1].keys() == want[1].keys() and any("vision_tower" in n for n in want[1])
    for name, ref in want[1].items():
        err, scale = (got[1][name] - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 1e-5 * max(scale, 1e-30), f"{name}: max |diff| {err:.3g}, max |ref| {scale:.3g}"
    # only the two verdict rows of the head learn: the others get no gradient at all
    head = got[1]["lm_head.weight"]
    others = torch.ones(head.shape[0], dtype=torch.bool)
    others[[plus, minus]] = False
    assert head[others].abs().max() == 0 and head[[plus, minus]].abs().max() > 0


def test_a_target_that_is_not_a_verdict_is_refused():
    plus, minus = verdict_ids(tiny_tokenizer())
    targets = torch.tensor([[IGNORE_INDEX, plus, 777]])
    with pytest.raises(ValueError, match="777.*assistant_content"):
        verdict_nll_sum(torch.zeros(1, 3, 2), targets, torch.ones(1, 3), plus, minus)


def test_two_way_loss_by_hand():
    """logits (2, 0) for a '+' target: -log(e^2 / (e^2 + 1)); (0, 1) for a '-': -log(e / (1 + e)); weights 1, 2."""
    pair = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    targets = torch.tensor([[10, 11, IGNORE_INDEX]])
    got = verdict_nll_sum(pair, targets, torch.tensor([[1.0, 2.0, 9.0]]), 10, 11)
    e = torch.e
    want = -torch.log(torch.tensor(e**2 / (e**2 + 1))) - 2 * torch.log(torch.tensor(e / (1 + e)))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
