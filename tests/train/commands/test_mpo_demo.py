"""The MPO demo end to end (shortened): the weak SFT starting point it prepares, then `experiment=demo_mpo`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.train.e2e import run_sft
from vlmtune.train.demo.prepare import generate_demo_data, prepare_mpo_demo


# slow: the on-policy demo's test (test_mpo_onpolicy_demo.py) trains the same demo_mpo settings on the
# weak model's own pairs and asserts their provenance and the gain; this one runs with --runslow
@pytest.mark.slow
def test_mpo_demo_raises_held_out_accuracy(tmp_path, monkeypatch):
    """`prepare_mpo_demo` as the demo runs it (50 SFT steps, one-word pairs), fewer pairs and MPO steps.

    Margin: the eval set holds n=100 samples (47 colour, 47 shape, 3 two-image, 3 pure text). The
    weak model scores ~0.58 (colours ~88%, shapes about chance), measured ~0.9 after; the before and
    after models answer the *same* samples, so without a real change the difference comes only from
    flipped answers, and even counted as independent the sd of a difference of two accuracies near
    0.6-0.9 at n=100 is at most sqrt(2 * 0.25 / 100) ~ 0.07. A gain of >= 0.15 is > 2 sd beyond
    chance (the measured gain ~0.3 is > 4 sd). The blank-image control stays near the majority
    baseline (~0.3): the gain is read from the pixels, not a prior on the answers.
    """
    for key, value in {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(key, value)  # the weak SFT run is a subprocess of prepare_mpo_demo
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    data = tmp_path / "data"
    generate_demo_data(data, num_train=1500, num_eval=100)  # the SFT demo's data, smaller
    build_tiny_checkpoint(tmp_path / "tiny_init")
    cfg = SimpleNamespace(
        model=SimpleNamespace(pretrained=str(tmp_path / "sft_weak" / "hf")),
        data=SimpleNamespace(meta_path=str(data / "meta_pairs_train.json")),
    )
    prepare_mpo_demo(cfg, num_pairs=1000)
    pairs = [json.loads(line) for line in (data / "pairs_train.jsonl").read_text().splitlines()]
    assert {p["style"] for p in pairs} == {"short"} and {p["task"] for p in pairs} == {"color", "shape"}
    assert (tmp_path / "sft_weak" / "hf" / "config.json").exists()

    out = tmp_path / "mpo"
    run_sft(
        [
            "experiment=demo_mpo",
            "prepare_demo=false",
            f"train.output_dir={out}",
            f"model.pretrained={cfg.model.pretrained}",
            f"data.meta_path={cfg.data.meta_path}",
            f"eval_data.meta_path={data / 'meta_eval.json'}",
            "train.max_steps=120",
        ],
        module="vlmtune.train.commands.mpo",
    )
    results = json.loads((out / "eval.json").read_text())
    before = results["before"]
    assert results["num_samples"] == before["num_samples"] == 100
    assert before["accuracy"] <= 0.75  # weak: shapes are still guessed
    assert results["accuracy"] >= before["accuracy"] + 0.15
    assert results["blank_image_accuracy"] <= 0.45
