"""Checkpoints at their edges: a full disk is refused before writing (or the torn save is removed), and a
resume with other resume-critical settings is refused before any model is built, naming them."""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple

import pytest

from tests.train.runtime.test_schedule import engine_with_schedule, one_rank  # noqa: F401

Usage = namedtuple("Usage", "total used free")


def _save(engine, out, step):
    from vlmtune.train.runtime.checkpoint import save_checkpoint

    return save_checkpoint(engine, out, step, {"step": step}, {"stream": {}}, keep_last=5)


def test_too_little_space_is_refused_before_writing_and_a_failed_save_is_removed(
    one_rank,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from vlmtune.train.runtime.checkpoint import DiskFullError, directory_bytes, latest_complete

    engine, _, _ = engine_with_schedule(0, gas=1)
    first = _save(engine, tmp_path, 1)
    size = directory_bytes(first)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * size, 9 * size, size))  # < last + 10%
    with pytest.raises(DiskFullError) as e:
        _save(engine, tmp_path, 2)
    message = str(e.value)
    assert str(tmp_path / "checkpoints") in message and "GiB free" in message and "needs about" in message
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    assert latest_complete(tmp_path) == "step_00000001"

    monkeypatch.setattr(shutil, "disk_usage", real)

    def fills_the_disk(path, tag, **kwargs):  # what a full disk does half-way through DeepSpeed's write
        (tmp_path / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "save_checkpoint", fills_the_disk)
    with pytest.raises(
        DiskFullError, match="filled up while saving.*torn checkpoint was removed.*step_00000001"
    ):
        _save(engine, tmp_path, 3)
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()
    assert latest_complete(tmp_path) == "step_00000001"


def test_resume_with_other_critical_settings_is_refused_naming_them(one_rank, tmp_path):  # noqa: F811
    from vlmtune.train.runtime.checkpoint import POINTER, atomic_write, resume_tag, run_fingerprint
    from vlmtune.train.runtime.config import compose_config

    cfg = compose_config("sft", ["data.meta_path=m.json", "train.micro_batch_size=1", "train.max_steps=10"])
    saved = run_fingerprint(cfg, world_size=2)
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "vlmtune_run.json").write_text(json.dumps(saved))
    atomic_write(tmp_path / "checkpoints" / POINTER, "step_00000004")

    assert resume_tag(tmp_path, saved) == "step_00000004"
    longer = compose_config("sft", ["data.meta_path=m.json", "train.max_steps=20"])
    assert resume_tag(tmp_path, run_fingerprint(longer, 2)) == "step_00000004"  # extending a run is allowed
    other = compose_config(
        "sft", ["data.meta_path=m.json", "train.micro_batch_size=2", "packing.max_tokens=4096"]
    )
    with pytest.raises(ValueError) as e:
        resume_tag(tmp_path, run_fingerprint(other, world_size=1))
    message = str(e.value)
    # another world size is resumed (tests/train/commands/test_elastic_resume.py), but not with another global batch
    assert "global batch (world_size x train.gradient_accumulation_steps micro-batches) was 2 x 1" in message
    assert "now 1 x 1 = 1: set train.gradient_accumulation_steps=2 to keep it" in message
    assert "train.micro_batch_size was 1, now 2" in message and "packing.max_tokens" in message
    assert "step_00000004" in message


def test_a_sequence_parallel_run_resumes_on_its_own_world_size_only(one_rank, tmp_path):  # noqa: F811
    """Elastic resume re-deals one data stream per rank; under sequence parallelism a group of ranks shares
    one, so another world size (or SP size) is refused at start, naming both."""
    from vlmtune.train.runtime.checkpoint import POINTER, atomic_write, resume_tag, run_fingerprint
    from vlmtune.train.runtime.config import compose_config

    overrides = ["data.meta_path=m.json", "train.sequence_parallel_size=2"]
    saved = run_fingerprint(compose_config("sft", overrides), world_size=4)
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "vlmtune_run.json").write_text(json.dumps(saved))
    atomic_write(tmp_path / "checkpoints" / POINTER, "step_00000004")
    assert resume_tag(tmp_path, saved) == "step_00000004"
    keeps_batch = compose_config("sft", [*overrides, "train.gradient_accumulation_steps=2"])
    with pytest.raises(
        ValueError, match="sequence_parallel_size=2: a sequence-parallel run resumes on its own"
    ):
        resume_tag(tmp_path, run_fingerprint(keeps_batch, world_size=2))
    with pytest.raises(ValueError, match="train.sequence_parallel_size was 2, now 1"):
        resume_tag(tmp_path, run_fingerprint(compose_config("sft", ["data.meta_path=m.json"]), world_size=4))
