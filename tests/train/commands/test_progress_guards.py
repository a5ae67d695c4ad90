"""Runs that cannot make progress stop early with their reason instead of 'training' on nothing or forever
(issue: a root with a typo skipped every image and exited 0; MPO pairs longer than a pack were skipped
forever)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.e2e import REPO, base_overrides, sft_command, sft_env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    return Path(build_tiny_checkpoint(tmp_path_factory.mktemp("guards") / "tiny"))


def _run(
    overrides: list[str], nproc: int, module: str = "vlmtune.train.commands.sft"
) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        sft_command(overrides, nproc, module),
        cwd=REPO,
        env=sft_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def test_every_image_missing_stops_both_ranks_with_the_reason(tmp_path, tiny):
    from vlmtune.data.synthetic import generate_sft_dataset

    meta = Path(generate_sft_dataset(tmp_path / "data", num_train=64, num_eval=4, seed=5))
    (tmp_path / "data" / "elsewhere").mkdir()
    entries = json.loads(meta.read_text())
    for entry in entries.values():
        entry["root"] = "elsewhere"  # exists, but the images are not under it
    meta.write_text(json.dumps(entries))
    out = tmp_path / "run"
    extra = {"train.max_steps": 20, "train.skip_window": 32}
    code, log, seconds = _run(base_overrides(tiny, meta, out, **extra), nproc=2)
    assert code != 0, log[-3000:]
    assert "of the last 32 samples were skipped" in log and "missing_image x" in log
    assert "train.jsonl" in log  # the file named
    assert not (out / "hf").exists() and not (out / "checkpoints" / "complete").exists()


def test_a_mistyped_root_is_refused_before_the_model_is_built(tmp_path, tiny):
    from vlmtune.data.synthetic import generate_sft_dataset

    meta = Path(generate_sft_dataset(tmp_path / "data", num_train=8, num_eval=2, seed=5))
    entries = json.loads(meta.read_text())
    for entry in entries.values():
        entry["root"] = "imgaes"
    meta.write_text(json.dumps(entries))
    code, log, _ = _run(base_overrides(tiny, meta, tmp_path / "run", **{"train.max_steps": 2}), nproc=1)
    assert code != 0 and "root directory not found" in log and "imgaes" in log


def test_mpo_pairs_longer_than_a_pack_stop_the_run_instead_of_skipping_forever(tmp_path, tiny):
    from vlmtune.data.synthetic import generate_pair_dataset

    meta = Path(generate_pair_dataset(tmp_path / "pairs", num_train=64, num_eval=4, seed=2))
    extra = {
        "train.max_steps": 5,
        "train.skip_window": 32,
        "data.max_length": 44,  # a side fits (data.max_length <= packing.max_tokens holds) ...
        "packing.max_tokens": 44,  # ... but not prompt + both answers: the config check cannot see it
        "train.export": False,
    }
    out = tmp_path / "run"
    code, log, seconds = _run(
        base_overrides(tiny, meta, out, **extra), nproc=1, module="vlmtune.train.commands.mpo"
    )
    assert code != 0, log[-3000:]
    assert "of the last 32 samples were skipped" in log and "too_long x" in log
    skipped = [json.loads(line) for line in (out / "skipped_rank0.jsonl").read_text().splitlines()]
    in_a_pack = [e for e in skipped if "in a pack" in e["detail"]]
    assert in_a_pack and all("> packing.max_tokens 44" in e["detail"] for e in in_a_pack)
    assert len(skipped) < 100  # stopped at the first window, not after thousands of skips


def test_mpo_pack_lengths_are_reasoned_about_at_start():
    """A pair packs its prompt and both answers: data.max_length (one side) == packing.max_tokens lets pairs of
    up to twice that through, which the start-up check says (they are skipped as too_long, the test above)."""
    from vlmtune.train.commands.mpo import pack_length_warning

    assert "2 x data.max_length = 90 tokens" in pack_length_warning(45, 45, True)
    assert "packing.max_tokens >= 90" in pack_length_warning(45, 45, True)
    assert pack_length_warning(45, 90, True) is None
    assert pack_length_warning(45, 45, False) is None  # unpacked: each pair is its own batch row
    assert "data.max_length is unset" in pack_length_warning(None, 4096, True)
