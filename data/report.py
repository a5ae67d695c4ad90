"""Bad-input accounting: why a sample left the pipeline, counted per reason and per dataset.

A single bad line among millions must never stop a run, but it must not vanish silently either:
every stage that rejects a sample raises `SkipSample`, and the loop that drives the stages records
it in a `SkipReport`. The same report feeds `vlmtune check-data` and the trainer's metrics, so the
counts a user sees before training are the counts training will see.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any

#: Every reason an SFT sample can be skipped for, in one place (name -> what it means).
REASONS: dict[str, str] = {
    "malformed_json": "the jsonl line is not a JSON object",
    "missing_field": "a required field (conversations, from, value; a pair's question, chosen, rejected) is absent or empty",
    "bad_conversation": "a field has the wrong type or the turns do not alternate human/gpt",
    "missing_image": "the image file does not exist",
    "corrupt_image": "the image file cannot be decoded",
    "zero_size_image": "the image has a zero width or height",
    "missing_video": "the video file does not exist",
    "video_decode_error": "the video file cannot be decoded",
    "placeholder_mismatch": "the number of <image>/<video> placeholders differs from the media given",
    "too_long": "the tokenised sample is longer than max_length (never truncated through image tokens)",
}
#: The further reasons a preference pair (data/pairs.py) can be skipped for.
PAIR_REASONS: dict[str, str] = {
    "empty_response": "a pair's chosen or rejected response is empty or whitespace",
    "identical_pair": "a pair's chosen and rejected responses are the same text: no preference to learn",
}
#: Every reason any stage may raise: what `SkipSample` and `SkipReport` accept.
ALL_REASONS: dict[str, str] = {**REASONS, **PAIR_REASONS}


class SkipSample(Exception):
    """Raised by a pipeline stage for input that cannot become a training sample."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in ALL_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to data.report.REASONS or PAIR_REASONS")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def split_source(source: str) -> tuple[str, int | None]:
    """``"path/to/file.jsonl:12"`` -> ``("path/to/file.jsonl", 12)``; no line number -> ``None``."""
    file, sep, line = source.rpartition(":")
    if sep and line.isdigit():
        return file, int(line)
    return source, None


class SkipReport:
    """Counts of skipped samples per reason and per dataset, plus a log of each skip.

    ``log_path`` (optional) streams every skip to a jsonl file as it happens, so a crash
    does not lose the record; ``write_log`` writes the in-memory log in one go.
    """

    def __init__(self, log_path: str | Path | None = None) -> None:
        self.by_reason: Counter[str] = Counter()
        self.by_dataset: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.entries: list[dict[str, Any]] = []
        self._log = open(log_path, "w", encoding="utf-8") if log_path is not None else None

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, dataset: str, source: str, reason: str, detail: str = "") -> dict[str, Any]:
        """Record one skipped sample (``source`` is ``"file:line"``); returns its log entry."""
        if reason not in ALL_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to data.report.REASONS or PAIR_REASONS")
        file, line = split_source(source)
        entry = {"dataset": dataset, "file": file, "line": line, "reason": reason, "detail": detail}
        self.by_reason[reason] += 1
        self.by_dataset[dataset][reason] += 1
        self.entries.append(entry)
        if self._log is not None:
            self._log.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._log.flush()
        return entry

    def merge(self, other: SkipReport) -> SkipReport:
        """Add ``other``'s counts and log to this report (e.g. from another dataloader worker)."""
        self.by_reason.update(other.by_reason)
        for dataset, counts in other.by_dataset.items():
            self.by_dataset[dataset].update(counts)
        self.entries.extend(other.entries)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts: total, per reason, per dataset (entries are in the log, not here)."""
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.by_reason.items())),
            "by_dataset": {name: dict(sorted(c.items())) for name, c in sorted(self.by_dataset.items())},
        }

    def write_log(self, path: str | Path) -> None:
        """Write every recorded skip as one jsonl line: dataset, file, line, reason, detail."""
        with open(path, "w", encoding="utf-8") as f:
            for entry in self.entries:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class NoProgressError(RuntimeError):
    """A run whose samples are (nearly) all being skipped: it would 'train' on almost nothing, or forever."""


class SkipCeiling:
    """Stops a run that cannot make progress: more than ``max_fraction`` of the last ``window`` samples
    skipped (a mistyped image root, every pair longer than a pack). One bad line among many never trips
    it; the error names the top reasons and the files they came from."""

    def __init__(self, window: int = 256, max_fraction: float = 0.5) -> None:
        if window < 1 or not 0.0 < max_fraction <= 1.0:
            raise ValueError(
                f"skip ceiling: window={window} must be >= 1 and 0 < max_fraction={max_fraction} <= 1"
            )
        self.window, self.max_fraction = window, max_fraction
        self.recent: deque[dict[str, Any] | None] = deque(maxlen=window)  # a skip's entry, None for a sample
        self.skipped = 0
        self.seen = 0

    def observe(self, skip: dict[str, Any] | None) -> None:
        """One sample left the data stage: ``skip`` is its skip entry (dataset, file, line, reason), or None."""
        if len(self.recent) == self.window and self.recent[0] is not None:
            self.skipped -= 1
        self.recent.append(skip)
        self.seen += 1
        self.skipped += skip is not None
        if len(self.recent) == self.window and self.skipped > self.max_fraction * self.window:
            raise NoProgressError(self.message())

    def message(self) -> str:
        skips = [e for e in self.recent if e is not None]
        reasons = Counter(e["reason"] for e in skips).most_common(3)
        files = Counter(e["file"] for e in skips).most_common(3)
        first = skips[0]
        where = f"{first['file']}:{first['line']}" if first.get("line") is not None else first["file"]
        return (
            f"{self.skipped} of the last {self.window} samples were skipped (ceiling {self.max_fraction:.0%}, "
            f"{self.seen} samples seen): "
            + ", ".join(f"{r} x{n}" for r, n in reasons)
            + " | files: "
            + ", ".join(f"{f} x{n}" for f, n in files)
            + f" | e.g. {where}: {first['reason']}: {first.get('detail') or ALL_REASONS[first['reason']]}"
            + " (the full list is in output_dir/skipped_rank*.jsonl)"
        )
