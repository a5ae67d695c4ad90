"""Preference pairs: validation reasons, the SFT prompt, exact labels, and the two layouts."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.data.pair_layouts import pair_as_sequences, pair_as_tree
from tests.data.tokens import enc, image_ids
from vlmtune.data.conversation import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX
from vlmtune.data.dataset import DataConfig, SampleProcessor, iter_samples, sample_rng
from vlmtune.data.meta import load_meta
from vlmtune.data.pairs import (
    PairProcessor,
    PairRecord,
    tokenize_pair,
    tree_attention_mask,
    tree_parent_index,
    tree_position_ids,
    validate_pair,
)
from vlmtune.data.report import SkipReport, SkipSample
from vlmtune.data.synthetic import scene, write_meta
from vlmtune.train.commands.check_data import main as check_main

TILE, TOKENS = 56, 16


def cfg_for(meta: Path, **overrides) -> DataConfig:
    return replace(DataConfig(meta_path=str(meta), max_length=4096, image_size=TILE), **overrides)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A directory with two images: a wide one (several tiles) and a small square one."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    rng = random.Random(0)
    scene(rng, (150, 200), 2, "circle", "red").save(root / "images/wide.png")
    scene(rng, (40, 50), 1, "square", "blue").save(root / "images/small.png")
    return root


def write_dataset(root: Path, name: str, records: list[dict | str], augment: bool = False) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return write_meta(root / f"meta_{name}.json", name, f"{name}.jsonl", data_augment=augment)


PAIR = {"image": "images/wide.png", "question": "What color is it?", "chosen": "red", "rejected": "blue"}


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        ({"question": None}, "missing_field", "question"),
        ({"chosen": None}, "missing_field", "chosen"),
        ({"question": "   "}, "missing_field", "question"),
        ({"rejected": 3}, "bad_conversation", "rejected"),
        ({"question": ["a"]}, "bad_conversation", "question"),
        ({"chosen": ""}, "empty_response", "chosen"),
        ({"rejected": " \n"}, "empty_response", "rejected"),
        ({"rejected": "red"}, "identical_pair", "same text"),
        ({"rejected": " red\n"}, "identical_pair", "same text"),
        ({"image": 5}, "bad_conversation", "image"),
        ({"video": "v.mp4"}, "bad_conversation", "image and video"),
    ],
)
def test_validate_pair_names_reason_and_field(change, reason, field):
    record = {k: v for k, v in {**PAIR, **change}.items() if v is not None}
    with pytest.raises(SkipSample) as err:
        validate_pair(record)
    assert err.value.reason == reason and field in err.value.detail


def test_validate_pair_keeps_fields_and_media():
    assert validate_pair({**PAIR, "image": ["a.png", "b.png"], "extra": 1}) == PairRecord(
        "What color is it?", "red", "blue", ["a.png", "b.png"], None
    )
    assert validate_pair({k: v for k, v in PAIR.items() if k != "image"}).images == []


def test_bad_pairs_counted_at_their_lines(tok, images):
    long_answer = " ".join(["shape"] * 600)
    records = [
        PAIR,  # 1 ok
        {**PAIR, "rejected": "red"},  # 2
        {**PAIR, "chosen": ""},  # 3
        {k: v for k, v in PAIR.items() if k != "question"},  # 4
        '{"question": "broken',  # 5
        {**PAIR, "image": "images/nope.png"},  # 6
        {**PAIR, "chosen": "<image> red"},  # 7
        {**PAIR, "rejected": long_answer},  # 8
        {**PAIR, "image": "images/small.png", "question": "<image>\nWhich colour?"},  # 9 ok
        {"question": "What is 2+2?", "chosen": "4", "rejected": "5"},  # 10 ok, pure text
    ]
    meta = write_dataset(images, "bad_pairs", records)
    specs = load_meta(meta)
    report = SkipReport()
    proc = PairProcessor(cfg_for(meta, max_length=512), tok, TOKENS)
    index = [(0, k) for k in range(specs[0].num_records)]
    pairs = list(iter_samples(proc, specs, index, 0, report, training=False))
    assert {e["line"]: e["reason"] for e in report.entries} == {
        2: "identical_pair",
        3: "empty_response",
        4: "missing_field",
        5: "malformed_json",
        6: "missing_image",
        7: "placeholder_mismatch",
        8: "too_long",
    }
    assert [p["source"].rsplit(":", 1)[1] for p in pairs] == ["1", "9", "10"]
    assert pairs[2]["num_tiles"] == 0 and pairs[2]["pixel_values"].shape == (0, 3, TILE, TILE)


# --- tokenisation ---------------------------------------------------------------------------


def test_prompt_and_responses_equal_the_sft_sample(tok, images):
    """Same question + image as an SFT record: the pair's prompt is the SFT prompt, each side its answer."""
    question = "What color is the shape?"  # no <image>: both paths insert it in front
    for n, image in enumerate(("images/wide.png", ["images/wide.png", "images/small.png"])):
        pair_meta = write_dataset(
            images,
            f"one_pair{n}",
            [{"image": image, "question": question, "chosen": "red", "rejected": "blue"}],
            True,
        )
        sides = {
            side: {
                "image": image,
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": side}],
            }
            for side in ("red", "blue")
        }
        sft_meta = write_dataset(images, f"sft_sides{n}", list(sides.values()), True)
        [pair_spec], [sft_spec] = load_meta(pair_meta), load_meta(sft_meta)
        pair = PairProcessor(cfg_for(pair_meta), tok, TOKENS)(pair_spec, 0, sample_rng(3, 7), training=True)
        sft_proc = SampleProcessor(cfg_for(sft_meta), tok, TOKENS)
        for k, side in enumerate(("chosen", "rejected")):
            sft = sft_proc(sft_spec, k, sample_rng(3, 7), training=True)
            p = len(pair["prompt_ids"])
            assert torch.equal(sft["input_ids"][:p], pair["prompt_ids"])
            assert torch.equal(sft["input_ids"][p:], pair[f"{side}_ids"])
            assert torch.equal(sft["labels"][p:], pair[f"{side}_labels"])
            assert (sft["labels"][:p] == IGNORE_INDEX).all()
            assert torch.equal(sft["pixel_values"], pair["pixel_values"])  # same media path, same JPEG draw
            assert (pair["num_tiles"], pair["num_images"]) == (sft["num_tiles"], sft["num_images"])


def test_labels_exact_against_hand_built_pieces(tok):
    pair = PairRecord("<image>\nWhat color?", "The shape is red.", "blue", ["x.png"], None)
    out = tokenize_pair(pair, tok, [3 * TOKENS], system_prompt=DEFAULT_SYSTEM_PROMPT)
    prompt = (
        enc(tok, f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        + enc(tok, "<|im_start|>user\n")
        + image_ids(tok, 3 * TOKENS)
        + enc(tok, "\nWhat color?")
        + enc(tok, "<|im_end|>\n")
        + enc(tok, "<|im_start|>assistant\n")
    )
    assert out["prompt_ids"].tolist() == prompt
    im_end, newline = enc(tok, "<|im_end|>"), enc(tok, "\n")
    for side, text in (("chosen", "The shape is red."), ("rejected", "blue")):
        answer = enc(tok, text)
        assert out[f"{side}_ids"].tolist() == answer + im_end + newline
        assert out[f"{side}_labels"].tolist() == answer + im_end + [IGNORE_INDEX] * len(newline)
    assert tok.decode(out["prompt_ids"].tolist()).endswith("<|im_start|>assistant\n")


def test_too_long_uses_prompt_plus_longer_response(tok):
    pair = PairRecord("<image>\nWhat color?", "red", "it is a very dark blue", ["x.png"], None)
    out = tokenize_pair(pair, tok, [TOKENS], system_prompt=None)
    longest = len(out["prompt_ids"]) + max(len(out["chosen_ids"]), len(out["rejected_ids"]))
    assert len(out["rejected_ids"]) > len(out["chosen_ids"])
    kept = tokenize_pair(pair, tok, [TOKENS], system_prompt=None, max_length=longest)
    assert all(torch.equal(kept[k], out[k]) for k in out)
    with pytest.raises(SkipSample) as err:
        tokenize_pair(pair, tok, [TOKENS], system_prompt=None, max_length=longest - 1)
    assert err.value.reason == "too_long" and str(longest) in err.value.detail


# --- layouts --------------------------------------------------------------------------------


def test_tree_mask_positions_parents_hand_cases():
    t, f = True, False
    assert tree_attention_mask(2, 2, 1).tolist() == [
        [t, f, f, f, f],
        [t, t, f, f, f],
        [t, t, t, f, f],
        [t, t, t, t, f],
        [t, t, f, f, t],
    ]
    assert tree_position_ids(2, 2, 1).tolist() == [0, 1, 2, 3, 2]
    assert tree_parent_index(2, 2, 1).tolist() == [-1, 0, 1, 2, 1]
    assert tree_attention_mask(1, 1, 3).tolist() == [
        [t, f, f, f, f],
        [t, t, f, f, f],
        [t, f, t, f, f],
        [t, f, t, t, f],
        [t, f, t, t, t],
    ]
    assert tree_position_ids(1, 1, 3).tolist() == [0, 1, 1, 2, 3]
    assert tree_parent_index(1, 1, 3).tolist() == [-1, 0, 0, 2, 3]
    assert torch.equal(tree_attention_mask(3, 2, 0), torch.ones(5, 5, dtype=torch.bool).tril())
    assert tree_parent_index(3, 2, 0).tolist() == [-1, 0, 1, 2, 3]


def toy_forward(
    ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """Two layers of masked self-attention with absolute position embeddings (float64)."""
    g = torch.Generator().manual_seed(seed)
    dim, vocab, max_pos = 16, 8192, 4096  # fixed, so every call draws the same tables
    x = torch.randn(vocab, dim, generator=g, dtype=torch.float64)[ids]
    x = x + torch.randn(max_pos, dim, generator=g, dtype=torch.float64)[positions]
    for _ in range(2):
        wq, wk, wv = (
            torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim) for _ in range(3)
        )
        scores = ((x @ wq) @ (x @ wk).T / math.sqrt(dim)).masked_fill(~mask, -math.inf)
        x = x + scores.softmax(-1) @ (x @ wv)
    return x


@pytest.fixture(scope="module")
def processed_pair(tok, images):
    record = {**PAIR, "chosen": "The shape is red, so red.", "rejected": "blue"}
    meta = write_dataset(images, "tree_pair", [record])
    [spec] = load_meta(meta)
    return PairProcessor(cfg_for(meta), tok, TOKENS)(spec, 0, random.Random(0), training=False)


def test_sequences_and_tree_hold_the_same_tokens_in_the_same_roles(processed_pair):
    pair = processed_pair
    chosen_seq, rejected_seq = pair_as_sequences(pair)
    tree = pair_as_tree(pair)
    p, c, r = tree["segments"]
    assert (p, c, r) == (len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"]))
    assert (chosen_seq["role"], rejected_seq["role"]) == ("chosen", "rejected")
    assert torch.equal(tree["input_ids"][: p + c], chosen_seq["input_ids"])
    assert torch.equal(tree["labels"][: p + c], chosen_seq["labels"])
    assert torch.equal(
        torch.cat([tree["input_ids"][:p], tree["input_ids"][p + c :]]), rejected_seq["input_ids"]
    )
    assert torch.equal(torch.cat([tree["labels"][:p], tree["labels"][p + c :]]), rejected_seq["labels"])
    assert (tree["labels"][:p] == IGNORE_INDEX).all()
    for seq in (chosen_seq, rejected_seq):  # each naive sequence has its own image tokens and tiles
        assert (
            torch.equal(seq["pixel_values"], pair["pixel_values"])
            and seq["num_tiles"] == pair["num_tiles"] > 1
        )
    assert torch.equal(tree["pixel_values"], pair["pixel_values"])  # tiles once
    assert tree["source"] == chosen_seq["source"] == pair["source"]


def test_tree_computes_what_the_two_sequences_compute(processed_pair):
    """A masked attention stack on the tree gives each token the state it has in its own sequence,
    and scoring token t from ``parent_index[t]`` reproduces the sequences' shift-by-one targets."""
    chosen_seq, rejected_seq = pair_as_sequences(processed_pair)
    tree = pair_as_tree(processed_pair)
    p, c, r = tree["segments"]

    def causal(seq):
        n = len(seq["input_ids"])
        return toy_forward(seq["input_ids"], torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril())

    h_tree = toy_forward(tree["input_ids"], tree["position_ids"], tree_attention_mask(p, c, r))
    h_chosen, h_rejected = causal(chosen_seq), causal(rejected_seq)
    assert torch.allclose(h_tree[: p + c], h_chosen, atol=1e-10)
    assert torch.allclose(h_tree[p + c :], h_rejected[p:], atol=1e-10)
    assert not torch.allclose(  # the mask matters: plain causal attention over the tree differs
        toy_forward(
            tree["input_ids"], tree["position_ids"], torch.ones(p + c + r, p + c + r, dtype=torch.bool).tril()
        )[p + c :],
        h_rejected[p:],
    )

    def scored(h, ids, labels, parent):
        keep = (labels != IGNORE_INDEX).nonzero().flatten()
        return h[parent[keep]], ids[keep]

    tree_states, tree_targets = scored(h_tree, tree["input_ids"], tree["labels"], tree["parent_index"])
    seq_states, seq_targets = zip(
        *(
            scored(h, s["input_ids"], s["labels"], torch.arange(len(h)) - 1)
            for h, s in ((h_chosen, chosen_seq), (h_rejected, rejected_seq))
        )
    )
    assert torch.equal(tree_targets, torch.cat(seq_targets))
    assert torch.allclose(tree_states, torch.cat(seq_states), atol=1e-10)


# --- check-data -----------------------------------------------------------------------------


def test_check_data_scans_pair_files(images, tmp_path):
    meta = write_dataset(images, "check_pairs", [PAIR, {**PAIR, "rejected": "red"}, {**PAIR, "chosen": " "}])
    out = tmp_path / "report.json"
    assert check_main([str(meta), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    d = result["datasets"]["check_pairs"]
    assert (d["lines"], d["ok"], d["skipped"]) == (3, 1, {"empty_response": 1, "identical_pair": 1})
    assert d["labelled_tokens"] > 0 and d["total_tiles"] > 1


@pytest.mark.parametrize("layout", ["tree", "separate"])
def test_a_pair_longer_than_a_pack_is_a_counted_skip_not_a_crash(tok, images, layout):
    """Each side fits max_length, but the pair's packed length (prompt + both answers; the prompt twice in
    the separate layout) does not fit the pack: skipped as too_long with the lengths, at its line."""
    from vlmtune.train.commands.mpo import PairWithLength

    records = [
        {"question": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"question": "Name it.", "chosen": " ".join(["red"] * 20), "rejected": " ".join(["blue"] * 20)},
    ]
    meta = write_dataset(images, f"pack_{layout}", records)
    specs = load_meta(meta)
    processor = PairProcessor(cfg_for(meta, max_length=512), tok, TOKENS)
    unbounded = PairWithLength(processor, layout)
    lengths = [unbounded(specs[0], k, random.Random(0), False)["length"] for k in range(2)]
    assert lengths[0] < lengths[1]
    long_pair = unbounded(specs[0], 1, random.Random(0), False)
    p, c, r = (len(long_pair[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert max(p + c, p + r) <= lengths[1] - 1  # each side alone fits the pack: max_length cannot catch it
    report = SkipReport()
    bounded = PairWithLength(processor, layout, max_tokens=lengths[1] - 1)
    kept = list(iter_samples(bounded, specs, [(0, 0), (0, 1)], 0, report, training=False))
    assert [s["source"].rsplit(":", 1)[1] for s in kept] == ["1"]
    [entry] = report.entries
    assert (entry["line"], entry["reason"]) == (2, "too_long")
    assert f"takes {lengths[1]} tokens in a pack ({layout} layout" in entry["detail"]
    assert f"> packing.max_tokens {lengths[1] - 1}" in entry["detail"]
