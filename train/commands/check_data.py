"""`vlmtune check-data <meta.json>`: every record through the training path, counts and lengths.

Skips are reported, not fatal (exit 0); a start-up error (missing meta or annotation file, unknown
meta key, unreadable model dir) exits 2 with the message.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlmtune.data.check import scan, summary_table
from vlmtune.data.dataset import SampleProcessor
from vlmtune.data.meta import MetaError, load_meta
from vlmtune.data.report import ALL_REASONS, SkipReport
from vlmtune.train.runtime.evaluate import trained_data_config

TINY_IMAGE_SIZE = 56
TINY_TOKENS_PER_TILE = 16


def load_tokenizer(model_dir: str | None) -> tuple[Any, int, int]:
    """(tokenizer, tile size, tokens per tile) from a checkpoint dir, or the in-memory tiny tokenizer."""
    if model_dir is None:
        from vlmtune.train.model.tiny import build_tokenizer

        return build_tokenizer(None), TINY_IMAGE_SIZE, TINY_TOKENS_PER_TILE
    from transformers import AutoTokenizer

    from vlmtune.train.model.build import num_image_tokens_per_tile, tile_size
    from vlmtune.train.model.original_format import internvl_config

    path = Path(model_dir)
    if not path.is_dir():
        raise MetaError(f"--model-dir {path}: not a directory")
    config = internvl_config(path)  # either layout: the model card's original one is read as data
    return (
        AutoTokenizer.from_pretrained(path),
        tile_size(config.vision_config),
        num_image_tokens_per_tile(config),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune check-data", description=__doc__.splitlines()[0])
    parser.add_argument("meta", help="InternVL meta JSON")
    parser.add_argument(
        "--model",
        "--model-dir",
        dest="model_dir",
        help="model dir (tokenizer + config; a vlmtune export's data settings are the defaults below); "
        "default: the tiny tokenizer",
    )
    parser.add_argument("--max-length", type=int, default=None, help="drop longer samples")
    parser.add_argument("--max-dynamic-patch", type=int, default=None)
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

    # the model's run settings (an export's vlmtune.json) as defaults, the command line over them
    cfg = trained_data_config(args.model_dir, image_size, str(args.meta))
    given = {"max_length": args.max_length, "max_dynamic_patch": args.max_dynamic_patch}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    args.max_length = cfg.max_length
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
