"""A checkpoint interrupted half-way is never the one resumed from."""

from __future__ import annotations

import pytest

from vlmtune.train.runtime.checkpoint import POINTER, _atomic_write, latest_complete


def test_only_the_pointer_names_the_resume_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_complete(tmp_path) is None
    (root / "step_00000002").mkdir(parents=True)
    _atomic_write(root / POINTER, "step_00000002")
    # a later save was killed half-way: its directory (and DeepSpeed's own 'latest') exist,
    # but the pointer was never moved
    (root / "step_00000004").mkdir()
    (root / "latest").write_text("step_00000004")
    assert latest_complete(tmp_path) == "step_00000002"
    # the pointer is replaced atomically: no temporary file is left behind
    assert sorted(p.name for p in root.iterdir()) == [POINTER, "latest", "step_00000002", "step_00000004"]
    # a pointer to a directory removed by hand stops the run instead of silently starting over
    _atomic_write(root / POINTER, "step_00000006")
    with pytest.raises(RuntimeError, match="step_00000006"):
        latest_complete(tmp_path)
