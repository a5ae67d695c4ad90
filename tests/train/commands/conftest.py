"""Fixtures shared by the command-level tests."""

from __future__ import annotations

import pytest

from tests.train.e2e import run_sft


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The SFT demo trained briefly (200 steps) and exported: (output dir, held-out meta file)."""
    from vlmtune.train.demo.prepare import generate_demo_data
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("serving_demo")
    generate_demo_data(root / "data", num_train=1500, num_eval=100)
    build_tiny_checkpoint(root / "tiny_init")
    out = root / "sft"
    run_sft(
        [
            "experiment=demo",
            "prepare_demo=false",
            f"train.output_dir={out}",
            f"model.pretrained={root / 'tiny_init'}",
            f"data.meta_path={root / 'data' / 'meta_train.json'}",
            f"eval_data.meta_path={root / 'data' / 'meta_eval.json'}",
            "train.max_steps=200",
            "train.save_every=0",
        ]
    )
    return out, root / "data" / "meta_eval.json"
