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


@pytest.fixture(scope="session")
def vllm_hf_answers(demo_run):
    """vLLM's greedy answers on the demo export's 100 held-out questions (one vLLM start, shared)."""
    from vlmtune.train.runtime.eval_engines import eval_items, vllm_answers, vllm_missing_message, vllm_python

    if vllm_python() is None:
        pytest.skip(vllm_missing_message())
    out, meta = demo_run
    items = eval_items(str(meta), 0, None)  # seed 0: the demo's data.seed (vlmtune eval's order)
    return items, vllm_answers(str(out / "hf"), items, max_new_tokens=8)
