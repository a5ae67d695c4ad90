"""scripts/bench/bench_zero.py: the plan it prints is DeepSpeed's fp32 rule, and ZeRO-3 ranks hold less."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts.bench import bench_zero as bench

SCRIPT = bench.__file__
MIB = 2**20


def test_planned_states_follow_fp32_zero_rules(tiny_model_dir):
    args = bench.parse_args(["--smoke"])
    zero0, zero3 = bench.planned(args, "zero0", tiny_model_dir), bench.planned(args, "zero3", tiny_model_dir)
    P = zero0["parameters"]
    assert zero0["trainable"] == P == zero3["parameters"]
    # the wider LLM: embeddings + lm_head (1483 x 512 each) and 4 layers of 512-wide attention + MLP dominate
    assert P > 4 * (512 * 512 * 2 + 2 * 512 * 128 + 3 * 512 * 1408) + 2 * 1483 * 512
    # fp32 on one rank: 4 weight + 4 gradient + 8 Adam bytes per parameter
    assert zero0["model_states_per_rank_mib"]["total"] * MIB == pytest.approx(16 * P)
    # ZeRO-3 on two ranks: half of each, plus one gathered layer (weights and gradient, 4 bytes each)
    ms3 = zero3["model_states_per_rank_mib"]
    assert (ms3["weights"] + ms3["grads"] + ms3["optimizer"]) * MIB == pytest.approx(8 * P)
    assert 0 < ms3["gathered_layer"] * MIB <= 8 * 1483 * 512


def test_summary_ratios_subtract_the_idle_process():
    args = bench.parse_args(["--repeats", "2"])
    plan = {"model_states_per_rank_mib": {"total": 100.0}}
    plans = {"zero0": plan, "zero3": {"model_states_per_rank_mib": {"total": 55.0}}}
    runs = {"zero0": [[1000.0], [1100.0]], "zero3": [[700.0, 760.0], [800.0, 790.0]]}
    result = bench.summarise(runs, [600.0, 700.0], plans, args)
    assert result["layouts"]["zero3"]["max_rank_peak_rss_mib"] == {
        "median": 780.0,
        "min": 760.0,
        "max": 800.0,
        "spread": 40 / 780,
    }
    assert result["layouts"]["zero3"]["growth_mib_per_rank"][1]["median"] == (160 + 90) / 2
    r = result["ratios"]["zero3_over_zero0"]
    assert r["peak_rss"]["max"] == 760 / 1000
    # round 1: (760 - 600) / (1000 - 600) = 0.4; round 2: (800 - 700) / (1100 - 700) = 0.25
    assert r["growth"] == pytest.approx({"median": 0.325, "min": 0.25, "max": 0.4, "spread": 0.15 / 0.325})
    assert r["planned_model_states"] == 0.55


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured 2026-11-26 (72M params, fp32, CPU, model built partitioned by zero.Init): ZeRO-3 "
    "ranks peak 1.20x ZeRO-0's RSS (growth 1.30x) while the plan says 0.52x: DeepSpeed's buffers sized for "
    "billions of parameters (50M-element buckets, 1e9 live parameters) hold more than this whole model, "
    "and glibc keeps freed gather buffers (see the bounded-buffers test)",
)
def test_zero3_ranks_grow_less_than_zero0_by_the_planned_margin(tmp_path):
    """The real runs (minutes on 2 CPU cores): each ZeRO-3 rank's growth over an idle process is below
    ZeRO-0's by at least half of the model-state bytes the plan says partitioning saves."""
    out = tmp_path / "zero.json"
    cmd = [sys.executable, str(SCRIPT), "--repeats", "1", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    lay = result["layouts"]
    saved = (
        lay["zero0"]["plan"]["model_states_per_rank_mib"]["total"]
        - lay["zero3"]["plan"]["model_states_per_rank_mib"]["total"]
    )
    assert saved > 400
    growth0 = lay["zero0"]["growth_mib_per_rank"][0]["median"]
    for rank in lay["zero3"]["growth_mib_per_rank"]:
        assert rank["median"] < growth0 - saved / 2


@pytest.mark.slow
def test_zero3_ranks_grow_less_than_zero0_with_buffers_sized_to_the_model(tmp_path):
    """With DeepSpeed's buckets and live-parameter limit sized to the model and glibc returning freed
    buffers (MALLOC_MMAP_THRESHOLD_), each ZeRO-3 rank grows less than the one ZeRO-0 rank (measured
    0.84x; the plan's 0.52x counts model states only)."""
    import os

    out = tmp_path / "zero.json"
    cmd = [sys.executable, str(SCRIPT), "--repeats", "1", "--bounded-buffers"]
    cmd += ["--workdir", str(tmp_path / "w"), "--out", str(out)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    subprocess.run(cmd, check=True, capture_output=True, timeout=900, env=env)
    lay = json.loads(out.read_text())["layouts"]
    growth0 = lay["zero0"]["growth_mib_per_rank"][0]["median"]
    for rank in lay["zero3"]["growth_mib_per_rank"]:
        assert rank["median"] < 0.95 * growth0
