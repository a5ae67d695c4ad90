"""The on-policy MPO demo end to end (shortened): the weak model's own pairs, then `experiment=demo_mpo_onpolicy`."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tests.train.e2e import run_sft
from vlmtune.data.answers import answers_match
from vlmtune.train.commands.eval import main as eval_main
from vlmtune.train.demo.prepare import ONPOLICY_PAIRS, prepare_onpolicy_demo

NUM_QUESTIONS, N = 150, 4  # the demo: 800 questions, 8 samples each


def test_onpolicy_pairs_are_the_models_own_and_mpo_raises_accuracy(weak_mpo_start, tmp_path, monkeypatch):
    """Provenance, then the gain.

    Provenance: every pair's chosen answer matches the reference and its rejected one does not, and
    both are, byte for byte, samples the weak model drew for that question (the sampler's
    ``samples.jsonl`` at the indices the pair names), at the demo's temperature.

    Margin: the eval set holds n=100 samples; the weak model scores ~0.6 on it. The before and after
    models answer the same samples, so without a real change the difference comes only from flipped
    answers; even counted as independent, the sd of a difference of two accuracies near 0.6-0.9 at
    n=100 is at most sqrt(2 * 0.25 / 100) ~ 0.07. A gain of >= 0.15 (GAIN) is > 2 sd beyond chance;
    measured: 99 pairs from the 150 questions, 0.58 -> 0.81 after 80 steps (a gain of 0.23, > 3 sd).
    A chosen answer is checked against the reference by the same `answers_match` make-pairs uses, so
    the provenance checks are exact, not statistical.
    """
    for key, value in {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(key, value)
    root, data, weak = weak_mpo_start
    pairs_dir = tmp_path / ONPOLICY_PAIRS
    cfg = SimpleNamespace(
        model=SimpleNamespace(pretrained=str(weak)),
        data=SimpleNamespace(meta_path=str(pairs_dir / "meta.json")),
        eval_data=SimpleNamespace(meta_path=str(data / "meta_eval.json")),
    )
    (tmp_path / "data").symlink_to(data)  # the SFT demo data beside the pairs, as in outputs/demo
    prepare_onpolicy_demo(cfg, num_questions=NUM_QUESTIONS, sampling={"n": N})

    summary = json.loads((pairs_dir / "summary.json").read_text())
    assert summary["questions"] == NUM_QUESTIONS and summary["pairs"] >= 50
    samples = {}
    for line in (pairs_dir / "samples" / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        samples[row["key"]] = [s["text"] for s in row["samples"]]
        assert row["settings"]["temperature"] == 0.7 and row["settings"]["n"] == N
    meta = json.loads((pairs_dir / "meta.json").read_text())
    (entry,) = meta.values()
    pairs = [json.loads(line) for line in (pairs_dir / entry["annotation"]).read_text().splitlines()]
    assert len(pairs) == summary["pairs"]
    for p in pairs:
        prov = p["provenance"]
        assert prov["model"] == str(weak.resolve()) and prov["pipeline"] == "correctness"
        assert answers_match(p["chosen"], p["answer"]) and not answers_match(p["rejected"], p["answer"])
        drawn = samples[prov["key"]]
        assert p["chosen"] == drawn[prov["chosen_sample"]] and p["rejected"] == drawn[prov["rejected_sample"]]

    out = tmp_path / "mpo"
    run_sft(
        [
            "experiment=demo_mpo_onpolicy",
            "prepare_demo=false",
            f"train.output_dir={out}",
            f"model.pretrained={weak}",
            f"data.meta_path={cfg.data.meta_path}",
            f"eval_data.meta_path={cfg.eval_data.meta_path}",
            "train.max_steps=80",
        ],
        module="vlmtune.train.commands.mpo",
    )
    results = json.loads((out / "eval.json").read_text())
    before = results["before"]
    assert results["num_samples"] == before["num_samples"] == 100
    assert before["accuracy"] <= 0.75  # weak: shapes are still guessed
    assert results["accuracy"] >= before["accuracy"] + GAIN
    # one-word answers that end by themselves, before and after: no looping
    for figures in (before, results):
        assert figures["truncated_rate"] <= 0.05 and figures["repeated_ngram_rate"] <= 0.05

    # `vlmtune eval` writes the same figures; one new token leaves no room for the stop token after
    # the one-word answer, so (nearly) every answer is cut, and none can repeat a 4-gram
    eval_json = tmp_path / "eval_cut.json"
    args = ["--model", str(out / "hf"), "--meta", cfg.eval_data.meta_path, "--out", str(eval_json)]
    assert eval_main([*args, "--max-samples", "20", "--max-new-tokens", "1"]) == 0
    cut = json.loads(eval_json.read_text())
    assert cut["num_samples"] == 20 and cut["truncated_rate"] >= 0.9 and cut["repeated_ngram_rate"] == 0.0


GAIN = 0.15


def test_onpolicy_ablation_preset_sweeps_the_five_losses():
    """The preset sweeps the five loss mixes over the on-policy demo's pairs and nothing else of it changes."""
    from hydra import compose, initialize_config_dir

    from vlmtune.configs import CONFIG_DIR
    from vlmtune.train.runtime.config import register_schemas

    register_schemas()
    weights = {
        "sft_chosen": (0.0, 0.0, 1.0),
        "dpo": (1.0, 0.0, 0.0),
        "dpo_nll": (1.0, 0.0, 1.0),
        "mpo": (0.8, 0.2, 1.0),
        "bco": (0.0, 1.0, 0.0),
    }
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        demo = compose("mpo", overrides=["experiment=demo_mpo_onpolicy"])
        sweep = compose("mpo", overrides=["experiment=mpo_onpolicy_ablation"], return_hydra_config=True)
        assert sweep.hydra.sweeper.params["loss"].split(",") == list(weights)
        for name, expected in weights.items():
            cfg = compose("mpo", overrides=["experiment=mpo_onpolicy_ablation", f"loss={name}"])
            loss = cfg.loss
            assert (loss.preference_weight, loss.quality_weight, loss.generation_weight) == expected
            assert loss.preference == "sigmoid" and loss.beta == demo.loss.beta
            assert cfg.data.meta_path == demo.data.meta_path == f"outputs/demo/{ONPOLICY_PAIRS}/meta.json"
            assert cfg.train.max_steps == demo.train.max_steps and cfg.optim == demo.optim
    assert demo.train.eval_max_samples >= 400 and demo.model.pretrained == "outputs/demo/sft_weak/hf"
