"""`vlmtune prm`: a PRM record's labels through the data path are exactly its +/- verdict tokens, a meta
file supervised otherwise is refused, and a short run on `prm-data`'s output learns to tell + from -."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.train.commands.test_prm_data import StubEngine
from tests.train.helpers import tiny_model, tiny_tokenizer
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.dataset import DataConfig, SampleProcessor
from vlmtune.data.meta import load_meta, record_source
from vlmtune.train.commands.prm import check_prm_meta
from vlmtune.train.commands.prm_data import PRMDataConfig, prm_data
from vlmtune.train.model.build import num_image_tokens_per_tile, tile_size
from vlmtune.train.runtime.prm_score import verdict_ids


@pytest.fixture(scope="module")
def prm_meta(tmp_path_factory) -> Path:
    """`prm-data`'s output for 8 demo questions (stub engine: labels known, see test_prm_data.py)."""
    from vlmtune.data.synthetic import generate_sft_dataset

    root = tmp_path_factory.mktemp("prm_train")
    generate_sft_dataset(root / "q", num_train=1, num_eval=8, task_weights={"color": 0.5, "shape": 0.5})
    cfg = PRMDataConfig(
        model="policy", meta=str(root / "q" / "meta_eval.json"), out=str(root / "prm"), n=3, m=4
    )
    prm_data(cfg, StubEngine())
    return root / "prm" / "meta.json"


def test_labels_are_exactly_the_verdict_tokens(prm_meta: Path) -> None:
    model, tok = tiny_model(), tiny_tokenizer()
    data = DataConfig(meta_path=str(prm_meta), image_size=tile_size(model.config.vision_config))
    processor = SampleProcessor(data, tok, num_image_tokens_per_tile(model.config))
    [spec] = load_meta(prm_meta)
    plus, minus = verdict_ids(tok)
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for line in range(spec.num_records):
        record = record_source(spec).read(line)
        verdicts = [
            {"+": plus, "-": minus}[t["value"]] for t in record["conversations"] if t["from"] == "gpt"
        ]
        sample = processor(spec, line, random.Random(0), training=True)
        ids, labels = sample["input_ids"], sample["labels"]
        on = (labels != IGNORE_INDEX).nonzero().squeeze(-1).tolist()
        assert labels[on].tolist() == verdicts and ids[on].tolist() == verdicts
        for p in on:  # each right after an assistant header
            assert ids[p - len(header) : p].tolist() == header
        assert sample["num_tiles"] > 0  # the image came along


def test_a_meta_not_supervised_on_verdicts_is_refused(prm_meta: Path, tmp_path: Path) -> None:
    check_prm_meta(str(prm_meta))
    meta = json.loads(prm_meta.read_text())
    for entry in meta.values():
        entry.pop("supervision")
        entry["annotation"] = str(prm_meta.parent / entry["annotation"])
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="assistant_content"):
        check_prm_meta(str(tmp_path / "meta.json"))


def test_prm_run_learns_the_verdicts_and_its_export_scores_them(prm_meta: Path, tmp_path: Path) -> None:
    """`vlmtune prm` end to end: after a short run, its export (through `PRMScorer`, as `best-of-n` loads
    it) puts P(+) above 0.5 on every step labelled + and below on every step labelled -."""
    from tests.train.e2e import base_overrides, run_sft
    from vlmtune.data.prm import STEP_SEPARATOR
    from vlmtune.train.model.tiny import build_tiny_checkpoint
    from vlmtune.train.runtime.prm_score import PRMScorer

    ckpt = build_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "prm"
    extra = {"train.max_steps": 40, "train.save_every": 0, "train.serving_check": 0, "optim.lr": 3e-3}
    run_sft(base_overrides(ckpt, prm_meta, out, **extra), module="vlmtune.train.commands.prm")
    scorer = PRMScorer(out / "hf")
    [spec] = load_meta(prm_meta)
    for line in range(2):  # a right solution and a wrong one of the same question
        record = record_source(spec).read(line)
        turns = record["conversations"]
        question = turns[1]["value"].split("### Question:\n", 1)[1].split("\n\n### Solution Process:\n")[0]
        steps = [turns[1]["value"].split("### Solution Process:\n", 1)[1]] + [t["value"] for t in turns[3::2]]
        [scores] = scorer(question, [str(spec.root / record["image"])], [STEP_SEPARATOR.join(steps)])
        labels = [t["value"] for t in turns[2::2]]
        assert [s > 0.5 for s in scores] == [lab == "+" for lab in labels], (labels, scores)
    # `vlmtune best-of-n` wires a real policy (the untrained tiny model) and this PRM: the step scores it
    # stores are the scorer's on the same samples
    from vlmtune.train.commands.best_of_n import main as best_of_n_main

    questions = prm_meta.parent.parent / "q" / "meta_eval.json"
    bon = tmp_path / "bon"
    argv = ["--model", str(ckpt), "--prm", str(out / "hf"), "--meta", str(questions), "--out", str(bon)]
    argv += ["--n", "2", "--ns", "1,2", "--max-new-tokens", "6", "--max-questions", "2", "--temperature", "1"]
    assert best_of_n_main([*argv, "--blank-control"]) == 0
    report = json.loads((bon / "best_of_n.json").read_text())
    assert report["overall"]["questions"] == 2 and set(report["overall"]["n"]) == {"1", "2"}
    samples = [json.loads(line) for line in (bon / "samples" / "samples.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (bon / "records.jsonl").read_text().splitlines()]
    blank_lines = [json.loads(line) for line in (bon / "scores_blank.jsonl").read_text().splitlines()]
    [qspec] = load_meta(questions)
    for k, (line, rec) in enumerate(zip(samples, records)):
        raw = record_source(qspec).read(k)
        texts = [s["text"] for s in line["samples"]]
        expected = scorer(raw["conversations"][0]["value"], [str(qspec.root / raw["image"])], texts)
        assert [len(x) for x in rec["step_scores"]] == [len(x) for x in expected]
        assert sum(rec["step_scores"], []) == pytest.approx(sum(expected, []), abs=1e-6)
        # the control: the same PRM on the same samples with the tiles zeroed (and that differs: pixels count)
        blank = scorer(raw["conversations"][0]["value"], [str(qspec.root / raw["image"])], texts, blank=True)
        assert sum(blank_lines[k]["scores"], []) == pytest.approx(sum(blank, []), abs=1e-6)
        assert sum(blank, []) != pytest.approx(sum(expected, []), abs=1e-6)
    assert "best_of_n_blank" in report["overall"]["n"]["2"]
