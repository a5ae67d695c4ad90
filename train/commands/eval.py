"""`vlmtune eval --model DIR --meta META [--out eval.json]`: the held-out figures of an exported model.

The model is prompted with the settings it was trained with (its vlmtune.json), so the figures equal
the ones written at the end of training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmtune.train.runtime.evaluate import evaluate_accuracy, trained_data_config


def main(argv: list[str] | None = None) -> int:
    """`vlmtune eval --model DIR --meta META [--out eval.json]` on an exported HF directory."""
    from transformers import AutoTokenizer

    from vlmtune.train.model.build import num_image_tokens_per_tile
    from vlmtune.train.runtime.export import load_trained

    parser = argparse.ArgumentParser(prog="vlmtune eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="HF-format model or LoRA adapter directory (OUTPUT_DIR/hf or /adapter)"
    )
    parser.add_argument("--base", default=None, help="base model of an adapter (default: its adapter_config)")
    parser.add_argument("--meta", required=True, help="InternVL meta JSON of the held-out split")
    parser.add_argument("--out", default=None, help="where to write eval.json (default: print only)")
    parser.add_argument("--max-samples", type=int, default=None)
    args = parser.parse_args(argv)
    model = load_trained(args.model, args.base)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data_cfg = trained_data_config(args.model, model.config, args.meta)
    results = evaluate_accuracy(
        model, tokenizer, data_cfg, num_image_tokens_per_tile(model.config), args.max_samples
    )
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: v for k, v in results.items() if k != "examples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
