"""A checkpoint interrupted half-way is never the one resumed from."""

from __future__ import annotations

import pytest

from vlmtune.train.runtime.checkpoint import POINTER, atomic_write, latest_complete


def test_only_the_pointer_names_the_resume_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_complete(tmp_path) is None
    (root / "step_00000002").mkdir(parents=True)
    atomic_write(root / POINTER, "step_00000002")
    # a later save was killed half-way: its directory (and DeepSpeed's own 'latest') exist,
    # but the pointer was never moved
    (root / "step_00000004").mkdir()
    (root / "latest").write_text("step_00000004")
    assert latest_complete(tmp_path) == "step_00000002"
    # the pointer is replaced atomically: no temporary file is left behind
    assert sorted(p.name for p in root.iterdir()) == [POINTER, "latest", "step_00000002", "step_00000004"]
    # a pointer to a directory removed by hand stops the run instead of silently starting over
    atomic_write(root / POINTER, "step_00000006")
    with pytest.raises(RuntimeError, match="step_00000006"):
        latest_complete(tmp_path)


def test_rng_state_round_trips_through_json_exactly():
    """The per-rank state is JSON (no pickle read at resume); the generators continue as if never stopped."""
    import json
    import random

    import numpy as np
    import torch

    from vlmtune.train.runtime.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # numpy's cached gaussian is part of its state
    saved = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(4).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(4).tolist()) == expected
