"""Samples -> model tensors: one packed row (attention isolated by restarting position ids) or padded rows.

Each batch names the dataset of every sample and its tokens (``datasets``, ``sample_tokens``) so
that the loop can log the tokens each dataset contributed (the realised mixture).

Loss targets are shifted here, once, with the per-token weights of the chosen loss reduction, so
the objective only multiplies and sums (data/token_weights.py holds the maths).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.packing import packed_position_ids
from vlmtune.data.token_weights import per_token_weight, shift_targets, token_weights

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
        "datasets": [s.get("dataset", "") for s in samples],
        "sample_tokens": lengths,
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
        "datasets": [s.get("dataset", "") for s in samples],
        "sample_tokens": lengths,
        "supervised_counts": torch.cat(counts),
        "num_samples": rows,
        "num_tokens": sum(lengths),
        "num_slots": rows * width,
    }


def collate_pairs(pairs: list[dict], layout: str, reduction: str) -> Batch:
    """Preference pairs -> one packed row and a table of response tokens.

    ``layout="tree"``: each pair is ``prompt + chosen + rejected`` once (data/pairs.py: positions,
    tree mask, parents), so the prompt with its hundreds of image tokens is computed once for both
    answers. ``layout="separate"``: ``prompt + chosen`` and ``prompt + rejected`` packed side by side
    (what varlen flash-attention can express); the images are still encoded once and their features
    reused (``feature_index`` repeats each pair's tiles). Either way the response table says at which
    row position each response token's log-prob is read, so the objective does not see the layout.
    """
    from vlmtune.data.pairs import tree_attention_mask, tree_parent_index, tree_position_ids

    if layout not in ("tree", "separate"):
        raise ValueError(f"mpo layout must be 'tree' or 'separate', got {layout!r}")
    ids, positions, masks, feature_index, pair_tokens = [], [], [], [], []
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("pos", "target", "pair", "branch", "supervised")}
    offset = tile_offset = 0

    def add_response(i: int, branch: int, key: str, logit_pos: torch.Tensor) -> None:
        rows["pos"].append(logit_pos)
        rows["target"].append(pairs[i][f"{key}_ids"])
        rows["pair"].append(torch.full((len(logit_pos),), i))
        rows["branch"].append(torch.full((len(logit_pos),), branch))
        rows["supervised"].append(pairs[i][f"{key}_labels"] != IGNORE_INDEX)

    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        p, c, r = len(prompt), len(chosen), len(rejected)
        pair_start = offset
        tiles = torch.arange(tile_offset, tile_offset + pair["num_tiles"])
        tile_offset += pair["num_tiles"]
        if layout == "tree":
            parent = offset + tree_parent_index(p, c, r)
            ids += [prompt, chosen, rejected]
            positions.append(tree_position_ids(p, c, r))
            masks.append(tree_attention_mask(p, c, r))
            add_response(i, 0, "chosen", parent[p : p + c])
            add_response(i, 1, "rejected", parent[p + c :])
            offset += p + c + r
            feature_index.append(tiles)
            pair_tokens.append(offset - pair_start)
            continue
        for branch, (key, resp) in enumerate((("chosen", chosen), ("rejected", rejected))):
            ids += [prompt, resp]
            positions.append(torch.arange(p + len(resp)))
            add_response(i, branch, key, offset + tree_parent_index(p, len(resp), 0)[p:])
            offset += p + len(resp)
            feature_index.append(tiles)
        pair_tokens.append(offset - pair_start)
    resp = {k: torch.cat(v) for k, v in rows.items()}
    chosen_sup = resp["supervised"] & (resp["branch"] == 0)
    counts = torch.zeros(len(pairs), dtype=torch.long).index_add_(0, resp["pair"], chosen_sup.long())
    lengths = torch.zeros(len(pairs), 2, dtype=torch.long).index_put_(
        (resp["pair"], resp["branch"]), resp["supervised"].long(), accumulate=True
    )
    attention = None
    if layout == "tree":  # block-diagonal over pairs, a tree inside each
        attention = torch.zeros(offset, offset, dtype=torch.bool)
        start = 0
        for m in masks:
            attention[start : start + len(m), start : start + len(m)] = m
            start += len(m)
        attention = attention[None, None]
    flat_index = torch.cat(feature_index) if feature_index else torch.zeros(0, dtype=torch.long)
    return {
        "input_ids": torch.cat(ids)[None],
        "position_ids": torch.cat(positions)[None],
        "attention_mask": attention,
        "pixel_values": _pixel_values(pairs),
        "feature_index": None if torch.equal(flat_index, torch.arange(len(flat_index))) else flat_index,
        "resp_pos": resp["pos"],
        "resp_target": resp["target"],
        "resp_pair": resp["pair"],
        "resp_branch": resp["branch"],
        "resp_supervised": resp["supervised"],
        "gen_weights": per_token_weight(counts, reduction)[resp["pair"]].float() * chosen_sup,
        "chosen_counts": counts,
        "response_lengths": lengths,
        "num_pairs": len(pairs),
        "sources": [p.get("source", "") for p in pairs],
        "datasets": [p.get("dataset", "") for p in pairs],
        "sample_tokens": pair_tokens,
        "num_samples": len(pairs),
        "num_tokens": offset,
        "num_slots": offset,
    }
