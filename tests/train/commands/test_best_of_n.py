"""`vlmtune best-of-n`: stub samples and a stub PRM whose scores are known give the numbers worked out
by hand below (Best-of-N per aggregation, majority vote with its tie rule, pass@N, greedy, per dataset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.train.commands.best_of_n import BestOfNConfig, question_outcomes, run_best_of_n
from vlmtune.train.runtime.sampler import Sample, SampleRequest, SamplingSettings

# question -> (greedy answer, samples: (answer, finish reason, step scores)); references "red" / "blue"
SCRIPT = {
    "alpha:1": (
        "nope",
        [
            ("nope", "stop", [0.9, 0.2]),
            ("red", "stop", [0.5, 0.8]),
            ("nope", "stop", [0.9, 0.9]),
            ("red", "stop", [0.1, 0.95]),
        ],
    ),
    "beta:1": (
        "blue",
        [
            ("blue", "stop", [0.3]),
            ("nope", "stop", [0.6]),
            ("blue", "length", [0.7]),
            ("blue", "stop", [0.2]),
        ],
    ),
}


def text(key: str, j: int) -> str:
    """Sample j's text (j = -1: the greedy answer), tagged so that the stub PRM knows which it is."""
    answer = SCRIPT[key][1][j][0] if j >= 0 else SCRIPT[key][0]
    steps = len(SCRIPT[key][1][max(j, 0)][2]) - 1
    return f"[{key}#{j}] " + "".join(f"step {i}.\n\n" for i in range(steps)) + f"Answer: {answer}"


class StubEngine:
    def __call__(self, requests: list[SampleRequest], settings: SamplingSettings):
        for r in requests:
            if settings.greedy:
                yield [Sample(text(r.key, -1), "stop", 3)] * settings.n
            else:
                yield [Sample(text(r.key, j), SCRIPT[r.key][1][j][1], 3) for j in range(settings.n)]


def stub_scorer(question: str, images: list[str], responses: list[str]) -> list[list[float]]:
    """The scripted step scores of each tagged response."""
    out = []
    for response in responses:
        key, j = response[1:].split("]")[0].split("#")
        assert len(response.split("\n\n")) == len(SCRIPT[key][1][int(j)][2])  # one score per step
        out.append(SCRIPT[key][1][int(j)][2])
    return out


@pytest.fixture()
def meta(tmp_path: Path) -> Path:
    for name, answer in (("alpha", "red"), ("beta", "blue")):
        record = {"question": f"What colour ({name})?", "answer": answer}
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
    meta = {name: {"root": ".", "annotation": f"{name}.jsonl"} for name in ("alpha", "beta")}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "meta.json"


def test_numbers_by_hand(meta: Path, tmp_path: Path) -> None:
    cfg = BestOfNConfig(
        model="policy", prm="prm", meta=str(meta), out=str(tmp_path / "out"), n=4, ns=[1, 2, 4]
    )
    report = run_best_of_n(cfg, StubEngine(), stub_scorer)
    a, b = report["per_dataset"]["alpha"], report["per_dataset"]["beta"]
    # alpha: greedy wrong. N=1: sample 0 (wrong) everywhere. N=2: mean .55 vs .65, min .2 vs .5, last .2 vs .8:
    # sample 1 (right) for all; majority "nope" and "red" tie 1-1: "nope" came first -> wrong. N=4: mean
    # picks sample 2 (.9; wrong), min sample 2 (.9; wrong), last sample 3 (.95; right); a 2-2 tie -> "nope".
    assert a["greedy"] == 0.0
    assert a["n"]["1"] == {"best_of_n": {"mean": 0.0, "min": 0.0, "last": 0.0}, "majority": 0.0, "pass": 0.0}
    assert a["n"]["2"] == {"best_of_n": {"mean": 1.0, "min": 1.0, "last": 1.0}, "majority": 0.0, "pass": 1.0}
    assert a["n"]["4"] == {"best_of_n": {"mean": 0.0, "min": 0.0, "last": 1.0}, "majority": 0.0, "pass": 1.0}
    # beta: greedy right. N=1: sample 0 right. N=2: sample 1 (.6 > .3, wrong); "blue" and "nope" tie 1-1:
    # "blue" first -> right. N=4: sample 2 scores .7 but was truncated (wrong, and casts no vote): "blue"
    # 2 votes (0, 3) to 1 -> right.
    assert b["greedy"] == 1.0
    assert b["n"]["1"] == {"best_of_n": {"mean": 1.0, "min": 1.0, "last": 1.0}, "majority": 1.0, "pass": 1.0}
    assert b["n"]["2"] == {"best_of_n": {"mean": 0.0, "min": 0.0, "last": 0.0}, "majority": 1.0, "pass": 1.0}
    assert b["n"]["4"] == {"best_of_n": {"mean": 0.0, "min": 0.0, "last": 0.0}, "majority": 1.0, "pass": 1.0}
    overall = report["overall"]
    assert overall["questions"] == 2 and overall["greedy"] == 0.5
    assert overall["n"]["4"] == {
        "best_of_n": {"mean": 0.0, "min": 0.0, "last": 0.5},
        "majority": 0.5,
        "pass": 1.0,
    }
    saved = json.loads((tmp_path / "out" / "best_of_n.json").read_text())
    assert saved["overall"] == overall and saved["per_dataset"]["alpha"] == a
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert records[0]["n"]["4"]["picked"] == {"mean": 2, "min": 2, "last": 3}
    assert records[1]["right"] == [True, False, False, True]
    assert records[1]["n"]["4"]["picked"] == {"mean": 2, "min": 2, "last": 2}  # the truncated one
    if report["plot"] is not None:
        assert Path(report["plot"]).stat().st_size > 0


def test_rerun_scores_only_what_is_new(meta: Path, tmp_path: Path) -> None:
    calls: list[str] = []

    def counting(question: str, images: list[str], responses: list[str]) -> list[list[float]]:
        calls.append(question)
        return stub_scorer(question, images, responses)

    cfg = BestOfNConfig(model="policy", prm="prm", meta=str(meta), out=str(tmp_path / "out"), n=4, ns=[4])
    first = run_best_of_n(cfg, StubEngine(), counting)
    second = run_best_of_n(cfg, StubEngine(), counting)
    assert len(calls) == 2 and first["overall"] == second["overall"]


def test_a_sample_without_steps_is_never_picked_over_one_with() -> None:
    cfg = BestOfNConfig(model="p", prm="r", meta="m", out="o", n=2, ns=[2])
    samples = [Sample("", "stop", 1), Sample("Answer: red", "stop", 3)]
    got = question_outcomes(samples, [[], [0.01]], Sample("x", "stop", 1), "red", cfg)
    assert got["n"]["2"]["picked"] == {"mean": 1, "min": 1, "last": 1}


def test_ns_beyond_n_are_refused() -> None:
    with pytest.raises(ValueError, match="--ns"):
        BestOfNConfig(model="p", prm="r", meta="m", out="o", n=4, ns=[1, 8])


def test_blank_control_selects_with_the_blank_image_scores(meta: Path, tmp_path: Path) -> None:
    """The control's choice comes from the blank-image scores alone (here 1 - the real ones), by hand:
    alpha N=4 mean .45/.35/.1/.475 -> sample 3 (right), min .1/.2/.1/.05 -> 1 (right), last .8/.2/.1/.05
    -> 0 (wrong); beta .7/.4/.3/.8 under all three -> sample 3 (right)."""

    def inverted(question: str, images: list[str], responses: list[str]) -> list[list[float]]:
        return [[1 - x for x in s] for s in stub_scorer(question, images, responses)]

    out = tmp_path / "out"
    cfg = BestOfNConfig(model="p", prm="r", meta=str(meta), out=str(out), n=4, ns=[4], blank_control=True)
    with pytest.raises(ValueError, match="blank"):
        run_best_of_n(cfg, StubEngine(), stub_scorer)
    report = run_best_of_n(cfg, StubEngine(), stub_scorer, blank_scorer=inverted)
    four = report["overall"]["n"]["4"]
    assert four["best_of_n"] == {"mean": 0.0, "min": 0.0, "last": 0.5}  # unchanged by the control
    assert four["best_of_n_blank"] == {"mean": 1.0, "min": 1.0, "last": 0.5}
    assert report["per_dataset"]["alpha"]["n"]["4"]["best_of_n_blank"] == {
        "mean": 1.0,
        "min": 1.0,
        "last": 0.0,
    }
    assert (out / "scores_blank.jsonl").exists()
