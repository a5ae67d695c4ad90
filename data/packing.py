"""Multimodal packing: several samples share one sequence, each still sees only itself.

Why: InternVL samples are long image prompts with short answers and very uneven lengths; padding
them to a common length wastes most of the compute. A pack concatenates samples up to
``max_tokens`` (and ``max_tiles`` image tiles, which bound the vision tower's batch), and position
ids restart at 0 for every sample. transformers turns restarting position ids into a
block-diagonal causal mask for sdpa/eager and into cumulative sequence lengths for
flash-attention, so attention never crosses a sample boundary.

Packing is buffered best-fit: samples enter a buffer; a pack starts from the longest buffered
sample and keeps adding the longest one that still fits. A larger buffer gives fuller packs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

Sample = dict[str, Any]


def sample_length(sample: Sample) -> int:
    """Tokens a sample takes in a pack: ``length`` when the sample says (a preference pair's tree
    or two sequences), else its ``input_ids``."""
    return int(sample["length"]) if "length" in sample else len(sample["input_ids"])


@dataclass
class Pack:
    """Samples chosen to share one sequence, in order; ``ids`` identify them for resume."""

    samples: list[Sample] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(sample_length(s) for s in self.samples)

    @property
    def num_tiles(self) -> int:
        return sum(int(s["num_tiles"]) for s in self.samples)


def sample_fits(sample: Sample, pack: Pack, max_tokens: int, max_tiles: int | None) -> bool:
    """Whether ``sample`` can join ``pack`` without exceeding the token or tile budget."""
    if pack.num_tokens + sample_length(sample) > max_tokens:
        return False
    return max_tiles is None or not pack.samples or pack.num_tiles + int(sample["num_tiles"]) <= max_tiles


def best_fit_pack(buffer: list[Sample], max_tokens: int, max_tiles: int | None) -> Pack:
    """Remove from ``buffer`` and return one pack: longest first, then longest that fits.

    A sample longer than ``max_tokens`` on its own must have been dropped upstream (the
    tokenizer's ``max_length`` is at most the pack length); it is an error here.
    """
    if not buffer:
        raise ValueError("best_fit_pack needs a non-empty buffer")
    order = sorted(range(len(buffer)), key=lambda i: sample_length(buffer[i]), reverse=True)
    if sample_length(buffer[order[0]]) > max_tokens:
        raise ValueError(
            f"sample of {sample_length(buffer[order[0]])} tokens exceeds max_packed_tokens={max_tokens}; "
            "set data.max_length <= packing.max_tokens"
        )
    pack = Pack()
    chosen: list[int] = []
    for i in order:
        if sample_fits(buffer[i], pack, max_tokens, max_tiles):
            pack.samples.append(buffer[i])
            chosen.append(i)
    for i in sorted(chosen, reverse=True):
        del buffer[i]
    # keep the stream order inside a pack: it makes packs easy to read and compare
    pack.samples.sort(key=lambda s: s.get("index", 0))
    return pack


def iter_packs(
    samples: Iterable[Sample], max_tokens: int, max_tiles: int | None = None, buffer_size: int = 64
) -> Iterator[Pack]:
    """Stream packs from a stream of samples, holding at most ``buffer_size`` samples."""
    buffer: list[Sample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield best_fit_pack(buffer, max_tokens, max_tiles)
    while buffer:
        yield best_fit_pack(buffer, max_tokens, max_tiles)


def packed_position_ids(lengths: list[int]) -> torch.Tensor:
    """Position ids that restart at 0 for every packed sample."""
    return (
        torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        if lengths
        else torch.zeros(0, dtype=torch.long)
    )


def fill_ratio(packs: Iterable[Pack], max_tokens: int) -> float:
    """Real tokens over token slots: how much of the compute goes to data rather than padding."""
    packs = list(packs)
    return sum(p.num_tokens for p in packs) / (max_tokens * len(packs)) if packs else 0.0
