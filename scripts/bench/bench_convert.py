"""Benchmark `vlmtune convert`: time and peak memory of an original -> -hf conversion against copying the
same files (the least any conversion must cost: reading and writing every byte once).

A random-weight checkpoint of a real size (``--size``, a `configs/model` preset; default InternVL3-1B in
bf16) is written once in the original layout (the model card's), then each round runs, in fresh
processes and in alternating order, the conversion (`original_format.convert`, streamed tensor by
tensor) and `shutil.copytree` of the same directory. Reported: median [min, max] seconds and peak RSS
of each side, and the per-round ratios convert / copy. Peak RSS below the checkpoint's size shows the
model is never held whole in memory.

    OMP_NUM_THREADS=1 python scripts/bench/bench_convert.py [--size internvl3_1b] [--repeats 5]
    OMP_NUM_THREADS=1 python scripts/bench/bench_convert.py --smoke      # the tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.bench.common import announce, peak_rss_mib, ratio, run_rounds, summary, write_result  # noqa: E402

SIDES = ("convert", "copy")


def write_original_checkpoint(size: str, out: Path) -> dict[str, Any]:
    """``size``'s architecture with uninitialised bf16 weights (values do not matter to a conversion),
    saved as transformers does and converted to the original layout at ``out``."""
    import torch
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    from vlmtune.train.model.build import build_internvl_config
    from vlmtune.train.model.original_format import convert
    from vlmtune.train.model.tiny import build_tiny_checkpoint
    from vlmtune.train.runtime.config import model_preset

    hf = out.with_name(out.name + "-hf")
    if size == "tiny":
        build_tiny_checkpoint(hf)
    else:
        cfg = model_preset(size)  # its published image_token_id; no tokenizer: the tensors are what is timed
        with no_init_weights():
            model = InternVLForConditionalGeneration._from_config(
                build_internvl_config(cfg, None, require_image_token=False), dtype=torch.bfloat16
            )
        model.save_pretrained(hf)
        del model
    convert(hf, out, "original")
    shutil.rmtree(hf)
    size_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"checkpoint_bytes": size_bytes, "tensors": len(read_index_names(out))}


def read_index_names(model_dir: Path) -> list[str]:
    from vlmtune.train.model.original_format import read_safetensors_header

    return [
        k
        for f in sorted(model_dir.glob("*.safetensors"))
        for k in read_safetensors_header(f)[0]
        if k != "__metadata__"
    ]


def child(args: argparse.Namespace) -> None:
    """One side in a fresh process: the same imports on both sides first, so ``peak_growth_mib`` (peak RSS
    above the RSS after import) is the side's own memory."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration  # noqa: F401  (lazy modules)

    from scripts.bench.common import rss_mib
    from vlmtune.train.model.original_format import convert

    src, dst = Path(args.src), Path(args.tmp) / "out"
    before = rss_mib()
    t0 = time.perf_counter()
    if args.side == "convert":
        convert(src, dst, "hf")
    else:
        shutil.copytree(src, dst)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    Path(args.child_out).write_text(
        json.dumps({"seconds": seconds, "peak_rss_mib": peak, "peak_growth_mib": peak - before})
    )


def run_side(side: str, src: Path) -> dict[str, Any]:
    import subprocess

    from scripts.bench.common import child_env

    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--src",
            str(src),
            "--child-out",
            str(out),
            "--tmp",
            tmp,
        ]
        proc = subprocess.run(cmd, env=child_env(1), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="internvl3_1b", help="a configs/model preset, or tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 rounds")
    parser.add_argument(
        "--workdir", default=None, help="where the checkpoint is written (default: a temp dir)"
    )
    parser.add_argument("--out", default="outputs/bench/convert.json")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    size, repeats = ("tiny", 2) if args.smoke else (args.size, args.repeats)
    at_start = announce(f"bench_convert: {size}, {repeats} rounds of {', '.join(SIDES)}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src = Path(work) / "original"
        info = write_original_checkpoint(size, src)
        print(f"checkpoint: {info['checkpoint_bytes'] / 2**30:.2f} GiB in the original layout")
        runs = run_rounds(SIDES, repeats, lambda side, _: run_side(side, src))
    result: dict[str, Any] = {"size": size, "repeats": repeats, **info}
    for side in SIDES:
        result[side] = {
            k: summary([r[k] for r in runs[side]]) for k in ("seconds", "peak_rss_mib", "peak_growth_mib")
        }
    result["convert_over_copy"] = {
        "seconds": ratio([r["seconds"] for r in runs["convert"]], [r["seconds"] for r in runs["copy"]])
    }
    result["peak_growth_over_checkpoint"] = (
        result["convert"]["peak_growth_mib"]["max"] * 2**20 / info["checkpoint_bytes"]
    )
    for side in SIDES:
        s, m, g = (result[side][k] for k in ("seconds", "peak_rss_mib", "peak_growth_mib"))
        print(
            f"{side:8s} {s['median']:7.2f} s [{s['min']:.2f}, {s['max']:.2f}]   "
            f"peak RSS {m['median']:7.0f} MiB [{m['min']:.0f}, {m['max']:.0f}], "
            f"{g['median']:.0f} MiB above the imports"
        )
    r = result["convert_over_copy"]
    print(
        f"convert / copy: time {r['seconds']['median']:.2f}x [{r['seconds']['min']:.2f}, {r['seconds']['max']:.2f}]; "
        f"convert's peak growth = {result['peak_growth_over_checkpoint']:.3f} x the checkpoint's size"
    )
    write_result(args.out, result, at_start)


if __name__ == "__main__":
    main()
