"""Every benchmark script in CI's smoke mode (``--smoke``: tiny sizes), run as a user runs it, in a subprocess.

Each test reads the JSON the script wrote and checks a property of what it measured, not that it ran:
identical tiles, fuller packed rows, equal step-1 losses, one vision pass per pair, per-rank memory.
The five scripts run two at a time (the machine has 2 cores) from the first test that needs one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from scripts.bench.common import child_env

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
SCRIPTS = ("bench_data", "bench_sft", "bench_sft_peer", "bench_mpo", "bench_zero")


@pytest.fixture(scope="module")
def smoke(request, tmp_path_factory, tiny_model_dir):
    """script name -> Future of (its JSON result, its stdout); bench_zero only with --runslow."""
    root = tmp_path_factory.mktemp("bench_smoke")
    scripts = [n for n in SCRIPTS if n != "bench_zero" or request.config.getoption("--runslow")]

    def run(name: str) -> tuple[dict, str]:
        work, out = root / name, root / f"{name}.json"
        work.mkdir()
        (work / "tiny").symlink_to(tiny_model_dir)  # the scripts build it when missing
        cmd = [sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--out", str(out)]
        cmd += [] if name == "bench_data" else ["--workdir", str(work)]
        proc = subprocess.run(cmd, env=child_env(1), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stderr[-3000:]}"
        return json.loads(out.read_text()), proc.stdout

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures: dict[str, Future] = {name: pool.submit(run, name) for name in scripts}
        yield futures
        for f in futures.values():
            f.cancel()


def _stamped(result: dict, name: str) -> None:
    assert f"python scripts/bench/{name}.py --smoke --out " in result["command"]
    assert len(result["machine"]["load_average"]) == 3 and result["machine"]["usable_cores"] >= 1


def test_data_tiles_identical_to_the_model_cards(smoke):
    result, stdout = smoke["bench_data"].result()
    _stamped(result, "bench_data")
    assert result["max_abs_diff_without_jpeg"] == 0.0
    tiles = result["config"]["tiles_per_pass_per_side"]
    assert tiles["ours"] == tiles["reference"] > result["config"]["images"]  # several tiles per image
    r = result["ratio_per_round"]
    assert (
        r["min"] <= r["median"] <= r["max"] and len(result["ours"]["per_round"]) == result["config"]["rounds"]
    )
    assert "load average" in stdout.splitlines()[0]


def test_sft_packing_fills_rows_padding_wastes(smoke):
    result, _ = smoke["bench_sft"].result()
    _stamped(result, "bench_sft")
    fill = result["fill_ratio"]
    assert fill["internvl_like_packed_8192"] > 0.95 > 0.6 > fill["internvl_like_padded"]
    assert 0 < fill["demo_padded"] < 1
    assert set(result["tokens_per_s"]) == {"packed", "packed_dense_mask", "padded"}


def test_sft_peer_same_tokens_same_step1_loss_no_padding(smoke):
    result, _ = smoke["bench_sft_peer"].result()
    _stamped(result, "bench_sft_peer")
    check = result["loss_check"]
    assert check["template_renders_the_same_text"] and check["same_input_ids"] and check["same_labels"]
    assert check["differ"] == {"text": [], "input_ids": [], "labels": [], "tiles": []}
    assert check["tiles"]["ours"] == check["tiles"]["trl"] > check["samples"]
    losses = check["losses"]
    # same pixels: the same token-averaged NLL to float32 precision
    assert losses["ours_on_trl_pixels"] == pytest.approx(losses["trl"], rel=1e-5)
    # the processors' resizes differ by a little
    assert losses["ours"] == pytest.approx(losses["trl"], rel=1e-3)
    assert result["first_step_loss_max_rel_diff"] < 1e-5
    # and the same loss at every step: the same gradients and AdamW updates (full run: < 3e-6 over 22 steps)
    assert result["every_step_loss_max_rel_diff"] < 1e-4
    ours, trl = result["sides"]["ours"], result["sides"]["trl"]
    assert (
        ours["tokens"]["real"] == trl["tokens"]["real"]
        and ours["tokens"]["supervised"] == trl["tokens"]["supervised"]
    )
    assert ours["fill_ratio"] == 1.0 > trl["fill_ratio"]  # one packed row vs right-padded rows
    assert trl["tokens"]["slots"] > trl["tokens"]["real"]
    for side in (ours, trl):
        assert side["peak_rss_mib"]["median"] > side["rss_before_steps_mib"]["median"] > 0


def test_mpo_one_vision_pass_per_pair(smoke):
    result, _ = smoke["bench_mpo"].result()
    _stamped(result, "bench_mpo")
    sides, pairs = result["sides"], result["settings"]["pairs_per_step"]
    assert sides["ours"]["vision_calls_per_pair"] == 1 / pairs
    assert sides["ours"]["encodings_per_tile"] == 1 and sides["trl"]["encodings_per_tile"] == 4
    assert result["trl_over_ours"]["tiles_encoded"]["median"] == 4
    assert sides["ours"]["image_tiles_per_pair"] == sides["trl"]["image_tiles_per_pair"] > 1
    for rs in result["runs"].values():
        assert all(r["peak_rss_mib"] > r["rss_before_steps_mib"] > 0 for r in rs)


@pytest.mark.slow  # two 2-rank ZeRO runs (~1.5 min); the ZeRO tests in tests/train check what it measures
def test_zero_records_each_ranks_peak_and_the_plan(smoke):
    result, _ = smoke["bench_zero"].result()
    _stamped(result, "bench_zero")
    layouts, idle = result["layouts"], result["idle_peak_rss_mib"]["median"]
    assert idle > 0
    assert [lay["processes"] for lay in layouts.values()] == [1, 2]
    for lay in layouts.values():
        assert len(lay["peak_rss_mib_per_rank"]) == lay["processes"]
        # a training rank holds more than a process that only imports the same modules
        assert all(peak["min"] > idle for peak in lay["peak_rss_mib_per_rank"])
    planned = {name: lay["plan"]["model_states_per_rank_mib"]["total"] for name, lay in layouts.items()}
    assert 0 < planned["zero3"] < planned["zero0"]
    assert result["ratios"]["zero3_over_zero0"]["planned_model_states"] == planned["zero3"] / planned["zero0"]
