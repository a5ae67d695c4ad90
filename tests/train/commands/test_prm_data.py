"""`vlmtune prm-data`: Monte-Carlo labels from a stub engine whose completions are known, the output
`vlmtune check-data` reads, and a run killed mid-way resumed to the same files as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.train.commands.check_data import main as check_data
from vlmtune.train.commands.prm_data import PRMDataConfig, prm_data
from vlmtune.train.runtime.sampler import Sample, SampleRequest, SamplingSettings


def solution(request: SampleRequest, j: int) -> Sample:
    """Solution 0 is right, 1 is wrong after a good first step, 2 is empty (no steps)."""
    gold = request.item.answer
    texts = [
        f"Look at it.\n\nIt is round.\n\nAnswer: {gold}",
        "Look at it.\n\nIt is square.\n\nAnswer: nope",
        "",
    ]
    return Sample(texts[j], "stop", 5)


def completion(request: SampleRequest, j: int) -> Sample:
    """From "Look at it." one completion in four is right; from "It is round." all are; from "It is
    square." none (the one right one is truncated: no answer); from a final answer: nothing more."""
    gold, last = request.item.answer, request.prefix.split("\n\n")[-1]
    if last == "Look at it.":
        return Sample(f"\n\nAnswer: {gold}" if j == 0 else "\n\nAnswer: nope", "stop", 4)
    if last == "It is round.":
        return Sample(f"\n\nAnswer: {gold}", "stop", 4)
    if last == "It is square.":
        return Sample(f"\n\nAnswer: {gold}", "length", 4) if j == 0 else Sample("\n\nAnswer: nope", "stop", 4)
    return Sample("", "stop", 1)


class StubEngine:
    """Solutions for prompts, completions for prefixed requests; stops after ``fail_after`` completions."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.asked: list[str] = []

    def __call__(self, requests: list[SampleRequest], settings: SamplingSettings):
        for r in requests:
            if r.prefix is not None and self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise KeyboardInterrupt("killed")
            if r.prefix is not None:
                self.asked.append(r.key)
            script = solution if r.prefix is None else completion
            yield [script(r, j) for j in range(settings.n)]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    from vlmtune.data.synthetic import generate_sft_dataset

    root = tmp_path_factory.mktemp("prm_questions")
    generate_sft_dataset(root, num_train=1, num_eval=2, task_weights={"color": 0.5, "shape": 0.5})
    return root / "meta_eval.json"


def config(meta: Path, out: Path, **kw) -> PRMDataConfig:
    return PRMDataConfig(model="policy", meta=str(meta), out=str(out), n=3, m=4, **kw)


def test_labels_are_the_monte_carlo_verdicts(meta: Path, tmp_path: Path) -> None:
    summary = prm_data(config(meta, tmp_path / "out"), StubEngine())
    assert summary is not None
    meta_out = json.loads((tmp_path / "out" / "meta.json").read_text())
    [(name, entry)] = meta_out.items()
    assert entry["supervision"] == "assistant_content" and entry["length"] == 4
    records = [json.loads(line) for line in (tmp_path / "out" / entry["annotation"]).read_text().splitlines()]
    got = [
        ([t["value"] for t in r["conversations"] if t["from"] == "gpt"], r["provenance"]["mc"])
        for r in records
    ]
    assert got == [(["+", "+", "+"], [0.25, 1.0, 1.0]), (["+", "-", "-"], [0.25, 0.0, 0.0])] * 2
    first = records[0]
    assert first["conversations"][0]["from"] == "system"
    assert first["conversations"][1]["value"].endswith("\n\n### Solution Process:\nLook at it.")
    assert first["conversations"][1]["value"].startswith("### Question:\n")
    assert [t["value"] for t in first["conversations"][3::2]] == [
        "It is round.",
        f"Answer: {first['provenance']['answer']}",
    ]
    prov = first["provenance"]
    assert (prov["policy"], prov["n"], prov["m"], prov["temperature"], prov["solution_correct"]) == (
        "policy",
        3,
        4,
        1.0,
        True,
    )
    assert records[1]["provenance"]["solution_correct"] is False
    assert (
        summary["solutions_without_steps"] == 2 and summary["steps"] == 12 and summary["positive_steps"] == 8
    )
    report_path = tmp_path / "report.json"
    assert check_data([str(tmp_path / "out" / "meta.json"), "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["totals"]["ok"] == 4 == report["totals"]["lines"] and report["totals"]["skipped"] == 0


def test_threshold_moves_the_quarter_steps_to_minus(meta: Path, tmp_path: Path) -> None:
    prm_data(config(meta, tmp_path / "out", threshold=0.3), StubEngine())
    [entry] = json.loads((tmp_path / "out" / "meta.json").read_text()).values()
    first = json.loads((tmp_path / "out" / entry["annotation"]).read_text().splitlines()[0])
    assert [t["value"] for t in first["conversations"] if t["from"] == "gpt"] == ["-", "+", "+"]


def test_resume_after_a_kill_equals_an_uninterrupted_run(meta: Path, tmp_path: Path) -> None:
    whole = StubEngine()
    prm_data(config(meta, tmp_path / "whole"), whole)
    with pytest.raises(KeyboardInterrupt):
        prm_data(config(meta, tmp_path / "cut"), StubEngine(fail_after=5))
    again = StubEngine()
    prm_data(config(meta, tmp_path / "cut"), again)
    assert again.asked == whole.asked[5:]  # the five finished completions are not asked again
    for name in [
        "meta.json",
        *(e["annotation"] for e in json.loads((tmp_path / "whole" / "meta.json").read_text()).values()),
    ]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_rerun_with_other_steps_samples_them_anew(meta: Path, tmp_path: Path) -> None:
    """Two steps instead of three (``max_steps=2`` merges the first two): the completions of the old
    steps are not reused for the new ones."""
    prm_data(config(meta, tmp_path / "out"), StubEngine())
    prm_data(config(meta, tmp_path / "out", max_steps=2), StubEngine())
    [entry] = json.loads((tmp_path / "out" / "meta.json").read_text()).values()
    records = [json.loads(line) for line in (tmp_path / "out" / entry["annotation"]).read_text().splitlines()]
    assert records[0]["conversations"][1]["value"].endswith("Look at it.\n\nIt is round.")
    assert [r["provenance"]["mc"] for r in records[:2]] == [[1.0, 1.0], [0.0, 0.0]]
