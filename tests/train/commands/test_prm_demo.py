"""The PRM demo's inputs (shortened): the weak policy's own solutions, labelled by its own completions,
and the two models trained from the same tiny checkpoint on their own data."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import yaml

from vlmtune.data.prm import mc_label, split_steps
from vlmtune.train.demo.prepare import PRM_DATA, PRM_SAMPLING, prepare_prm_demo


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prm_demo_data_is_the_weak_policys_own_samples_labelled_by_its_completions(tmp_path, monkeypatch):
    for key, value in {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(key, value)  # the SFT runs are subprocesses and take these from the environment
    prm_dir = tmp_path / PRM_DATA
    cfg = SimpleNamespace(
        model=SimpleNamespace(pretrained=str(tmp_path / "base" / "hf")),
        data=SimpleNamespace(meta_path=str(prm_dir / "meta.json")),
    )
    prepare_prm_demo(cfg, num_questions=6, num_eval=18, weak_steps=4, base_steps=6, sampling={"n": 2, "m": 2})

    for run, meta, steps in (("weak", "meta_train.json", 4), ("base", "meta_general_train.json", 6)):
        config = yaml.safe_load((tmp_path / run / "config.yaml").read_text())
        assert config["train"]["max_steps"] == steps and config["data"]["meta_path"].endswith(meta)
        assert config["model"]["pretrained"].endswith("tiny_init")
    weak = str((tmp_path / "weak" / "hf").resolve())
    samples = {
        row["key"]: [s["text"] for s in row["samples"]]
        for row in jsonl(prm_dir / "samples" / "samples.jsonl")
    }
    assert len(samples) == 6
    (entry,) = json.loads((prm_dir / "meta.json").read_text()).values()
    records = jsonl(prm_dir / entry["annotation"])
    summary = json.loads((prm_dir / "summary.json").read_text())
    assert len(records) == summary["solutions"] - summary["solutions_without_steps"] > 0
    for rec in records:
        prov = rec["provenance"]
        assert prov["policy"] == weak and prov["temperature"] == PRM_SAMPLING["temperature"]
        assert (prov["n"], prov["m"]) == (2, 2)
        turns = rec["conversations"]
        steps = [turns[1]["value"].split("### Solution Process:\n", 1)[1]] + [t["value"] for t in turns[3::2]]
        assert steps == split_steps(samples[prov["key"]][prov["sample"]])  # byte for byte its own sample
        assert [t["value"] for t in turns[2::2]] == [mc_label(v) for v in prov["mc"]]
