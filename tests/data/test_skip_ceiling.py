"""The skip ceiling: a run whose samples are nearly all skipped stops with the reasons; one that skips a
few bad lines among many never does."""

from __future__ import annotations

import pytest

from vlmtune.data.report import NoProgressError, SkipCeiling, SkipReport


def _skip(report: SkipReport, line: int, reason: str = "missing_image") -> dict:
    return report.skip("shapes", f"/data/shapes/train.jsonl:{line}", reason, f"/data/img/{line}.png")


def test_every_sample_skipped_stops_at_the_end_of_the_first_window(tmp_path):
    report, ceiling = SkipReport(), SkipCeiling(window=20, max_fraction=0.5)
    with pytest.raises(NoProgressError) as e:
        for line in range(1, 1000):
            ceiling.observe(_skip(report, line))
    assert ceiling.seen == 20  # not one sample later
    message = str(e.value)
    assert "20 of the last 20 samples were skipped" in message
    assert "missing_image x20" in message and "/data/shapes/train.jsonl x20" in message
    assert "/data/shapes/train.jsonl:1: missing_image: /data/img/1.png" in message


def test_a_few_bad_lines_among_many_never_stop_the_run():
    report, ceiling = SkipReport(), SkipCeiling(window=20, max_fraction=0.5)
    for i in range(2000):
        bad = i % 3 == 0  # a third of all samples, spread out: under the ceiling in every window
        ceiling.observe(_skip(report, i, "corrupt_image") if bad else None)
    assert ceiling.seen == 2000 and report.total == 667


def test_a_burst_after_a_good_start_stops_within_a_window():
    """A dataset that goes bad later (its images deleted mid-run) trips it as soon as a window is over."""
    report, ceiling = SkipReport(), SkipCeiling(window=20, max_fraction=0.5)
    for _ in range(500):
        ceiling.observe(None)
    with pytest.raises(NoProgressError, match="11 of the last 20"):
        for line in range(100):
            ceiling.observe(_skip(report, line))
    assert ceiling.seen == 511  # 10 skips in the window are allowed, the 11th is not


def test_bad_settings_are_refused():
    for window, fraction in ((0, 0.5), (10, 0.0), (10, 1.5)):
        with pytest.raises(ValueError, match="skip ceiling"):
            SkipCeiling(window, fraction)
