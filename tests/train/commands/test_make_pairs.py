"""`vlmtune make-pairs`: pairs chosen from samples with known answers, DropoutNTP's cut and its
image-free continuation, drops counted by reason, and an output `vlmtune check-data` reads as MPO pairs.

The engine is a script (a stub `sampler.Engine`): what a question's samples say is fixed per key, so the
pairs expected are known. The engines themselves are tested in tests/train/runtime/test_sampler.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.train.helpers import tiny_tokenizer
from vlmtune.train.commands.check_data import main as check_data
from vlmtune.train.commands.make_pairs import (
    PairsConfig,
    correctness_pairs,
    make_pairs,
    ntp_candidates,
    ntp_prefix,
)
from vlmtune.train.runtime.sampler import Sample, SampleRequest, SamplingSettings, prompt_of


def stop(text: str) -> Sample:
    return Sample(text, "stop", 3)


class ScriptedEngine:
    """Each request's N samples from ``script(request, j)``; every request asked is kept."""

    def __init__(self, script) -> None:
        self.script = script
        self.asked: list[SampleRequest] = []

    def __call__(self, requests: list[SampleRequest], settings: SamplingSettings):
        for r in requests:
            self.asked.append(r)
            yield [self.script(r, j) for j in range(settings.n)]


@pytest.fixture(scope="module")
def questions_meta(tmp_path_factory) -> Path:
    """Eight colour/shape questions of the demo data, plus a dataset of records that are no question:
    a video, a two-turn chat, a malformed line, and one MMPR-style prompt record that is."""
    from vlmtune.data.synthetic import generate_sft_dataset

    root = tmp_path_factory.mktemp("pair_questions")
    generate_sft_dataset(root, num_train=1, num_eval=8, task_weights={"color": 0.5, "shape": 0.5})
    image = json.loads((root / "eval.jsonl").read_text().splitlines()[0])["image"]
    odd = [
        json.dumps(
            {
                "video": "v.mp4",
                "conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}],
            }
        ),
        json.dumps(
            {
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nq1"},
                    {"from": "gpt", "value": "a1"},
                    {"from": "human", "value": "q2"},
                    {"from": "gpt", "value": "a2"},
                ],
            }
        ),
        "{not json",
        json.dumps({"image": image, "question": "<image>\nWhat colour is it?", "answer": "blue"}),
    ]
    (root / "odd.jsonl").write_text("\n".join(odd) + "\n")
    meta = json.loads((root / "meta_eval.json").read_text())
    meta["odd"] = {"root": ".", "annotation": "odd.jsonl"}
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def check(meta: Path, tmp_path: Path) -> dict:
    """`vlmtune check-data` on the output (the tiny tokenizer): its report."""
    assert check_data([str(meta), "--out", str(tmp_path / "report.json")]) == 0
    return json.loads((tmp_path / "report.json").read_text())


# ---------------------------------------------------------------- correctness


def test_correctness_pairs_use_each_sample_once_and_the_seed_decides_which():
    samples = [
        stop("red"),
        stop("Red."),
        stop("blue"),
        stop("green"),
        stop("red "),
        Sample("red", "length", 9),
    ]
    samples += [stop("pink"), stop("blue")]
    pairs, num_right, why = correctness_pairs(samples, "red", 5, random.Random(0), "normalised")
    # right and finished: 0, 1, 4 ("red " repeats 0's text); 5 is right but truncated: on neither side;
    # wrong: 2, 3, 6 (7 repeats 2)
    assert why is None and num_right == 3
    assert sorted(i for i, _ in pairs) == [0, 1]
    rejected = [j for _, j in pairs]
    assert len(set(rejected)) == 2 and set(rejected) <= {2, 3, 6}
    assert correctness_pairs(samples, "red", 5, random.Random(0), "normalised")[0] == pairs
    assert len(correctness_pairs(samples, "red", 1, random.Random(0), "normalised")[0]) == 1
    # shuffled, not the first ones: over seeds every wrong sample is picked
    picked = {
        j
        for seed in range(20)
        for _, j in correctness_pairs(samples, "red", 2, random.Random(seed), "normalised")[0]
    }
    assert picked == {2, 3, 6}
    assert correctness_pairs([stop("red")] * 3, "red", 3, random.Random(0), "normalised")[2] == "all_right"
    assert (
        correctness_pairs([stop("a"), stop("b")], "red", 3, random.Random(0), "normalised")[2] == "all_wrong"
    )
    only_truncated = [Sample("red", "length", 9)]
    assert (
        correctness_pairs(only_truncated, "red", 3, random.Random(0), "normalised")[2] == "no_usable_sample"
    )


def correctness_script(request: SampleRequest, j: int) -> Sample:
    """By the demo record's line: 1 all right, 2 all wrong, 3 right only when truncated; the others
    (and the prompt record) right on even j, with distinct texts."""
    dataset, line = request.key.rsplit(":", 1)
    line_no, answer = (int(line) if dataset == "shapes_eval" else 0), request.item.answer
    if line_no == 1:
        return stop(f"Answer: {answer}")
    if line_no == 2:
        return stop(f"It is {j}. Answer: not {answer}")
    if line_no == 3:
        return Sample(f"Answer: {answer}", "length", 8) if j % 2 == 0 else stop(f"wrong {j}")
    return stop(f"It is {j}. Answer: {answer}") if j % 2 == 0 else stop(f"It is {j}. Answer: none")


def config(meta: Path, out: Path, **overrides) -> PairsConfig:
    return PairsConfig(model="tiny", meta=str(meta), out=str(out), **overrides)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_correctness_pairs_from_known_answers_drops_counted_and_check_data_reads_them(
    questions_meta, tmp_path
):
    cfg = config(questions_meta, tmp_path / "out", n=6, match="marker", max_pairs_per_question=2, seed=3)
    summary = make_pairs(cfg, ScriptedEngine(correctness_script))
    assert summary["questions"] == 9  # 8 demo questions + the prompt record
    assert summary["dropped"] == {
        "all_right": 1,
        "all_wrong": 2,  # line 2, and line 3 (its right answers never finished)
        "malformed_json": 1,
        "not_single_turn": 1,
        "video": 1,
    }
    assert summary["pairs"] == 12 and summary["questions_with_pairs"] == 6  # 2 each from lines 4-8 + prompt
    assert summary["samples"] == {"total": 54, "truncated": 3}
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert set(meta) == {"shapes_eval_correctness", "odd_correctness"}
    assert meta["shapes_eval_correctness"]["root"] == str(questions_meta.parent.resolve())
    lines = read_jsonl(tmp_path / "out" / "shapes_eval_correctness.jsonl")
    by_question: dict[str, list] = {}
    for pair in lines:
        assert pair["chosen"].endswith(f"Answer: {pair['answer']}") and pair["rejected"].endswith(
            "Answer: none"
        )
        prov = pair["provenance"]
        assert (prov["num_right"], prov["n"], prov["seed"], prov["temperature"]) == (3, 6, 3, 1.0)
        assert prov["pipeline"] == "correctness" and prov["model"] == "tiny" and prov["marker"] == "Answer:"
        assert pair["question"].startswith("<image>\n") and pair["image"].startswith("images/")
        by_question.setdefault(prov["key"], []).append(prov)
    for provs in by_question.values():  # two pairs: four different samples
        used = {p["chosen_sample"] for p in provs} | {p["rejected_sample"] for p in provs}
        assert len(provs) == 2 and len(used) == 4
    [prompt_pair, _] = read_jsonl(tmp_path / "out" / "odd_correctness.jsonl")
    assert prompt_pair["answer"] == "blue" and prompt_pair["question"] == "<image>\nWhat colour is it?"

    report = check(tmp_path / "out" / "meta.json", tmp_path)
    assert report["totals"]["ok"] == summary["pairs"] == report["totals"]["lines"]
    assert report["totals"]["skipped"] == 0


# ---------------------------------------------------------------- DropoutNTP

ANSWER = "The shape is red, so the answer is red."


def test_ntp_prefix_is_the_first_half_of_the_tokens():
    tok = tiny_tokenizer()
    ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
    prefix, kept, total = ntp_prefix(ANSWER, tok)
    assert (kept, total) == (len(ids) // 2, len(ids)) == (5, 11)
    assert prefix == "The shape is red," and ANSWER.startswith(prefix)
    assert tok(prefix, add_special_tokens=False)["input_ids"] == ids[:kept]  # exactly the first tokens
    assert ntp_prefix("red", tok) is None  # one token: nothing to keep
    assert ntp_candidates([Sample("a", "length", 9), stop("b"), stop("b "), stop("c")], 5) == [1, 3]


def ntp_script(request: SampleRequest, j: int) -> Sample:
    """Answers: line 3 never finishes; elsewhere j=0 ANSWER, j=1 truncated, j=2 another answer.
    Continuations: " so it is blue." (line 2's first: the rest of ANSWER, which makes no pair)."""
    line = int(request.key.split("#")[0].rsplit(":", 1)[1]) if request.key.startswith("shapes_eval") else 0
    if request.prefix is not None:
        if line == 2 and request.key.endswith("#ntp0"):
            return stop(ANSWER[len(request.prefix) :])
        return stop(" so it is blue.")
    if line == 3 or j == 1:
        return Sample("I will not finish", "length", 16)
    return stop(ANSWER if j == 0 else "It looks like a red circle to me.")


def test_dropout_ntp_continues_half_without_the_image(questions_meta, tmp_path):
    tok = tiny_tokenizer()
    engine = ScriptedEngine(ntp_script)
    cfg = config(questions_meta, tmp_path / "out", pipeline="dropout_ntp", n=3, temperature=0.8)
    summary = make_pairs(cfg, engine, tok)
    continuations = [r for r in engine.asked if r.prefix is not None]
    assert len(continuations) == 2 * 8  # two complete answers on 8 of the 9 questions
    for r in continuations:
        messages, images = prompt_of(r)
        assert r.drop_images and images == [] and r.key.endswith(("#ntp0", "#ntp2"))
        assert all(part["type"] != "image" for m in messages for part in m["content"])
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"][0]["text"] == r.prefix
        whole = ANSWER if r.key.endswith("#ntp0") else "It looks like a red circle to me."
        assert r.prefix == ntp_prefix(whole, tok)[0]
    first = [r for r in engine.asked if r.prefix is None]
    assert len(first) == 9 and all(r.item.images for r in first)  # the answers saw their images
    assert summary["dropped"]["no_complete_answer"] == 1
    assert summary["dropped_pairs"] == {"continuation_equals_answer": 1}
    assert summary["pairs"] == 15
    pairs = read_jsonl(tmp_path / "out" / "shapes_eval_dropout_ntp.jsonl")
    pair = next(p for p in pairs if p["provenance"]["chosen_sample"] == 0)
    assert pair["chosen"] == ANSWER and pair["rejected"] == "The shape is red, so it is blue."
    prov = pair["provenance"]
    assert (prov["prefix_tokens"], prov["chosen_tokens"], prov["continuation_finish"]) == (5, 11, "stop")
    assert prov["pipeline"] == "dropout_ntp" and prov["temperature"] == 0.8 and prov["n"] == 3
    report = check(tmp_path / "out" / "meta.json", tmp_path)
    assert report["totals"]["ok"] == 15 and report["totals"]["skipped"] == 0


def test_the_command_writes_resumes_and_is_registered(questions_meta, tmp_path, monkeypatch, capsys):
    """`vlmtune make-pairs` through the CLI table (the engine replaced by the script); a rerun in the
    same folder samples nothing and writes the same pairs."""
    import vlmtune.train.runtime.sampler as sampler
    from vlmtune.train.commands.cli import main as cli

    engines: list[ScriptedEngine] = []

    def fake_engine(model, batch_size, device):
        engines.append(ScriptedEngine(correctness_script))
        return engines[-1]

    monkeypatch.setattr(sampler, "TransformersEngine", fake_engine)
    argv = [
        "make-pairs",
        "--model",
        str(tmp_path),
        "--meta",
        str(questions_meta),
        "--out",
        str(tmp_path / "out"),
    ]
    argv += ["--pipeline", "correctness", "--n", "4", "--match", "marker", "--seed", "1"]
    assert cli(argv) == 0
    assert "pairs from 6 of 9 questions" in capsys.readouterr().out
    written = (tmp_path / "out" / "shapes_eval_correctness.jsonl").read_bytes()
    assert cli(argv) == 0
    assert len(engines[0].asked) == 9 and engines[1].asked == []
    assert (tmp_path / "out" / "shapes_eval_correctness.jsonl").read_bytes() == written
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["n"] == 4 and summary["model"] == str(tmp_path.resolve())


def test_pairs_written_as_hugging_face_datasets_read_back_as_the_jsonl_ones(questions_meta, tmp_path):
    """``--format hf``: each MMPR set saved with ``save_to_disk`` and named by an ``hf_dataset`` entry; read
    through the meta file (the path `vlmtune mpo` takes) its records are the jsonl output's, and check-data
    reports the same counts."""
    import datasets

    from vlmtune.data.meta import load_meta, record_source

    settings = {"n": 6, "match": "marker", "max_pairs_per_question": 2, "seed": 3}
    make_pairs(config(questions_meta, tmp_path / "jsonl", **settings), ScriptedEngine(correctness_script))
    make_pairs(
        config(questions_meta, tmp_path / "hf", format="hf", **settings), ScriptedEngine(correctness_script)
    )
    meta = json.loads((tmp_path / "hf" / "meta.json").read_text())
    assert all("hf_dataset" in e and "annotation" not in e for e in meta.values())
    ours = {s.name: s for s in load_meta(tmp_path / "hf" / "meta.json")}
    theirs = {s.name: s for s in load_meta(tmp_path / "jsonl" / "meta.json")}
    assert ours.keys() == theirs.keys()
    for name, spec in ours.items():
        a, b = record_source(spec), record_source(theirs[name])
        assert a.num_records == b.num_records > 0
        rows = datasets.load_from_disk(str(tmp_path / "hf" / meta[name]["hf_dataset"]))
        for k in range(a.num_records):
            got, want = a.read(k), b.read(k)  # what the pair loader reads: question, answers, image
            assert {"question", "chosen", "rejected"} <= got.keys()
            assert got == {key: want[key] for key in got}
            assert rows[k]["provenance"] == want["provenance"]  # kept in the dataset, as in the jsonl
    assert (
        check(tmp_path / "hf" / "meta.json", tmp_path)["totals"]
        == check(tmp_path / "jsonl" / "meta.json", tmp_path)["totals"]
    )
