"""Packing maths: budgets respected, nothing lost or duplicated, masks/positions exact."""

from __future__ import annotations

import random

import pytest
import torch

from vlmtune.data.packing import (
    best_fit_pack,
    fill_ratio,
    iter_packs,
    packed_position_ids,
)


def _samples(lengths: list[int], tiles: list[int] | None = None) -> list[dict]:
    tiles = tiles or [1] * len(lengths)
    return [
        {"index": i, "input_ids": torch.zeros(n, dtype=torch.long), "num_tiles": t}
        for i, (n, t) in enumerate(zip(lengths, tiles))
    ]


def test_packs_respect_budgets_and_keep_every_sample_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    tiles = [rng.randint(0, 7) for _ in range(500)]
    packs = list(iter_packs(_samples(lengths, tiles), max_tokens=128, max_tiles=12, buffer_size=32))
    seen = sorted(s["index"] for p in packs for s in p.samples)
    assert seen == list(range(500))
    for p in packs:
        assert p.num_tokens <= 128
        assert len(p.samples) == 1 or p.num_tiles <= 12
        assert [s["index"] for s in p.samples] == sorted(s["index"] for s in p.samples)


def test_bigger_buffer_fills_better():
    rng = random.Random(1)
    lengths = [rng.randint(10, 300) for _ in range(2000)]
    small = fill_ratio(iter_packs(_samples(lengths), 512, None, buffer_size=1), 512)
    large = fill_ratio(iter_packs(_samples(lengths), 512, None, buffer_size=128), 512)
    assert large > small
    assert large > 0.95


def test_best_fit_takes_longest_then_longest_that_fits():
    buffer = _samples([60, 50, 30, 20, 15])
    pack = best_fit_pack(buffer, max_tokens=100, max_tiles=None)
    # 60 first; 50 would make 110; 30 fits (90); 20 and 15 would overflow
    assert sorted(len(s["input_ids"]) for s in pack.samples) == [30, 60]
    assert sorted(len(s["input_ids"]) for s in buffer) == [15, 20, 50]


def test_over_long_sample_is_a_clear_error():
    with pytest.raises(ValueError, match="max_packed_tokens"):
        best_fit_pack(_samples([200]), max_tokens=100, max_tiles=None)


def test_positions_masks_and_cu_seqlens():
    """The attention paths read sample bounds off the packed position ids alone (model/attention*.py)."""
    from vlmtune.train.model.attention_varlen import cu_seqlens
    from vlmtune.train.model.v2pe import packed_causal_mask

    lengths = [3, 1, 2]
    positions = packed_position_ids(lengths)
    assert positions.tolist() == [0, 1, 2, 0, 0, 1]
    cu, longest = cu_seqlens(positions)
    assert cu.tolist() == [0, 3, 4, 6] and longest == 3
    mask = packed_causal_mask(positions[None])[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]
