"""The LoRA domain-adaptation demo: its new domain, its eval layout, and (end to end) that it learns."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
from PIL import Image

from tests.train.e2e import run_sft
from vlmtune.data.meta import load_meta
from vlmtune.data.synthetic import COLOURS, generate_sft_dataset
from vlmtune.train.demo.prepare import DEMO_MAX_ASPECT, DEMO_TASKS, LORA_DEMO_TASKS, prepare_lora_demo
from vlmtune.train.runtime.evaluate import per_dataset_scores


def test_per_dataset_scores_by_hand():
    def rec(ds, q, answer, pred, blank):
        return {"dataset": ds, "question": q, "answer": answer, "prediction": pred, "blank_prediction": blank}

    records = [
        rec("new", "q1", "red", "red.", "blue"),
        rec("new", "q1", "red", "Red", "red"),
        rec("new", "q1", "blue", "green", "red"),
        rec("old", "q2", "circle", "circle", "square"),
    ]
    scores = per_dataset_scores(records)
    assert scores == {
        # majority (leave one out, same question): red for the two reds (hit, hit), red for blue (miss)
        "new": {
            "accuracy": 2 / 3,
            "blank_image_accuracy": 1 / 3,
            "majority_baseline": 2 / 3,
            "num_samples": 3,
        },
        "old": {"accuracy": 1.0, "blank_image_accuracy": 0.0, "majority_baseline": 0.0, "num_samples": 1},
    }


def test_per_dataset_scores_read_the_answer_after_the_given_marker():
    """`vlmtune eval --match marker --marker M`: the answer is what follows the last M."""
    records = [
        {"dataset": "d", "question": "q", "answer": "red", "prediction": "Reason: blue.\nFinal: red"},
        {"dataset": "d", "question": "q", "answer": "green", "prediction": "Answer: blue\nFinal: green"},
    ]
    assert per_dataset_scores(records, "marker", "Final:")["d"]["accuracy"] == 1.0  # red, green
    assert per_dataset_scores(records, "marker")["d"]["accuracy"] == 0.0  # after "Answer:": none, blue


def test_background_task_answer_is_the_background_colour(tmp_path):
    generate_sft_dataset(
        tmp_path, num_train=60, num_eval=12, seed=3, task_weights=LORA_DEMO_TASKS, name="background"
    )
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert Counter(r["answer"] for r in records) == dict.fromkeys(COLOURS, 10)  # balanced: chance is 1/6
    assert {r["task"] for r in records} == {"background"}
    for r in records:
        image = Image.open(tmp_path / r["image"]).convert("RGB")
        colours = Counter(image.getdata()).most_common()
        assert colours[0][0] == COLOURS[r["answer"]]  # most pixels are the background
        assert colours[1][0] in set(COLOURS.values()) - {COLOURS[r["answer"]]}  # the shape: another colour
    assert [s.name for s in load_meta(tmp_path / "meta_train.json")] == ["background_train"]


def test_prepare_lora_demo_writes_eval_and_replay_metas(tmp_path):
    old = tmp_path / "data"
    generate_sft_dataset(
        old, num_train=50, num_eval=10, seed=0, task_weights=DEMO_TASKS, max_aspect=DEMO_MAX_ASPECT
    )
    base = tmp_path / "sft" / "hf"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")  # an existing base: nothing is trained
    new = tmp_path / "lora_data"
    cfg = SimpleNamespace(
        model=SimpleNamespace(pretrained=str(base)),
        data=SimpleNamespace(meta_path=str(new / "meta_train.json")),
        eval_data=SimpleNamespace(meta_path=str(new / "meta_eval_old_and_new.json")),
    )
    prepare_lora_demo(cfg, num_train=30, num_eval=12)
    evals = load_meta(new / "meta_eval_old_and_new.json")
    assert [(s.name, s.annotation.resolve(), s.num_records) for s in evals] == [
        ("background_eval", (new / "eval.jsonl").resolve(), 12),
        ("shapes_eval", (old / "eval.jsonl").resolve(), 10),
    ]
    assert not any(s.data_augment for s in evals)
    replay = load_meta(new / "meta_train_replay.json")
    assert [(s.name, s.annotation.resolve(), s.repeat_time) for s in replay] == [
        ("background_train", (new / "train.jsonl").resolve(), 1.0),
        ("shapes_replay", (old / "train.jsonl").resolve(), 0.1),
    ]
    assert all(s.data_augment for s in replay)


def test_lora_demo_learns_the_new_domain(demo_run):
    """The SFT demo model (the serving tests' shared 200-step run: the demo's data, smaller), then
    `experiment=demo_lora` (shortened): the background colour, never asked before, goes from about
    chance to near perfect, read from the pixels (blank images stay low)."""
    sft_out, _ = demo_run
    root = sft_out.parent  # holds `data` (the old domain, as prepare_lora_demo expects beside `lora_data`)
    out = root / "lora"
    run_sft(
        [
            "experiment=demo_lora",
            f"train.output_dir={out}",
            f"model.pretrained={sft_out / 'hf'}",
            f"data.meta_path={root / 'lora_data' / 'meta_train.json'}",
            f"eval_data.meta_path={root / 'lora_data' / 'meta_eval_old_and_new.json'}",
            "train.max_steps=80",
        ]
    )
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "hf").exists()
    results = json.loads((out / "eval.json").read_text())
    after, before = results["per_dataset"], results["before"]["per_dataset"]
    assert {k: v["num_samples"] for k, v in after.items()} == {"background_eval": 200, "shapes_eval": 100}
    new_after, new_before = after["background_eval"], before["background_eval"]
    # n=200, six balanced answers: a model that ignores the image scores ~1/6 (sd ~0.03)
    assert new_after["majority_baseline"] < 0.3
    assert new_after["accuracy"] >= 0.8
    assert new_after["accuracy"] >= new_before["accuracy"] + 0.3
    assert new_after["blank_image_accuracy"] <= 0.4


def test_prepare_lora_demo_refuses_the_sft_demos_own_data_folder(tmp_path):
    cfg = SimpleNamespace(
        model=SimpleNamespace(pretrained=str(tmp_path / "tiny_init")),
        data=SimpleNamespace(meta_path=str(tmp_path / "data" / "meta_train.json")),
        eval_data=None,
    )
    with pytest.raises(ValueError, match="experiment=demo_lora"):
        prepare_lora_demo(cfg)
    assert not (tmp_path / "data").exists()  # nothing written
