"""Mixture weights as token shares: the pure maths by hand, the tiling shortcut, realised shares of an index."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from vlmtune.data.dataset import DataConfig, SampleProcessor, num_image_tiles
from vlmtune.data.meta import build_index, expand_count, load_meta
from vlmtune.data.mixture import apply_mixture, mixture_counts, resolve_mixture, token_budget, token_shares
from vlmtune.data.synthetic import scene
from vlmtune.data.tiling import image_to_tiles

TILE, TOKENS = 56, 16


def test_mixture_counts_by_hand():
    # 40% of 10,000 tokens at 100 tokens/sample = 40 samples; 60% at 40 tokens/sample = 150
    assert mixture_counts([0.4, 0.6], [100, 40], 10_000) == [40, 150]
    assert token_shares([40, 150], [100, 40]) == [0.4, 0.6]
    # weights need not sum to 1: 1:1:2 of 1000 tokens -> 250/30 = 8.33, 250/7 = 35.7, 500/11 = 45.5
    assert mixture_counts([1, 1, 2], [30, 7, 11], 1000) == [8, 36, 45]
    assert mixture_counts([0.001, 1], [50, 50], 1000) == [1, 20]  # 0.02 samples: kept as 1
    assert token_budget([1.0, 0.5, 2.0], [10, 20, 5], [3.0, 4.0, 10.0]) == 30 + 40 + 100
    with pytest.raises(ValueError):
        mixture_counts([0.5, 0], [10, 10], 100)


def test_expand_count_is_exact():
    rng = random.Random(0)
    lines = expand_count(10, 25, rng)
    counts = Counter(lines)
    assert len(lines) == 25 and set(counts) == set(range(10))
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # two copies, plus 5 distinct lines once more
    assert expand_count(10, 3, random.Random(0)) == expand_count(10, 3, random.Random(0))
    assert len(set(expand_count(10, 3, random.Random(0)))) == 3


@pytest.mark.parametrize("max_num", [1, 6])
def test_num_image_tiles_matches_the_tiles_made(max_num):
    rng = random.Random(max_num)
    for _ in range(30):
        w, h = rng.randint(20, 400), rng.randint(20, 400)
        image = scene(rng, (w, w), 1, None, None, max_aspect=1.0).resize((w, h))
        tiles = image_to_tiles(image, image_size=TILE, max_num=max_num, min_num=1, use_thumbnail=True)
        assert num_image_tiles(w, h, min_num=1, max_num=max_num, image_size=TILE, use_thumbnail=True) == len(
            tiles
        )


@pytest.fixture(scope="module")
def mixture_meta(tmp_path_factory) -> Path:
    """Text documents of 3..40 words and image questions (1 or 2 images, 1..7 tiles each): 0.4 / 0.6."""
    root = tmp_path_factory.mktemp("mixture")
    (root / "images").mkdir()
    rng = random.Random(0)
    words = "red green blue circle square triangle the is a of and above below".split()
    texts = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))} for _ in range(50)]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    records = []
    for i in range(30):
        paths = []
        for j in range(1 + i % 2):
            w, h = rng.randint(40, 300), rng.randint(40, 300)
            scene(rng, (40, 40), 1, None, None, max_aspect=1.0).resize((w, h)).save(
                root / f"images/{i}_{j}.png"
            )
            paths.append(f"images/{i}_{j}.png")
        conv = [{"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "red"}]
        records.append({"image": paths if len(paths) > 1 else paths[0], "conversations": conv})
    (root / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {
        "text": {"annotation": "text.jsonl", "weight": 0.4},
        "vqa": {"annotation": "vqa.jsonl", "weight": 0.6, "max_dynamic_patch": 6, "repeat_time": 2},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def _processor(tok, meta: Path) -> SampleProcessor:
    cfg = DataConfig(meta_path=str(meta), max_length=4096, image_size=TILE, system_prompt=None)
    return SampleProcessor(cfg, tok, TOKENS)


def test_count_tokens_equals_the_processed_length_without_decoding(tok, mixture_meta):
    specs = load_meta(mixture_meta)
    proc = _processor(tok, mixture_meta)
    for spec in specs:
        for line in range(spec.num_records):
            sample = proc(spec, line, random.Random(line), False)
            assert proc.count_tokens(spec, line) == len(sample["input_ids"]), (spec.name, line)


def test_realised_token_shares_of_the_index_match_the_weights(tok, mixture_meta):
    """The whole pipeline at start: estimate lengths (all records: exact means), counts, index; the
    tokens the index really holds are within 0.02 of the 0.4 / 0.6 asked for."""
    specs = load_meta(mixture_meta)
    proc = _processor(tok, mixture_meta)
    mixed, plan = resolve_mixture(specs, proc, seed=0, max_records=64)
    assert [row["dataset"] for row in plan] == ["text", "vqa"]
    lengths = {
        (ds, line): proc.count_tokens(spec, line)
        for ds, spec in enumerate(specs)
        for line in range(spec.num_records)
    }
    means = [sum(v for (d, _), v in lengths.items() if d == ds) / s.num_records for ds, s in enumerate(specs)]
    assert [row["mean_tokens"] for row in plan] == pytest.approx(means)
    # the epoch keeps the tokens repeat_time gives (text once, vqa twice), redistributed 0.4 / 0.6
    budget = 50 * means[0] + 2 * 30 * means[1]
    expected = [round(0.4 * budget / means[0]), round(0.6 * budget / means[1])]
    assert [s.samples_per_epoch for s in mixed] == expected
    for seed in range(3):
        index = build_index(mixed, seed)
        assert Counter(ds for ds, _ in index) == {0: expected[0], 1: expected[1]}
        tokens = Counter()
        for ds, line in index:
            tokens[ds] += lengths[(ds, line)]
        share = tokens[0] / (tokens[0] + tokens[1])
        assert share == pytest.approx(0.4, abs=0.02), seed
    # without weights, repeat_time alone decides (the text would be a different share)
    plain = apply_mixture([s.__class__(**{**s.__dict__, "weight": None}) for s in specs], means)
    assert Counter(ds for ds, _ in build_index(plain, 0)) == {0: 50, 1: 60}
