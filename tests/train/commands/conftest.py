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


@pytest.fixture(scope="session")
def weak_mpo_start(tmp_path_factory):
    """The MPO demos' weak starting point, smaller data: the SFT demo data (1500 train, 100 held out),
    50 SFT steps from the tiny random checkpoint. Returns (root, data folder, the weak model's hf dir)."""
    import os

    from vlmtune.train.demo.prepare import generate_demo_data, train_weak_sft
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("weak_mpo")
    generate_demo_data(root / "data", num_train=1500, num_eval=100)
    build_tiny_checkpoint(root / "tiny_init")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM")}
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    try:  # the SFT run is a subprocess of train_weak_sft and takes these from the environment
        train_weak_sft(root / "sft_weak" / "hf", root / "data", sft_steps=50)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return root, root / "data", root / "sft_weak" / "hf"
