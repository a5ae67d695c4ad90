"""Run every record of a meta file through the training path and report (`vlmtune check-data`).

Each line of each dataset goes through the very `SampleProcessor` the trainer uses (no
augmentation; `PairProcessor` for a dataset of preference pairs), so the skip counts, tile counts
and token lengths printed here are the ones training will meet. Skips are reported, not fatal
(exit 0); the command (train/commands/check_data.py) exits 2 on a start-up error (missing meta or
annotation file, unknown meta key, unreadable model dir).
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from typing import Any

import torch
from tqdm import tqdm

from vlmtune.data.dataset import SampleProcessor
from vlmtune.data.meta import DatasetSpec, RecordSource, record_source
from vlmtune.data.pairs import PairProcessor, is_pair_record
from vlmtune.data.report import SkipReport, SkipSample


def length_bucket(n: int) -> str:
    """Power-of-two bucket label of a token length: ``"<=256"`` for 129..256."""
    edge = 64
    while edge < n:
        edge *= 2
    return f"<={edge}"


class DatasetStats:
    """Per-dataset running totals for the summary."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.lines = 0
        self.ok = 0
        self.images = 0
        self.tiles = 0
        self.max_tiles = 0
        self.tokens = 0
        self.max_tokens = 0
        self.labelled = 0
        self.histogram: Counter[str] = Counter()

    def add(self, sample: dict[str, Any]) -> None:
        if "prompt_ids" in sample:  # a preference pair: its longer side, both responses' labels
            n = len(sample["prompt_ids"]) + max(len(sample["chosen_ids"]), len(sample["rejected_ids"]))
            labels = torch.cat([sample["chosen_labels"], sample["rejected_labels"]])
        else:
            n, labels = len(sample["input_ids"]), sample["labels"]
        self.ok += 1
        self.images += sample["num_images"]
        self.tiles += sample["num_tiles"]
        self.max_tiles = max(self.max_tiles, sample["num_tiles"])
        self.tokens += n
        self.max_tokens = max(self.max_tokens, n)
        self.labelled += int((labels != -100).sum())
        self.histogram[length_bucket(n)] += 1

    def to_dict(self, skipped: dict[str, int]) -> dict[str, Any]:
        ok = max(self.ok, 1)
        return {
            "annotation": str(self.spec.annotation),
            "repeat_time": self.spec.repeat_time,
            "lines": self.lines,
            "ok": self.ok,
            "skipped": dict(sorted(skipped.items())),
            "images_per_sample": self.images / ok,
            "tiles_per_sample": self.tiles / ok,
            "max_tiles": self.max_tiles,
            "total_tiles": self.tiles,
            "tokens_per_sample": self.tokens / ok,
            "max_tokens": self.max_tokens,
            "total_tokens": self.tokens,
            "labelled_tokens": self.labelled,
            "est_epoch_tokens": round(self.tokens * self.spec.repeat_time),
            "length_histogram": dict(sorted(self.histogram.items(), key=lambda kv: int(kv[0][2:]))),
        }


def holds_pairs(jf: RecordSource, probe: int = 10) -> bool:
    """Whether an annotation (jsonl or Hugging Face dataset) holds preference pairs: its first parseable
    record decides."""
    for k in range(min(probe, jf.num_records)):
        try:
            return is_pair_record(jf.read(k))
        except SkipSample:
            continue
    return False


def scan(
    specs: list[DatasetSpec], processor: SampleProcessor, report: SkipReport, limit: int | None = None
) -> dict[str, DatasetStats]:
    """Process every record of every dataset once (no repeats, no augmentation); fill stats and report."""
    stats = {}
    pairs = PairProcessor(processor.cfg, processor.tokenizer, processor.tokens_per_tile)
    for spec in specs:
        st = stats[spec.name] = DatasetStats(spec)
        jf = record_source(spec)
        process = pairs if holds_pairs(jf) else processor
        n = jf.num_records if limit is None else min(limit, jf.num_records)
        for k in tqdm(range(n), desc=spec.name, unit="line", file=sys.stderr, leave=False):
            st.lines += 1
            try:
                st.add(process(spec, k, random.Random(k), training=False))
            except SkipSample as e:
                report.skip(spec.name, jf.source(k), e.reason, e.detail)
    return stats


def summary_table(result: dict[str, Any]) -> str:
    """Fixed-width table: one row per dataset plus a total row."""
    head = f"{'dataset':<28}{'lines':>8}{'ok':>8}{'skipped':>8}{'img/s':>7}{'tiles/s':>8}{'tok/s':>8}{'max tok':>8}{'est tokens':>13}"
    rows = [head, "-" * len(head)]
    for name, d in result["datasets"].items():
        rows.append(
            f"{name[:27]:<28}{d['lines']:>8}{d['ok']:>8}{sum(d['skipped'].values()):>8}"
            f"{d['images_per_sample']:>7.2f}{d['tiles_per_sample']:>8.2f}{d['tokens_per_sample']:>8.0f}"
            f"{d['max_tokens']:>8}{d['est_epoch_tokens']:>13,}"
        )
    t = result["totals"]
    rows.append("-" * len(head))
    rows.append(
        f"{'total':<28}{t['lines']:>8}{t['ok']:>8}{t['skipped']:>8}{'':>39}{t['est_epoch_tokens']:>13,}"
    )
    for name, d in result["datasets"].items():
        if d["skipped"]:
            rows.append(f"  {name} skipped: " + ", ".join(f"{r}={c}" for r, c in d["skipped"].items()))
        rows.append(f"  {name} lengths: " + "  ".join(f"{b}:{c}" for b, c in d["length_histogram"].items()))
    return "\n".join(rows)
