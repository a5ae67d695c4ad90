"""`vlmtune check-data <meta.json>`: run every record through the training path and report.

Each line of each dataset goes through the very `SampleProcessor` the trainer uses (no
augmentation; `PairProcessor` for a dataset of preference pairs), so the skip counts, tile counts
and token lengths printed here are the ones training will meet. Skips are reported, not fatal
(exit 0); a start-up error (missing meta or annotation file, unknown meta key, unreadable model
dir) exits 2 with the message.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data.dataset import DataConfig, SampleProcessor
from data.meta import DatasetSpec, JsonlFile, MetaError, jsonl_file, load_meta
from data.pairs import PairProcessor, is_pair_record
from data.report import ALL_REASONS, SkipReport, SkipSample

TINY_IMAGE_SIZE = 56
TINY_TOKENS_PER_TILE = 16


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


def load_tokenizer(model_dir: str | None) -> tuple[Any, int, int]:
    """(tokenizer, tile size, tokens per tile) from a checkpoint dir, or the in-memory tiny tokenizer."""
    if model_dir is None:
        from train.tiny import build_tokenizer

        return build_tokenizer(None), TINY_IMAGE_SIZE, TINY_TOKENS_PER_TILE
    from transformers import AutoConfig, AutoTokenizer

    from train.models import num_image_tokens_per_tile

    path = Path(model_dir)
    if not path.is_dir():
        raise MetaError(f"--model-dir {path}: not a directory")
    config = AutoConfig.from_pretrained(path)
    size = config.vision_config.image_size
    size = size if isinstance(size, int) else int(size[0])
    return AutoTokenizer.from_pretrained(path), size, num_image_tokens_per_tile(config)


def holds_pairs(jf: JsonlFile, probe: int = 10) -> bool:
    """Whether an annotation file holds preference pairs: its first parseable record decides."""
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
        jf = jsonl_file(spec.annotation)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune check-data", description=__doc__.splitlines()[0])
    parser.add_argument("meta", help="InternVL meta JSON")
    parser.add_argument(
        "--model-dir", help="checkpoint dir (tokenizer + config); default: the tiny tokenizer"
    )
    parser.add_argument("--max-length", type=int, default=DataConfig.max_length, help="drop longer samples")
    parser.add_argument("--max-dynamic-patch", type=int, default=DataConfig.max_dynamic_patch)
    parser.add_argument("--limit", type=int, help="scan at most this many lines per dataset")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument(
        "--log", help="write every skipped line (dataset, file, line, reason, detail) as jsonl"
    )
    args = parser.parse_args(argv)

    try:
        specs = load_meta(args.meta)
        tokenizer, image_size, tokens_per_tile = load_tokenizer(args.model_dir)
    except (MetaError, OSError, ValueError) as e:
        print(f"vlmtune check-data: {e}", file=sys.stderr)
        return 2

    cfg = DataConfig(
        meta_path=str(args.meta),
        max_length=args.max_length,
        image_size=image_size,
        max_dynamic_patch=args.max_dynamic_patch,
    )
    report = SkipReport()
    stats = scan(specs, SampleProcessor(cfg, tokenizer, tokens_per_tile), report, args.limit)
    datasets = {name: st.to_dict(dict(report.by_dataset.get(name, {}))) for name, st in stats.items()}
    result = {
        "meta": str(Path(args.meta).absolute()),
        "max_length": args.max_length,
        "image_size": image_size,
        "tokens_per_tile": tokens_per_tile,
        "datasets": datasets,
        "totals": {
            "lines": sum(d["lines"] for d in datasets.values()),
            "ok": sum(d["ok"] for d in datasets.values()),
            "skipped": report.total,
            "est_epoch_tokens": sum(d["est_epoch_tokens"] for d in datasets.values()),
        },
        "skips": report.to_dict(),
        "reasons": ALL_REASONS,
    }
    print(summary_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.log:
        report.write_log(args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
