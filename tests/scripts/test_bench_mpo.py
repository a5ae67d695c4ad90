"""scripts/bench/bench_mpo.py: both sides train on the same tiles, and only ours encodes each tile once.

The script's command line (``--smoke``, fresh processes, the JSON) is tested in test_bench_smoke.py."""

from __future__ import annotations

import math

import pytest

from scripts.bench import bench_mpo as bench


def test_sides_in_process_count_vision_work_and_start_at_the_same_loss(tiny_model_dir, tmp_path):
    args = bench.parse_args(["--smoke", "--tmp", str(tmp_path)])
    (tmp_path / "tiny").symlink_to(tiny_model_dir)
    ckpt, meta = bench.prepare(tmp_path, (args.warmup + args.steps) * args.pairs, args.max_dynamic_patch)
    ours = bench.run_ours(args, ckpt, meta)
    trl = bench.run_trl(args, ckpt, meta)

    # same images, same tiling: several tiles per image on both sides
    assert ours["image_tiles_per_pair"] == trl["image_tiles_per_pair"] > 1
    # ours: one vision call per step (the policy's), reused by the reference
    assert (ours["policy_calls"], ours["reference_calls"]) == (args.steps, 0)
    assert ours["vision_calls_per_pair"] == 1 / args.pairs
    assert ours["encodings_per_tile"] == 1
    # TRL: policy and reference each encode the images of chosen and rejected
    assert (trl["policy_calls"], trl["reference_calls"]) == (args.steps, args.steps)
    assert trl["encodings_per_tile"] == 4
    assert trl["tiles_encoded_per_pair"] == 4 * ours["tiles_encoded_per_pair"]
    # step 1, policy == reference: DPO = log 2, BCO = 2 log 2 (delta 0), weighted 0.8 / 0.2 / 1.0
    first = ours["first_step_metrics"]
    assert first["loss"] == pytest.approx(
        0.8 * math.log(2) + 0.2 * 2 * math.log(2) + first["loss/generation"]
    )
    # TRL's sum is the same but for its NLL, which also scores the "\n" after <|im_end|>
    assert ours["losses"][0] == pytest.approx(trl["losses"][0], rel=0.02)
