"""`vlmtune check-data`: its JSON agrees with the known bad lines; start-up errors exit non-zero."""

from __future__ import annotations

import json

from vlmtune.data.check import length_bucket
from vlmtune.data.report import REASONS, SkipReport
from vlmtune.data.synthetic import generate_bad_samples
from vlmtune.train.commands.check_data import main


def test_check_data_json_and_log_match_the_bad_lines(tmp_path, capsys):
    bad = generate_bad_samples(tmp_path / "bad", seed=0, num_good=6)
    out, log = tmp_path / "report.json", tmp_path / "skipped.jsonl"
    rc = main([str(bad.meta_path), "--max-length", "1024", "--out", str(out), "--log", str(log)])
    assert rc == 0
    result = json.loads(out.read_text())
    ds = result["datasets"]["bad_mix"]
    assert ds["lines"] == len(bad.expected) + len(bad.good_lines)
    assert ds["ok"] == len(bad.good_lines)
    assert ds["skipped"] == dict.fromkeys(sorted(REASONS), 1)
    assert result["totals"]["skipped"] == len(bad.expected)
    assert sum(ds["length_histogram"].values()) == ds["ok"]
    assert ds["est_epoch_tokens"] == ds["total_tokens"]  # repeat_time 1
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e["line"]: e["reason"] for e in logged} == bad.expected
    assert all(e["file"] == str(bad.annotation) for e in logged)
    printed = capsys.readouterr().out
    assert "bad_mix" in printed and "too_long=1" in printed


def test_startup_errors_exit_2_with_message(tmp_path, capsys):
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "meta file not found" in capsys.readouterr().err
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "meta.json").write_text(json.dumps({"ds": {"annotation": "a.jsonl", "roots": "."}}))
    assert main([str(tmp_path / "meta.json")]) == 2
    err = capsys.readouterr().err
    assert "'ds'" in err and "'roots'" in err and "meta.json" in err


def test_length_bucket():
    assert [length_bucket(n) for n in (1, 64, 65, 128, 129, 5000)] == [
        "<=64",
        "<=64",
        "<=128",
        "<=128",
        "<=256",
        "<=8192",
    ]


def test_report_merge_and_log(tmp_path):
    a, b = SkipReport(), SkipReport(log_path=tmp_path / "b.jsonl")
    a.skip("x", "f.jsonl:3", "too_long", "9 > 8")
    b.skip("x", "f.jsonl:5", "missing_image", "p")
    b.skip("y", "g.jsonl:1", "too_long")
    b.close()
    a.merge(b)
    assert a.to_dict() == {
        "total": 3,
        "by_reason": {"missing_image": 1, "too_long": 2},
        "by_dataset": {"x": {"missing_image": 1, "too_long": 1}, "y": {"too_long": 1}},
    }
    streamed = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert streamed[0] == {
        "dataset": "x",
        "file": "f.jsonl",
        "line": 5,
        "reason": "missing_image",
        "detail": "p",
    }


def test_check_data_takes_an_exports_own_settings(tmp_path, tiny_model_dir):
    """`--model` on a vlmtune export: its tokenizer and tile size, and the tiling and length it was
    trained with (vlmtune.json), unless the command line says otherwise."""
    import shutil

    from vlmtune.data.synthetic import generate_sft_dataset

    export = tmp_path / "export"
    shutil.copytree(tiny_model_dir, export)
    (export / "vlmtune.json").write_text(json.dumps({"data": {"max_dynamic_patch": 1, "max_length": 700}}))
    meta = generate_sft_dataset(tmp_path / "data", num_train=12, num_eval=2, seed=3)

    def report(*extra: str) -> dict:
        out = tmp_path / "report.json"
        assert main([str(meta), "--model", str(export), "--out", str(out), *extra]) == 0
        return json.loads(out.read_text())

    trained = report()
    assert trained["max_length"] == 700 and trained["image_size"] == 56 and trained["tokens_per_tile"] == 16
    wider = report("--max-dynamic-patch", "6", "--max-length", "8192")
    assert wider["max_length"] == 8192
    tiles = {
        name: (d["total_tiles"], wider["datasets"][name]["total_tiles"])
        for name, d in trained["datasets"].items()
    }
    assert all(one <= six for one, six in tiles.values()) and any(one < six for one, six in tiles.values())
    # one tile per image as trained: no more tiles than images
    assert all(d["total_tiles"] <= d["ok"] * 2 for d in trained["datasets"].values())
