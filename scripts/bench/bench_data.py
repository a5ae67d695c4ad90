"""Benchmark image preprocessing: ``data.tiling.image_to_tiles`` vs the model card's pipeline.

Reference side: the model card's ``dynamic_preprocess`` (PIL tiles) then ``build_transform``
(Resize -> ToTensor -> Normalize) per tile, stacked, i.e. its ``load_image`` minus the file read.
Ours: ``image_to_tiles`` (one resize, one fused conversion + split, one normalisation).
Both produce the same tensor; this is checked on every image before timing.

The two sides are interleaved (the order alternates every round) over a fixed, seeded set of
random-size images, so machine noise hits both alike; we report the median and the min/max
over rounds. torch runs on one thread (set OMP_NUM_THREADS=1 too) so the figure is per core,
which is how dataloader workers run.

    OMP_NUM_THREADS=1 python scripts/bench/bench_data.py            # full: 48 images x 7 rounds
    OMP_NUM_THREADS=1 python scripts/bench/bench_data.py --smoke    # a few seconds
    ... --jpeg    # add InternVL's random JPEG: per tile on the reference side, once per image on ours
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.bench.common import announce, ratio, round_order, summary, write_result  # noqa: E402
from vlmtune.data.media import jpeg_compress, jpeg_roundtrip  # noqa: E402
from vlmtune.data.tiling import image_to_tiles  # noqa: E402


def _load_reference():
    """The oracle lives in tests/data/reference_tiling.py (one source of truth); load it by path."""
    path = REPO / "tests" / "data" / "reference_tiling.py"
    spec = importlib.util.spec_from_file_location("reference_tiling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_images(count: int, seed: int, min_side: int, max_side: int) -> list[Image.Image]:
    """Seeded RGB images of random sizes with smooth, photo-like content (upsampled noise)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    return images


def time_pass(fn: Callable[[Image.Image], torch.Tensor], images: list[Image.Image]) -> tuple[float, int]:
    """Seconds for one pass over ``images``, and the number of tiles produced."""
    tiles = 0
    start = time.perf_counter()
    for image in images:
        tiles += fn(image).shape[0]
    return time.perf_counter() - start, tiles


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--max-num", type=int, default=12)
    parser.add_argument("--min-side", type=int, default=200)
    parser.add_argument("--max-side", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jpeg", action="store_true", help="include the random JPEG augmentation on both sides"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="4 images, 2 rounds: same code path, a few seconds"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/data.json"))
    args = parser.parse_args()
    if args.smoke:
        args.images, args.rounds = 4, 2

    torch.set_num_threads(1)
    at_start = announce("bench_data")
    ref = _load_reference()
    size, max_num = args.image_size, args.max_num
    transform = ref.build_transform(size)
    images = make_images(args.images, args.seed, args.min_side, args.max_side)

    def reference(image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        tiles = ref.dynamic_preprocess(image, max_num=max_num, image_size=size, use_thumbnail=True)
        if rng is not None:  # InternVL's training transform: a random quality per tile, before Resize
            tiles = [jpeg_roundtrip(tile, rng.randint(75, 100)) for tile in tiles]
        return torch.stack([transform(tile) for tile in tiles])

    def ours(image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if rng is not None:
            image = jpeg_compress(image, rng)
        return image_to_tiles(image, image_size=size, max_num=max_num, use_thumbnail=True)

    # Same work on both sides: without JPEG the outputs must be bit-identical.
    pairs = [(ours(im), reference(im)) for im in images]
    if any(a.shape != b.shape for a, b in pairs):
        raise SystemExit(
            "image_to_tiles gives other tile counts than the reference: fix data/tiling.py first"
        )
    worst = max((a - b).abs().max().item() for a, b in pairs)
    if worst != 0.0:
        raise SystemExit(f"image_to_tiles differs from the reference by {worst}: fix data/tiling.py first")

    sides = {"reference": reference, "ours": ours}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    tiles_per_pass: dict[str, int] = {}
    for fn in sides.values():  # warm-up (allocator, lazy imports)
        fn(images[0], random.Random(0) if args.jpeg else None)
    for round_index in range(args.rounds):
        for name in round_order(list(sides), round_index):
            rng = random.Random(round_index) if args.jpeg else None
            seconds, tiles_per_pass[name] = time_pass(lambda im, fn=sides[name], rng=rng: fn(im, rng), images)
            rates[name].append(len(images) / seconds)

    sides_summary = {name: {**summary(values), "per_round": values} for name, values in rates.items()}
    per_round_ratio = ratio(rates["ours"], rates["reference"])
    result = {
        "benchmark": "image preprocessing (tiling + normalisation), images/s",
        "config": {
            "images": args.images,
            "rounds": args.rounds,
            "image_size": size,
            "max_num": max_num,
            "use_thumbnail": True,
            "side_range": [args.min_side, args.max_side],
            "seed": args.seed,
            "jpeg": args.jpeg,
            "smoke": args.smoke,
            "tiles_per_pass": tiles_per_pass["ours"],
            "tiles_per_pass_per_side": tiles_per_pass,
        },
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "max_abs_diff_without_jpeg": worst,
        "reference": sides_summary["reference"],
        "ours": sides_summary["ours"],
        "ratio_median": sides_summary["ours"]["median"] / sides_summary["reference"]["median"],
        "ratio_per_round": per_round_ratio,
        "versions": {"pillow": PIL.__version__},  # python, torch, cores, load: "machine"
    }

    print(
        f"{args.images} images ({tiles_per_pass['ours']} tiles/pass) at {size}px, max_num {max_num}, thumbnail on, "
        f"jpeg {'on' if args.jpeg else 'off'}; {args.rounds} interleaved rounds; "
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print(f"outputs identical (max |diff| without jpeg = {worst})")
    print(f"{'side':<12}{'median img/s':>14}{'min':>10}{'max':>10}")
    for name in ("reference", "ours"):
        s = sides_summary[name]
        print(f"{name:<12}{s['median']:>14.2f}{s['min']:>10.2f}{s['max']:>10.2f}")
    print(
        f"ratio ours/reference: {result['ratio_median']:.2f}x (median), "
        f"per round {per_round_ratio['min']:.2f}x .. {per_round_ratio['max']:.2f}x"
    )
    write_result(args.out, result, at_start)


if __name__ == "__main__":
    main()
