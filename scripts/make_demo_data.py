"""Write the synthetic shapes dataset the demo trains on (see data/synthetic.py).

python scripts/make_demo_data.py demo_data --num-train 4000 --num-eval 400
vlmtune check-data demo_data/meta_train.json

--pairs also writes the preference pairs for MPO (MMPR format) next to it:
python scripts/make_demo_data.py demo_data --pairs --num-pairs-train 2000 --num-pairs-eval 200
-> demo_data/meta_pairs_train.json, demo_data/meta_pairs_eval.json
"""

from __future__ import annotations

import argparse
import time

from vlmtune.data.synthetic import generate_pair_dataset, generate_sft_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=40, help="smallest image side in pixels")
    parser.add_argument("--max-side", type=int, default=300, help="largest image side in pixels")
    parser.add_argument(
        "--videos", type=int, default=0, help="short videos in the training split (needs PyAV)"
    )
    parser.add_argument(
        "--max-dynamic-patch", type=int, help="write this per-dataset tile limit into the meta files"
    )
    parser.add_argument("--pairs", action="store_true", help="also write MPO preference pairs (MMPR format)")
    parser.add_argument("--num-pairs-train", type=int, default=2000)
    parser.add_argument("--num-pairs-eval", type=int, default=200)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    meta = generate_sft_dataset(
        args.out_dir,
        num_train=args.num_train,
        num_eval=args.num_eval,
        seed=args.seed,
        image_size_range=(args.min_side, args.max_side),
        num_videos=args.videos,
        max_dynamic_patch=args.max_dynamic_patch,
    )
    print(f"wrote {meta} and {meta.with_name('meta_eval.json')} in {time.perf_counter() - t0:.1f}s")
    if args.pairs:
        t0 = time.perf_counter()
        meta = generate_pair_dataset(
            args.out_dir,
            num_train=args.num_pairs_train,
            num_eval=args.num_pairs_eval,
            seed=args.seed,
            image_size_range=(args.min_side, args.max_side),
            max_dynamic_patch=args.max_dynamic_patch,
        )
        print(f"wrote {meta} and {meta.with_name('meta_pairs_eval.json')} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
