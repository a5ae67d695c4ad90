"""Write the tiny InternVL3 checkpoint (model + tokenizer + processor, HF `-hf` layout) to a directory.

python scripts/make_tiny_model.py --out runs/tiny_model
"""

from __future__ import annotations

import argparse

from vlmtune.train.model.build import count_parameters
from vlmtune.train.model.tiny import build_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    args = parser.parse_args()
    path = build_tiny_checkpoint(args.out)

    from transformers import InternVLForConditionalGeneration

    counts = count_parameters(InternVLForConditionalGeneration.from_pretrained(path))
    print(f"wrote {path}: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
