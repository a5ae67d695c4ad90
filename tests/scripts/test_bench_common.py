"""scripts/bench/common.py: summaries, per-round ratios, round order, and a child's own peak memory."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from scripts.bench.common import child_env, ratio, round_order, summary


def test_summary_and_per_round_ratio():
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "spread": 1.0}
    # per round: 2/1, 3/2, 8/4 -> 2.0, 1.5, 2.0 (the ratio of the medians would be 3/2)
    assert ratio([2.0, 3.0, 8.0], [1.0, 2.0, 4.0]) == {"median": 2.0, "min": 1.5, "max": 2.0, "spread": 0.25}
    with pytest.raises(ValueError, match="3 and 2 rounds"):
        ratio([1.0, 2.0, 3.0], [1.0, 2.0])


def test_round_order_alternates():
    assert [round_order(("a", "b", "c"), r) for r in range(3)] == [
        ["a", "b", "c"],
        ["c", "b", "a"],
        ["a", "b", "c"],
    ]


def test_a_child_reports_its_own_peak_not_its_parents():
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: 400 MiB resident here
    code = (
        "import resource; from scripts.bench.common import peak_rss_mib; "
        "print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(1), capture_output=True, text=True, check=True
    )
    own, inherited = (float(x) for x in proc.stdout.split())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 400
    assert inherited > 400  # why ru_maxrss is not used: the child starts with its parent's peak
    assert own < inherited / 4  # an interpreter and one small module, far below the parent's 400 MiB ballast
    del ballast
