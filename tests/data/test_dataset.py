"""The per-sample path on a dataset with one of every bad-input kind among good records."""

from __future__ import annotations

import random

import pytest
import torch

from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.dataset import DataConfig, SampleProcessor, iter_samples, sample_rng
from vlmtune.data.meta import build_index, jsonl_file, load_meta
from vlmtune.data.report import REASONS, SkipReport
from vlmtune.data.synthetic import generate_bad_samples
from vlmtune.data.tiling import image_to_tiles

TILE, TOKENS = 56, 16


@pytest.fixture(scope="module")
def tok():
    from vlmtune.train.model.tiny import build_tokenizer

    return build_tokenizer(None)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return generate_bad_samples(tmp_path_factory.mktemp("bad"), seed=0, num_good=6)


def processor(tok, meta_path, **overrides) -> SampleProcessor:
    cfg = DataConfig(
        meta_path=str(meta_path), max_length=1024, image_size=TILE, min_num_frames=4, max_num_frames=4
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return SampleProcessor(cfg, tok, TOKENS)


def test_every_bad_kind_counted_at_its_line_and_good_ones_yielded(tok, bad):
    specs = load_meta(bad.meta_path)
    index = [(0, k) for k in range(specs[0].num_records)]  # file order, to check positions
    report = SkipReport()
    samples = list(iter_samples(processor(tok, bad.meta_path), specs, index, 0, report, training=False))

    assert set(bad.expected.values()) == set(REASONS)  # the fixture really covers every reason
    got = {e["line"]: e["reason"] for e in report.entries}
    assert got == bad.expected
    assert all(e["file"] == str(bad.annotation) and e["dataset"] == "bad_mix" for e in report.entries)
    assert report.to_dict()["by_reason"] == dict.fromkeys(sorted(REASONS), 1)
    assert [s["source"] for s in samples] == [f"{bad.annotation}:{line}" for line in bad.good_lines]
    assert [s["index"] for s in samples] == [jsonl_line - 1 for jsonl_line in bad.good_lines]


def test_image_sample_tensors_and_token_count(tok, bad):
    specs = load_meta(bad.meta_path)
    jf = jsonl_file(specs[0].annotation)
    k = next(
        k
        for k in range(jf.num_records)
        if jf.line_number(k) in bad.good_lines and isinstance(jf.read(k).get("image"), str)
    )
    proc = processor(tok, bad.meta_path)
    sample = proc(specs[0], k, random.Random(0), training=False)
    record = jf.read(k)
    from vlmtune.data.media import load_image

    expected_tiles = image_to_tiles(load_image(specs[0].root / record["image"]), image_size=TILE, max_num=12)
    assert torch.equal(sample["pixel_values"], expected_tiles)
    assert sample["num_tiles"] == expected_tiles.shape[0]
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((sample["input_ids"] == ctx).sum()) == TOKENS * sample["num_tiles"]
    assert sample["labels"].shape == sample["input_ids"].shape
    answer = tok.decode([t for t in sample["labels"].tolist() if t != IGNORE_INDEX])
    assert answer == record["conversations"][1]["value"] + "<|im_end|>"


def test_meta_max_dynamic_patch_wins_and_multi_image_shares_budget(tok, bad):
    [spec] = load_meta(bad.meta_path)
    proc = processor(tok, bad.meta_path, max_dynamic_patch=12)
    assert proc.tile_limits(spec, 1) == (1, 12)
    assert proc.tile_limits(spec, 2) == (1, 6)
    from dataclasses import replace

    assert proc.tile_limits(replace(spec, max_dynamic_patch=2), 1) == (1, 2)
    assert proc.tile_limits(replace(spec, max_dynamic_patch=2, min_dynamic_patch=3), 4) == (1, 1)


def test_augmentation_depends_only_on_seed_and_position(tok, bad):
    """data_augment: JPEG differs between positions but resuming at position k reproduces it exactly."""
    from dataclasses import replace

    [spec] = load_meta(bad.meta_path)
    spec = replace(spec, data_augment=True)
    proc = processor(tok, bad.meta_path)
    jf = jsonl_file(spec.annotation)
    k = next(
        k
        for k in range(jf.num_records)
        if jf.line_number(k) in bad.good_lines and isinstance(jf.read(k).get("image"), str)
    )
    index = [(0, k)] * 6
    full = list(iter_samples(proc, [spec], index, 0, SkipReport(), training=True))
    resumed = list(iter_samples(proc, [spec], index, 3, SkipReport(), training=True))
    assert [s["index"] for s in resumed] == [3, 4, 5]
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert any(not torch.equal(full[0]["pixel_values"], s["pixel_values"]) for s in full[1:])
    plain = proc(spec, k, sample_rng(0, 0), training=False)  # no augmentation outside training
    assert not torch.equal(plain["pixel_values"], full[0]["pixel_values"])


def test_video_sample_one_tile_per_frame(tok, bad):
    [spec] = load_meta(bad.meta_path)
    jf = jsonl_file(spec.annotation)
    ks = [k for k in range(jf.num_records) if jf.line_number(k) in bad.good_lines and "video" in jf.read(k)]
    if not ks:
        pytest.skip("no video written (PyAV missing)")
    sample = processor(tok, bad.meta_path)(spec, ks[0], random.Random(0), training=False)
    assert sample["num_tiles"] == sample["num_images"] == 4
    assert sample["pixel_values"].shape == (4, 3, TILE, TILE)
    assert "Frame4: <img>" in tok.decode(sample["input_ids"].tolist())


def test_pure_text_sample_has_no_tiles(tok, bad):
    [spec] = load_meta(bad.meta_path)
    jf = jsonl_file(spec.annotation)
    good = [k for k in range(jf.num_records) if jf.line_number(k) in bad.good_lines]
    ks = [k for k in good if "image" not in jf.read(k) and "video" not in jf.read(k)]
    if not ks:
        pytest.skip("no pure-text record in this small sample")
    sample = processor(tok, bad.meta_path)(spec, ks[0], random.Random(0), training=False)
    assert sample["pixel_values"].shape == (0, 3, TILE, TILE) and sample["num_tiles"] == 0


def test_shuffled_index_yields_every_good_line_once(tok, bad):
    specs = load_meta(bad.meta_path)
    report = SkipReport()
    samples = list(
        iter_samples(processor(tok, bad.meta_path), specs, build_index(specs, seed=1), 0, report, False)
    )
    assert sorted(s["source"] for s in samples) == sorted(
        f"{bad.annotation}:{line}" for line in bad.good_lines
    )
    assert report.total == len(bad.expected)


def test_multi_image_sample_concatenates_tiles_in_order(tok, bad):
    [spec] = load_meta(bad.meta_path)
    jf = jsonl_file(spec.annotation)
    k = next(
        k
        for k in range(jf.num_records)
        if jf.line_number(k) in bad.good_lines and isinstance(jf.read(k).get("image"), list)
    )
    from vlmtune.data.media import load_image

    paths = jf.read(k)["image"]
    parts = [
        image_to_tiles(load_image(spec.root / p), image_size=TILE, max_num=6) for p in paths
    ]  # 12 // 2 images
    sample = processor(tok, bad.meta_path)(spec, k, random.Random(0), training=False)
    assert torch.equal(sample["pixel_values"], torch.cat(parts))
    assert sample["num_images"] == 2
    ids = sample["input_ids"].tolist()
    ctx, end = tok.convert_tokens_to_ids(["<IMG_CONTEXT>", "</img>"])
    runs = [len(r) for r in "".join("c" if t == ctx else "." for t in ids).split(".") if r]
    assert runs == [p.shape[0] * TOKENS for p in parts] and ids.count(end) == 2
