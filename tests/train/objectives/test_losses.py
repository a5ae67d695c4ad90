"""Loss averaging: hand-computed values, and gradients independent of how samples are split."""

from __future__ import annotations

import math

import pytest
import torch

from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.token_weights import loss_normaliser, per_token_weight, shift_targets, token_weights
from vlmtune.train.objectives.losses import weighted_nll_sum


def test_weights_by_hand():
    counts = torch.tensor([4, 1, 0, 9])
    assert per_token_weight(counts, "token").tolist() == [1.0, 1.0, 0.0, 1.0]
    assert per_token_weight(counts, "sample").tolist() == pytest.approx([0.25, 1.0, 0.0, 1 / 9])
    assert per_token_weight(counts, "square").tolist() == pytest.approx([0.5, 1.0, 0.0, 1 / 3])
    assert loss_normaliser(counts, "token").item() == 14
    assert loss_normaliser(counts, "sample").item() == pytest.approx(3)
    assert loss_normaliser(counts, "square").item() == pytest.approx(2 + 1 + 3)
    with pytest.raises(ValueError, match="loss_reduction"):
        per_token_weight(counts, "mean")


def test_shift_targets_never_crosses_a_sample():
    labels = torch.tensor([-100, 5, 6, -100, 7, 8])
    assert shift_targets(labels, [3, 3]).tolist() == [5, 6, IGNORE_INDEX, 7, 8, IGNORE_INDEX]


def test_square_loss_equals_hand_computation():
    torch.manual_seed(0)
    vocab = 7
    # two samples packed: 3 supervised tokens in the first, 1 in the second
    labels = torch.tensor([-100, 1, 2, 3, -100, -100, 4])
    lengths = [4, 3]
    logits = torch.randn(7, vocab)
    targets = shift_targets(labels, lengths)
    weights, counts = token_weights(targets, lengths, "square")
    assert counts.tolist() == [3, 1]
    got = weighted_nll_sum(logits, targets, weights) / loss_normaliser(counts, "square")
    logp = torch.log_softmax(logits, -1)
    nll_a = [-logp[0, 1], -logp[1, 2], -logp[2, 3]]
    nll_b = [-logp[5, 4]]
    expected = (sum(nll_a) / math.sqrt(3) + sum(nll_b) / 1.0) / (math.sqrt(3) + 1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def _toy_logits(weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding(tokens, weight)


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_gradient_independent_of_packs_microbatches_and_ranks(reduction):
    """One big batch == the same samples in packs, over 2 accumulation steps on 2 simulated ranks.

    The split side scales each micro-batch loss by gas*world and averages like DeepSpeed does
    (divide by gas in backward, mean over ranks in the all-reduce).
    """
    torch.manual_seed(0)
    vocab, n_samples = 11, 8
    samples = []
    for _ in range(n_samples):
        n = int(torch.randint(3, 12, ()).item())
        tokens = torch.randint(0, vocab, (n,))
        labels = tokens.clone()
        labels[: int(torch.randint(1, n - 1, ()).item())] = IGNORE_INDEX  # prompt unsupervised
        samples.append((tokens, labels))
    w0 = torch.randn(vocab, vocab)

    def row_loss_sum(weight, group):
        tokens = torch.cat([t for t, _ in group])
        labels = torch.cat([lab for _, lab in group])
        lengths = [len(t) for t, _ in group]
        targets = shift_targets(labels, lengths)
        weights, counts = token_weights(targets, lengths, reduction)
        return weighted_nll_sum(_toy_logits(weight, tokens), targets, weights), counts

    # reference: all samples in one row
    w_ref = w0.clone().requires_grad_()
    total, counts = row_loss_sum(w_ref, samples)
    (total / loss_normaliser(counts, reduction)).backward()

    # split: 2 ranks x 2 accumulation steps, packs of uneven size
    layout = {0: [samples[0:3], samples[3:4]], 1: [samples[4:5], samples[5:8]]}
    gas, world = 2, 2
    all_counts = []
    for packs in layout.values():
        for pack in packs:
            all_counts.append(row_loss_sum(w0, pack)[1])
    z = loss_normaliser(torch.cat(all_counts), reduction)  # the all-reduced normaliser
    rank_grads = []
    for packs in layout.values():
        w = w0.clone().requires_grad_()
        for pack in packs:
            loss_sum, _ = row_loss_sum(w, pack)
            (loss_sum / z * gas * world / gas).backward()
        rank_grads.append(w.grad)
    split_grad = torch.stack(rank_grads).mean(0)
    torch.testing.assert_close(split_grad, w_ref.grad, rtol=1e-5, atol=1e-7)
