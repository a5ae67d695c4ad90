"""`vlmtune convert SRC --out DST --to hf|original`: an InternVL3 checkpoint between the original layout
(`InternVLChatModel`: OpenGVLab's releases, the official trainer) and transformers' `-hf` one.

Reads config.json and the safetensors as data (no remote code, no pickle), streams tensor by tensor and
writes as many shards as the source; tokenizer, chat template and generation config are copied. Only
Qwen2 LLMs convert (InternVL3 1B/2B/8B/14B/38B/78B). The summary printed on success carries the serving
settings (tiling, tile size, template) to build the processor from; no processor files are written.
An error exits 2 with a one-line message naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune convert", description=__doc__)
    parser.add_argument("src", help="checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="directory to write (must not exist, or be empty)")
    parser.add_argument("--to", required=True, choices=("hf", "original"), help="the layout to write")
    args = parser.parse_args(argv)

    from vlmtune.train.model.original_format import convert

    try:
        summary = convert(args.src, args.out, args.to)
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"vlmtune convert: {message}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
