"""The demo dataset: deterministic, balanced, held-out eval, and the answer really is in the pixels."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtune.data.meta import load_meta
from vlmtune.data.synthetic import (
    ANSWERS,
    BACKGROUNDS,
    COLOURS,
    PAIR_TASKS,
    generate_pair_dataset,
    generate_sft_dataset,
    generate_step_dataset,
    reasoning_answer,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_sft_dataset(out, num_train=600, num_eval=120, seed=7)
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_under_seed(demo, tmp_path):
    generate_sft_dataset(tmp_path / "again", num_train=600, num_eval=120, seed=7)
    assert digest_tree(tmp_path / "again") == digest_tree(demo)
    generate_sft_dataset(tmp_path / "other", num_train=600, num_eval=120, seed=8)
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (demo / "train.jsonl").read_bytes()


def test_meta_files_load_and_count(demo):
    [train] = load_meta(demo / "meta_train.json")
    [evals] = load_meta(demo / "meta_eval.json")
    assert (train.num_records, evals.num_records) == (600, 120)
    assert train.data_augment and not evals.data_augment


def test_answers_balanced_per_task(demo):
    by_task: dict[str, Counter] = {}
    for r in records(demo / "train.jsonl"):
        by_task.setdefault(r["task"], Counter())[r["answer"]] += 1
    assert set(by_task) == {"color", "shape", "count", "multi_image", "text"}
    for task in ("color", "shape", "count", "multi_image"):
        counts = by_task[task]
        assert set(counts) == set(ANSWERS[task])
        assert max(counts.values()) - min(counts.values()) <= 1, (task, counts)


def test_question_phrasing_does_not_give_the_answer(demo):
    """Every phrasing of a task is used with more than one answer, so text alone cannot decide."""
    answers_by_question: dict[str, set[str]] = {}
    for r in records(demo / "train.jsonl"):
        if r["task"] in ("color", "shape", "count"):
            answers_by_question.setdefault(r["conversations"][0]["value"], set()).add(r["answer"])
    assert all(len(a) > 1 for a in answers_by_question.values())


def test_eval_images_disjoint_from_train(demo):
    def images(split):
        out = set()
        for r in records(demo / f"{split}.jsonl"):
            img = r.get("image", [])
            out.update([img] if isinstance(img, str) else img)
        return out

    train, evals = images("train"), images("eval")
    assert train and evals and not train & evals
    train_bytes = {hashlib.sha1((demo / p).read_bytes()).hexdigest() for p in train}
    assert not any(hashlib.sha1((demo / p).read_bytes()).hexdigest() in train_bytes for p in evals)


def shape_pixels(image: Image.Image) -> np.ndarray:
    """Pixels that are not any background colour (shapes are drawn without anti-aliasing)."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    is_background = np.all(rgb[:, :, None, :] == np.asarray(BACKGROUNDS)[None, None], axis=-1)
    return ~np.any(is_background, axis=-1)


def components(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return n


def test_answer_is_in_the_pixels(demo):
    """Colour answers are the shapes' colour; count answers are the number of separate blobs."""
    recs = records(demo / "eval.jsonl")
    colour_recs = [r for r in recs if r["task"] == "color"][:12]
    count_recs = [r for r in recs if r["task"] == "count"][:12]
    for r in colour_recs:
        rgb = np.asarray(Image.open(demo / r["image"]).convert("RGB"))
        mask = shape_pixels(Image.open(demo / r["image"]))
        assert mask.mean() > 0.05  # the shape is big, not a speck
        values = Counter(map(tuple, rgb[mask].tolist()))
        assert values.most_common(1)[0][0] == COLOURS[r["answer"]]
    for r in count_recs:
        assert components(shape_pixels(Image.open(demo / r["image"]))) == int(r["answer"])


def test_sizes_and_aspect_ratios_vary(demo):
    sizes = [
        Image.open(demo / r["image"]).size
        for r in records(demo / "train.jsonl")
        if isinstance(r.get("image"), str)
    ]
    ratios = [w / h for w, h in sizes]
    assert min(min(s) for s in sizes) >= 40 and max(max(s) for s in sizes) <= 300
    assert min(ratios) < 0.5 and max(ratios) > 2.0


# --- preference pairs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    generate_pair_dataset(out, num_train=200, num_eval=40, seed=3)
    return out


def test_pairs_deterministic_under_seed(pairs, tmp_path):
    generate_pair_dataset(tmp_path / "again", num_train=200, num_eval=40, seed=3)
    assert digest_tree(tmp_path / "again") == digest_tree(pairs)
    generate_pair_dataset(tmp_path / "other", num_train=200, num_eval=40, seed=4)
    assert (tmp_path / "other" / "pairs_train.jsonl").read_bytes() != (
        pairs / "pairs_train.jsonl"
    ).read_bytes()


def test_pairs_meta_and_mmpr_fields(pairs):
    from vlmtune.data.pairs import validate_pair

    [train] = load_meta(pairs / "meta_pairs_train.json")
    [evals] = load_meta(pairs / "meta_pairs_eval.json")
    assert (train.num_records, evals.num_records) == (200, 40)
    assert train.data_augment and not evals.data_augment
    for r in records(pairs / "pairs_train.jsonl"):
        pair = validate_pair(r)  # a valid pair: fields present, chosen != rejected
        assert pair.question.startswith("<image>\n") and pair.images == [r["image"]]


def test_pairs_balanced_chosen_and_rejected_per_task(pairs):
    recs = records(pairs / "pairs_train.jsonl")
    assert Counter(r["task"] for r in recs) == {"color": 68, "shape": 66, "count": 66}
    for task in PAIR_TASKS:
        short = [r for r in recs if r["task"] == task and r["style"] == "short"]
        reasoning = [r for r in recs if r["task"] == task and r["style"] == "reasoning"]
        assert len(reasoning) == round(0.3 * (len(short) + len(reasoning)))
        for r in short:
            assert r["chosen"] == r["answer"] != r["rejected"] and r["rejected"] in ANSWERS[task]
        chosen = Counter(r["answer"] for r in short + reasoning)
        rejected = Counter(r["rejected"] for r in short) + Counter(
            r["rejected"].rsplit(" ", 1)[1].rstrip(".") for r in reasoning
        )
        assert set(chosen) == set(rejected) == set(ANSWERS[task])
        assert max(chosen.values()) - min(chosen.values()) <= 1, (task, chosen)
        assert max(rejected.values()) - min(rejected.values()) <= 1, (task, rejected)


def test_reasoning_pairs_exact_text(pairs):
    recs = [r for r in records(pairs / "pairs_train.jsonl") if r["style"] == "reasoning"]
    colour = next(r for r in recs if r["task"] == "color")
    a = colour["answer"]
    assert colour["chosen"] == f"The shape is {a}, so the answer is {a}."
    assert colour["rejected"] in {f"The shape is {w}, so the answer is {w}." for w in COLOURS if w != a} | {
        f"The shape is {a}, so the answer is {w}." for w in COLOURS if w != a
    }
    assert reasoning_answer("count", "3", "3") == "I count three shapes, so the answer is 3."
    assert reasoning_answer("count", "1", "2") == "I count one shape, so the answer is 2."
    assert reasoning_answer("shape", "circle", "circle") == "The shape is a circle, so the answer is circle."
    # both kinds of wrong chain occur: a misread image and a right reading with a wrong conclusion
    misread = [r for r in recs if not r["rejected"].startswith(r["chosen"].split(",")[0])]
    assert 0 < len(misread) < len(recs)


def test_pair_answers_are_in_the_pixels_and_eval_disjoint(pairs):
    recs = records(pairs / "pairs_eval.jsonl")
    for r in [r for r in recs if r["task"] == "color"][:8]:
        rgb = np.asarray(Image.open(pairs / r["image"]).convert("RGB"))
        values = Counter(map(tuple, rgb[shape_pixels(Image.open(pairs / r["image"]))].tolist()))
        assert values.most_common(1)[0][0] == COLOURS[r["answer"]]
    for r in [r for r in recs if r["task"] == "count"][:8]:
        assert components(shape_pixels(Image.open(pairs / r["image"]))) == int(r["answer"])
    train = {
        hashlib.sha1((pairs / r["image"]).read_bytes()).hexdigest()
        for r in records(pairs / "pairs_train.jsonl")
    }
    assert not any(hashlib.sha1((pairs / r["image"]).read_bytes()).hexdigest() in train for r in recs)


def test_step_questions_balanced_three_steps_and_the_pixels_hold_both_facts(tmp_path):
    """The multi-step questions: every (colour, shape) pair equally often, the solution three blank-line
    steps (PRM data splits there) whose marked answer is the reference, and the colour in the pixels."""
    from vlmtune.data.answers import answers_match
    from vlmtune.data.prm import split_steps

    generate_step_dataset(tmp_path, num_train=36, num_eval=18, seed=3)
    for split, n in (("train", 36), ("eval", 18)):
        recs = records(tmp_path / f"{split}.jsonl")
        combos = Counter(r["answer"] for r in recs)
        assert len(combos) == 18 and set(combos.values()) == {n // 18}
        for r in recs:
            colour, kind = r["answer"].split()
            solution = r["conversations"][1]["value"]
            steps = split_steps(solution)
            assert len(steps) == 3 and colour in steps[0] and kind in steps[1]
            assert answers_match(solution, r["answer"], "marker")
            rgb = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB"))
            values = Counter(map(tuple, rgb[shape_pixels(Image.open(tmp_path / r["image"]))].tolist()))
            assert values.most_common(1)[0][0] == COLOURS[colour]
    assert [s.name for s in load_meta(tmp_path / "meta_eval.json")] == ["steps_eval"]


def test_general_mixture_reads_checks_and_wording_are_right(tmp_path):
    """The PRM base's mixture: per multi-step record its image read in one word (the truth), checked
    yes/no (yes exactly when the claim is the truth, about half the time), and a sentence of a step's
    wording whose named attribute is the answer; the multi-step records themselves are in it too."""
    from vlmtune.data.synthetic import CHECK_QUESTIONS, READ_QUESTIONS, SHAPES, WORDING_QUESTIONS

    generate_step_dataset(tmp_path, num_train=90, num_eval=18, seed=4, general=True)
    steps = {r["image"]: r for r in records(tmp_path / "train.jsonl")}
    mixed = records(tmp_path / "general_train.jsonl")
    tasks = Counter(r["task"] for r in mixed)
    assert tasks["steps"] == 90 and all(
        tasks[f"{t}_{a}"] == 90 for t in ("read", "check", "wording") for a in ("colour", "shape")
    )
    yes = Counter()
    for r in mixed:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if r["task"].startswith("wording"):
            attr = r["task"].split("_")[1]
            sentence, asked = question.split("\n")
            assert (
                "image" not in r
                and asked == WORDING_QUESTIONS[attr]
                and answer in sentence.rstrip(".").split()
            )
            continue
        if r["task"] == "steps":
            continue
        colour, kind = steps[r["image"]]["answer"].split()
        attr = r["task"].split("_")[1]
        truth = colour if attr == "colour" else kind
        if r["task"].startswith("read"):
            assert question == "<image>\n" + READ_QUESTIONS[attr] and answer == truth
        else:
            claim = [
                v
                for v in (COLOURS if attr == "colour" else SHAPES)
                if question == "<image>\n" + CHECK_QUESTIONS[attr].format(claim=v)
            ]
            assert len(claim) == 1 and answer == ("yes" if claim[0] == truth else "no")
            yes[answer] += 1
    assert 0.35 < yes["yes"] / 180 < 0.65
    assert [s.name for s in load_meta(tmp_path / "meta_general_eval.json")] == ["general_eval"]
