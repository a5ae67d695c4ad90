"""Pre-training mixtures: per-dataset weights that are target shares of an epoch's *tokens*.

InternVL3's native multimodal pre-training trains on text corpora and multimodal data in one
stage; a run says e.g. "40% text tokens, 60% image-text tokens". Samples differ a lot in length
(a caption with 12 tiles is ~3,000 tokens, a text document a few hundred), so equal sample counts
would give anything but the intended token shares. So the weights are turned into per-epoch sample
counts through each dataset's mean sample length, estimated at start on a seeded subset of its
records without decoding pixels (image tokens from the header's size via the tiling maths).

The epoch's size stays the one ``repeat_time`` gives (its tokens: sum of repeat_time x records x
mean length); the weights only redistribute it. A dataset whose share needs more samples than it
has is repeated (whole copies plus a seeded random subset, like ``repeat_time > 1``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from vlmtune.data.meta import DatasetSpec
from vlmtune.data.report import SkipSample


def token_budget(
    repeat_times: Sequence[float], num_records: Sequence[int], mean_tokens: Sequence[float]
) -> float:
    """Tokens of an epoch under ``repeat_time`` alone: sum of repeat_time x records x mean length."""
    return sum(r * n * m for r, n, m in zip(repeat_times, num_records, mean_tokens, strict=True))


def mixture_counts(weights: Sequence[float], mean_tokens: Sequence[float], budget_tokens: float) -> list[int]:
    """Samples per dataset so that dataset i holds ``weights[i] / sum(weights)`` of ``budget_tokens``.

    n_i = round(w_i / sum(w) * budget / m_i), at least 1 (a weighted dataset is never dropped by
    rounding).
    """
    if len(weights) != len(mean_tokens):
        raise ValueError(f"{len(weights)} weights for {len(mean_tokens)} datasets")
    if any(w <= 0 for w in weights) or any(m <= 0 for m in mean_tokens):
        raise ValueError(f"weights and mean lengths must be > 0, got {list(weights)}, {list(mean_tokens)}")
    total = sum(weights)
    return [max(1, round(w / total * budget_tokens / m)) for w, m in zip(weights, mean_tokens)]


def token_shares(counts: Sequence[float], mean_tokens: Sequence[float]) -> list[float]:
    """Each dataset's share of the tokens of ``counts[i]`` samples of mean length ``mean_tokens[i]``."""
    tokens = [n * m for n, m in zip(counts, mean_tokens, strict=True)]
    total = sum(tokens)
    return [t / total if total else 0.0 for t in tokens]


def estimate_mean_tokens(processor: Any, spec: DatasetSpec, seed: int, max_records: int = 64) -> float:
    """Mean sample length (text + image tokens) over a seeded subset of at most ``max_records`` records.

    Uses ``processor.count_tokens`` (no pixels decoded) when the processor has one, else processes
    the records (evaluation mode, no augmentation). Bad records are left out, as training skips them.
    """
    n = spec.num_records
    lines = sorted(random.Random(f"mixture:{seed}:{spec.name}").sample(range(n), min(n, max_records)))
    lengths = []
    for line in lines:
        try:
            if hasattr(processor, "count_tokens"):
                lengths.append(processor.count_tokens(spec, line))
            else:
                sample = processor(spec, line, random.Random(0), False)
                lengths.append(int(sample["length"]) if "length" in sample else len(sample["input_ids"]))
        except SkipSample:
            continue
    if not lengths:
        raise ValueError(
            f"{spec.meta_path}: dataset {spec.name!r}: none of the {len(lines)} records sampled to estimate its "
            f"mean length is usable (run `vlmtune check-data {spec.meta_path}`)"
        )
    return sum(lengths) / len(lengths)


def apply_mixture(specs: Sequence[DatasetSpec], mean_tokens: Sequence[float]) -> list[DatasetSpec]:
    """``specs`` with ``samples_per_epoch`` set from their weights (unchanged when none has a weight)."""
    if all(s.weight is None for s in specs):
        return list(specs)
    budget = token_budget([s.repeat_time for s in specs], [s.num_records for s in specs], mean_tokens)
    counts = mixture_counts([s.weight for s in specs], mean_tokens, budget)
    return [replace(s, samples_per_epoch=n) for s, n in zip(specs, counts)]


def resolve_mixture(
    specs: Sequence[DatasetSpec], processor: Any, seed: int, max_records: int = 64
) -> tuple[list[DatasetSpec], list[dict[str, Any]]]:
    """Estimate mean lengths and apply the weights; returns the specs and the plan (one row per
    dataset: weight, mean tokens, samples per epoch, expected token share) for the log."""
    if all(s.weight is None for s in specs):
        return list(specs), []
    means = [estimate_mean_tokens(processor, s, seed, max_records) for s in specs]
    mixed = apply_mixture(specs, means)
    counts = [s.samples_per_epoch for s in mixed]
    shares = token_shares(counts, means)
    total_weight = sum(s.weight for s in specs)
    plan = [
        {
            "dataset": s.name,
            "weight": s.weight / total_weight,
            "mean_tokens": m,
            "samples_per_epoch": n,
            "expected_share": share,
        }
        for s, m, n, share in zip(specs, means, counts, shares)
    ]
    return mixed, plan
