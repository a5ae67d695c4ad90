"""The two naive layouts of a processed pair, as test references for the tree the trainer uses."""

from __future__ import annotations

from typing import Any

import torch

from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.pairs import tree_attention_mask, tree_parent_index, tree_position_ids

__all__ = ["pair_as_sequences", "pair_as_tree", "tree_attention_mask"]


def _common(pair: dict[str, Any]) -> dict[str, Any]:
    keys = ("pixel_values", "num_tiles", "num_images", "dataset", "source")
    return {k: pair[k] for k in keys if k in pair}


def pair_as_sequences(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """The naive layout: ``[prompt + chosen, prompt + rejected]`` as two SFT-style samples.

    Each holds its own image tokens, so each carries the (same) tiles: the vision tower encodes
    them twice. ``role`` says which response a sequence holds.
    """
    prompt = pair["prompt_ids"]
    masked = torch.full_like(prompt, IGNORE_INDEX)
    return [
        {
            "input_ids": torch.cat([prompt, pair[f"{role}_ids"]]),
            "labels": torch.cat([masked, pair[f"{role}_labels"]]),
            "role": role,
            **_common(pair),
        }
        for role in ("chosen", "rejected")
    ]


def pair_as_tree(pair: dict[str, Any]) -> dict[str, Any]:
    """One sequence ``prompt + chosen + rejected`` sharing the prompt (and its tiles, once).

    ``labels``: -100 on the prompt, then each response's labels; ``position_ids`` from
    `tree_position_ids`; ``parent_index`` from `tree_parent_index` (score token t with the logits
    at ``parent_index[t]``, not ``t - 1``); ``segments`` = (P, C, R), from which
    `tree_attention_mask` builds the mask the model must be run with.
    """
    prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
    p, c, r = len(prompt), len(chosen), len(rejected)
    return {
        "input_ids": torch.cat([prompt, chosen, rejected]),
        "labels": torch.cat(
            [torch.full_like(prompt, IGNORE_INDEX), pair["chosen_labels"], pair["rejected_labels"]]
        ),
        "position_ids": tree_position_ids(p, c, r),
        "parent_index": tree_parent_index(p, c, r),
        "segments": (p, c, r),
        **_common(pair),
    }
