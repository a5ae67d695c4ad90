"""Skip accounting in a real two-rank run: every bad line is recorded once, with its file:line and reason,
by the rank that owns it, the ``skipped`` metric counts each once, and a resume counts none twice.

The data: one bad line of every kind in data/report.py's REASONS (``generate_bad_samples``: malformed JSON,
missing field, bad conversation, missing / corrupt / zero-size image, missing / undecodable video,
placeholder mismatch, too long) among 30 good ones. The lines are placed through the epoch's index
(data/meta.py ``build_index`` with ``data.seed``) so that each rank meets a bad line every third sample of
its shard (positions ``rank::world``): bad lines stay a minority, each rank meets all of its own within
the steps run and never reaches epoch 1 (which would skip them again). What the tests expect (which rank
owns a line, how many skips each step has seen) is computed from the index, not written down.

The interruption: a run to step 6 with checkpoints every 3 steps, then put back to the state a SIGKILL
during step 6's save leaves: the skip files hold the skips of steps 1-6, the last complete checkpoint is
step 3's. The rerun resumes at step 3 and meets the skips of steps 4-6 again; none may be counted twice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.train.e2e import base_overrides, run_sft

WORLD = 2
DATA_SEED = 3  # not the default: the run must shard the index that data.seed builds
BAD_AT = (0, 3, 6, 9, 12)  # the shard indices (of each rank) that hold a bad line
SAVE_EVERY, KILLED_AT, LAST_STEP = 3, 6, 9


def _place_lines(root: Path) -> tuple[Path, Path, dict[int, str]]:
    """meta file, annotation, {file line: reason}: bad lines at BAD_AT of each rank's shard."""
    from vlmtune.data.meta import build_index, load_meta
    from vlmtune.data.report import REASONS
    from vlmtune.data.synthetic import generate_bad_samples, write_meta

    source = generate_bad_samples(root, num_good=28, with_video=False)
    assert sorted(source.expected.values()) == sorted(REASONS)  # one line of every kind
    lines = source.annotation.read_text().splitlines()
    bad = [(reason, lines[n - 1]) for n, reason in sorted(source.expected.items())]
    good = iter(lines[n - 1] for n in source.good_lines)
    total = len(bad) + len(source.good_lines)
    annotation = root / "train.jsonl"
    annotation.write_text("{}\n" * total)  # the index depends only on the number of lines (and names)
    meta = write_meta(root / "meta_skips.json", "skips", annotation.name, data_augment=False)
    index = build_index(load_meta(meta), DATA_SEED)
    slots = {i % WORLD + WORLD * BAD_AT[i // WORLD]: item for i, item in enumerate(bad)}
    placed: list[str] = [""] * total
    expected: dict[int, str] = {}
    for position, (_, line) in enumerate(index):
        if position in slots:
            reason, placed[line] = slots[position]
            expected[line + 1] = reason
        else:
            placed[line] = next(good)
    annotation.write_text("\n".join(placed) + "\n")
    return meta, annotation, expected


def _owners(meta: Path, expected: dict[int, str]) -> dict[int, tuple[int, int]]:
    """{bad line: (rank that owns it, its index in that rank's shard)}, from the index the run builds."""
    from vlmtune.data.meta import build_index, load_meta

    index = build_index(load_meta(meta), DATA_SEED)
    position = {line + 1: p for p, (_, line) in enumerate(index)}
    return {line: (position[line] % WORLD, position[line] // WORLD) for line in expected}


def _skips_seen(meta: Path, expected: dict[int, str], step: int) -> int:
    """Skips all ranks have met once they took their ``step``-th good sample (packing off, one sample a
    micro-batch, so each step takes the next good sample of each rank's shard and the bad ones before it)."""
    from vlmtune.data.meta import build_index, load_meta

    index = build_index(load_meta(meta), DATA_SEED)
    seen = 0
    for rank in range(WORLD):
        good = 0
        for _, line in index[rank::WORLD]:
            if line + 1 in expected:
                seen += 1
            else:
                good += 1
                if good == step:
                    break
        assert good == step, f"rank {rank}'s shard ran out before step {step}: the layout is wrong"
    return seen


def _entries(out: Path) -> dict[int, list[dict]]:
    return {
        rank: [json.loads(line) for line in (out / f"skipped_rank{rank}.jsonl").read_text().splitlines()]
        for rank in range(WORLD)
    }


def _metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.fixture(scope="module")
def skip_runs(tmp_path_factory):
    """The data, then the run to step 6, its state as a kill during step 6's save leaves it, and the rerun
    to step 9 (ZeRO-2 over two ranks, packing off)."""
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("skip_accounting")
    meta, annotation, expected = _place_lines(root / "data")
    ckpt = build_tiny_checkpoint(root / "tiny")
    out = root / "run"
    extra = {
        "deepspeed": "zero2",
        "packing.enabled": False,
        "data.seed": DATA_SEED,
        "train.save_every": SAVE_EVERY,
        "train.keep_last": 2,
        "train.export": False,
    }
    run_sft(base_overrides(ckpt, meta, out, **extra, **{"train.max_steps": KILLED_AT}), nproc=WORLD)
    killed = {
        "entries": _entries(out),
        "metrics": _metrics(out),
        "checkpoint": {
            rank: json.loads(
                (out / "checkpoints" / f"step_{SAVE_EVERY:08d}" / f"vlmtune_rank{rank:05d}.json").read_text()
            )["skipped"]
            for rank in range(WORLD)
        },
    }
    shutil.rmtree(out / "checkpoints" / f"step_{KILLED_AT:08d}")  # the save the kill interrupted
    (out / "checkpoints" / "complete").write_text(f"step_{SAVE_EVERY:08d}")
    proc = run_sft(base_overrides(ckpt, meta, out, **extra, **{"train.max_steps": LAST_STEP}), nproc=WORLD)
    return {
        "meta": meta,
        "annotation": annotation,
        "expected": expected,
        "out": out,
        "killed": killed,
        "log": proc.stdout + proc.stderr,
    }


def _check_each_once_in_its_owners_file(entries, annotation, expected, owners, lines):
    seen: dict[int, list[tuple[int, str]]] = {}
    for rank, rank_entries in entries.items():
        for e in rank_entries:
            assert Path(e["file"]).resolve() == annotation.resolve(), e
            assert e["dataset"] == "skips", e
            seen.setdefault(e["line"], []).append((rank, e["reason"]))
    assert sorted(seen) == sorted(lines), "the skip files list other lines than the bad ones met"
    for line in lines:
        assert seen[line] == [(owners[line][0], expected[line])], (
            f"line {line} ({expected[line]}, owned by rank {owners[line][0]}): recorded as {seen[line]}"
        )


def test_each_bad_line_is_recorded_once_with_its_reason_by_the_rank_that_owns_it(skip_runs):
    expected, meta = skip_runs["expected"], skip_runs["meta"]
    owners = _owners(meta, expected)
    assert {rank for rank, _ in owners.values()} == set(range(WORLD))  # both ranks own bad lines
    # every bad line is met by step 9, so each is listed once, in its owner's file, with its reason
    _check_each_once_in_its_owners_file(
        _entries(skip_runs["out"]), skip_runs["annotation"], expected, owners, list(expected)
    )


def test_skipped_metric_counts_each_skip_once_at_every_step(skip_runs):
    expected, meta = skip_runs["expected"], skip_runs["meta"]
    metrics = _metrics(skip_runs["out"])
    assert [m["step"] for m in metrics] == list(range(1, LAST_STEP + 1))
    assert [m["skipped"] for m in metrics] == [
        _skips_seen(meta, expected, s) for s in range(1, LAST_STEP + 1)
    ]
    assert metrics[-1]["skipped"] == len(expected) == sum(len(e) for e in _entries(skip_runs["out"]).values())


def test_the_closing_line_counts_the_skips_of_every_rank(skip_runs):
    """The user reads "done: step N, K samples skipped" (rank 0 logs it): K is the run's count, as the
    metric's, not rank 0's share."""
    done = [line for line in skip_runs["log"].splitlines() if "done: step" in line]
    assert (
        len(done) == 1 and f"done: step {LAST_STEP}, {len(skip_runs['expected'])} samples skipped" in done[0]
    ), done


def test_a_resume_meets_the_lost_skips_again_and_counts_none_twice(skip_runs):
    expected, meta, killed = skip_runs["expected"], skip_runs["meta"], skip_runs["killed"]
    owners = _owners(meta, expected)
    at_checkpoint = _skips_seen(meta, expected, SAVE_EVERY)
    at_kill = _skips_seen(meta, expected, KILLED_AT)
    # the killed run's files hold skips its last complete checkpoint does not: the case a resume could
    # count twice (else this test would prove nothing)
    assert sum(len(e) for e in killed["checkpoint"].values()) == at_checkpoint
    assert sum(len(e) for e in killed["entries"].values()) == at_kill > at_checkpoint
    assert killed["metrics"][-1]["skipped"] == at_kill
    met_by_kill = [line for line, (_, shard_index) in owners.items() if shard_index < BAD_AT[3]]
    _check_each_once_in_its_owners_file(
        killed["entries"], skip_runs["annotation"], expected, owners, met_by_kill
    )

    assert f"resumed from step_{SAVE_EVERY:08d} at step {SAVE_EVERY}" in skip_runs["log"]
    metrics = _metrics(skip_runs["out"])
    # the resumed steps 4-6 count what the killed run counted at the same steps, not those skips again
    by_step = {m["step"]: m["skipped"] for m in metrics}
    assert [by_step[s] for s in range(1, KILLED_AT + 1)] == [m["skipped"] for m in killed["metrics"]]
    _check_each_once_in_its_owners_file(
        _entries(skip_runs["out"]), skip_runs["annotation"], expected, owners, list(expected)
    )
