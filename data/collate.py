"""Samples -> model tensors: one packed row (attention isolated by restarting position ids) or padded rows.

Loss targets are shifted here, once, with the per-token weights of the chosen loss reduction, so
the objective only multiplies and sums (train/losses.py holds the maths).
"""

from __future__ import annotations

from typing import Any

import torch

from data.packing import cu_seq_lens, packed_position_ids
from train.losses import IGNORE_INDEX, shift_targets, token_weights

Batch = dict[str, Any]


def _pixel_values(samples: list[dict]) -> torch.Tensor:
    tiles = [s["pixel_values"] for s in samples if s["num_tiles"] > 0]
    if tiles:
        return torch.cat(tiles)
    return torch.zeros(0)


def collate_packed(samples: list[dict], reduction: str) -> Batch:
    """All samples in one row [1, L]; attention never crosses a sample (position ids restart)."""
    lengths = [len(s["input_ids"]) for s in samples]
    input_ids = torch.cat([s["input_ids"] for s in samples])
    labels = torch.cat([s["labels"] for s in samples])
    targets = shift_targets(labels, lengths)
    weights, counts = token_weights(targets, lengths, reduction)
    return {
        "input_ids": input_ids[None],
        "position_ids": packed_position_ids(lengths)[None],
        "attention_mask": None,
        "targets": targets[None],
        "weights": weights[None],
        "pixel_values": _pixel_values(samples),
        "lengths": lengths,
        "cu_seq_lens": cu_seq_lens(lengths),
        "supervised_counts": counts,
        "num_samples": len(samples),
        "num_tokens": sum(lengths),
        "num_slots": sum(lengths),
    }


def collate_padded(samples: list[dict], reduction: str, pad_token_id: int) -> Batch:
    """One sample per row, right-padded to the longest: the layout peers train with, kept as a baseline."""
    lengths = [len(s["input_ids"]) for s in samples]
    width = max(lengths)
    rows = len(samples)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    targets = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((rows, width), dtype=torch.float32)
    counts = []
    for r, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[r, :n] = s["input_ids"]
        attention[r, :n] = 1
        t = shift_targets(s["labels"], [n])
        w, c = token_weights(t, [n], reduction)
        targets[r, :n], weights[r, :n] = t, w
        counts.append(c)
    position_ids = torch.arange(width)[None].expand(rows, width).clone()
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention,
        "targets": targets,
        "weights": weights,
        "pixel_values": _pixel_values(samples),
        "lengths": lengths,
        "cu_seq_lens": None,
        "supervised_counts": torch.cat(counts),
        "num_samples": rows,
        "num_tokens": sum(lengths),
        "num_slots": rows * width,
    }
