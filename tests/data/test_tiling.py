"""data.tiling against the model card's code (tests/data/reference_tiling.py), pixel for pixel.

Tolerance for ``image_to_tiles`` / ``frames_to_tiles`` vs the reference transform: exact
(max |diff| == 0.0). The fast path does the same float32 operations per pixel in the same
order (x/255, -mean, /std), so any difference at all would be a bug, not rounding.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data import reference_tiling as ref
from vlmtune.data.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    choose_grid,
    dynamic_preprocess,
    frames_to_tiles,
    image_to_tiles,
    target_ratios,
)

TOLERANCE = 0.0  # see module docstring


def _noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L").convert("P")
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
        return img
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _first_minimum(width: int, height: int, ratios) -> tuple[int, int]:
    """Closest grid WITHOUT the tie-break rule: used to show the tie cases really exercise it."""
    diffs = [abs(width / height - c / r) for c, r in ratios]
    return ratios[diffs.index(min(diffs))]


def _random_cases(n: int, seed: int) -> list[tuple[int, int, int, int, int, bool]]:
    """(width, height, image_size, min_num, max_num, use_thumbnail), seeded."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        image_size = rng.choice([28, 56])
        shape = rng.random()
        if shape < 0.6:
            width, height = rng.randint(1, 400), rng.randint(1, 400)
        elif shape < 0.8:  # extreme aspect ratios
            long, short = rng.randint(200, 3000), rng.randint(1, 12)
            width, height = (long, short) if rng.random() < 0.5 else (short, long)
        else:  # exact multiples of a grid: equal aspect-ratio ties between e.g. 2x1 and 4x2
            cols, rows = rng.choice([(1, 1), (2, 1), (1, 2), (3, 1), (3, 2), (2, 3), (1, 3)])
            k = rng.randint(1, 60)
            width, height = cols * k, rows * k
        max_num = rng.choice([1, 6, 12, 24])
        min_num = rng.choice([1, 1, 1, 2, 3]) if max_num >= 3 else 1
        cases.append((width, height, image_size, min_num, max_num, rng.random() < 0.7))
    return cases


FIXED_CASES = [
    # (width, height, image_size, min_num, max_num, use_thumbnail)
    (1, 1, 56, 1, 12, True),
    (1, 2000, 56, 1, 12, True),
    (3000, 7, 56, 1, 24, True),
    (2000, 1, 28, 1, 6, False),
    (896, 448, 448, 1, 12, True),  # ties 2x1 / 4x2: too small for 4x2, keeps 2x1
    (1800, 900, 448, 1, 12, True),  # same tie, big enough: 4x2
    (448, 448, 448, 1, 12, True),  # 1x1 / 2x2 / 3x3 tie, keeps 1x1 -> no thumbnail
    (1000, 1000, 448, 1, 12, True),  # same tie, big enough for 2x2
    (600, 300, 448, 1, 12, False),
    (5, 4, 28, 2, 2, True),  # min_num > 1: 1x2 and 2x1 tie, small image: set order decides
    (50, 40, 28, 2, 2, True),  # same tie, area > 0.5*S*S*2: the later one wins
    (5, 2, 28, 4, 4, True),  # 4x1 / 2x2 tie: the set yields (4, 1) first; generation order would give (2, 2)
    (500, 200, 28, 4, 4, False),  # same tie, big image: the later one, (2, 2), wins
    (100, 40, 56, 3, 6, True),
    (123, 457, 56, 1, 1, True),  # max_num 1: a single tile, never a thumbnail
]


def _check_tiles(case):
    width, height, image_size, min_num, max_num, use_thumbnail = case
    image = _noise_image(width, height, seed=width * 7919 + height)
    kwargs = dict(min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail)
    expected = ref.dynamic_preprocess(image, **kwargs)
    got = dynamic_preprocess(image, **kwargs)
    assert len(got) == len(expected), case
    for g, e in zip(got, expected):
        assert (g.mode, g.size) == (e.mode, e.size), case
        assert g.tobytes() == e.tobytes(), case


@pytest.mark.parametrize(
    "case", FIXED_CASES, ids=lambda c: "x".join(map(str, c[:2])) + f"-S{c[2]}-{c[3]}..{c[4]}"
)
def test_dynamic_preprocess_fixed_cases_equal_reference(case):
    _check_tiles(case)


def test_dynamic_preprocess_random_sizes_equal_reference():
    for case in _random_cases(400, seed=1234):
        _check_tiles(case)


def test_tie_break_cases_really_differ_from_first_minimum():
    """The fixed tie cases must hit the area rule both ways, or the equality tests prove little."""
    kept, replaced = 0, 0
    for width, height, image_size, min_num, max_num, _ in FIXED_CASES:
        ratios = target_ratios(min_num, max_num)
        diffs = [abs(width / height - c / r) for c, r in ratios]
        if diffs.count(min(diffs)) < 2:
            continue
        chosen = choose_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
        if chosen == _first_minimum(width, height, ratios):
            kept += 1
        else:
            replaced += 1
    assert kept >= 3 and replaced >= 3


def test_choose_grid_hand_computed():
    assert choose_grid(896, 448, min_num=1, max_num=12, image_size=448) == (2, 1)
    assert choose_grid(1800, 900, min_num=1, max_num=12, image_size=448) == (4, 2)
    assert choose_grid(1, 2000, min_num=1, max_num=12, image_size=448) == (1, 12)
    assert choose_grid(3000, 7, min_num=1, max_num=24, image_size=448) == (24, 1)
    assert choose_grid(448, 448, min_num=1, max_num=12, image_size=448) == (1, 1)
    assert choose_grid(1000, 1000, min_num=1, max_num=12, image_size=448) == (3, 3)  # 1e6 > 0.5*448²*9
    assert choose_grid(700, 700, min_num=1, max_num=12, image_size=448) == (2, 2)  # 490000 < 903168
    # The model card's quirk kept on purpose: which equal-area grid is "first" is the set's order.
    assert choose_grid(5, 2, min_num=4, max_num=4, image_size=28) == (4, 1)
    assert choose_grid(500, 200, min_num=4, max_num=4, image_size=28) == (2, 2)


def test_target_ratios_bounds_and_order():
    ratios = target_ratios(2, 6)
    areas = [c * r for c, r in ratios]
    assert areas == sorted(areas) and min(areas) == 2 and max(areas) == 6
    assert set(ratios) == {(c, r) for c in range(1, 7) for r in range(1, 7) if 2 <= c * r <= 6}
    with pytest.raises(ValueError):
        target_ratios(3, 2)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    return (a - b).abs().max().item()


def test_image_to_tiles_equals_reference_transform_random():
    worst = 0.0
    for width, height, image_size, min_num, max_num, use_thumbnail in _random_cases(150, seed=99):
        image = _noise_image(width, height, seed=width + 31 * height)
        got = image_to_tiles(
            image, image_size=image_size, max_num=max_num, min_num=min_num, use_thumbnail=use_thumbnail
        )
        expected = ref.reference_pixel_values(image, image_size, max_num, min_num, use_thumbnail)
        worst = max(worst, _max_abs_diff(got, expected))
    assert worst <= TOLERANCE


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("size", [(1000, 700), (333, 1500), (448, 448), (30, 900)])
def test_image_to_tiles_equals_reference_transform_448(mode, size):
    image = _noise_image(*size, seed=sum(size), mode=mode)
    got = image_to_tiles(image, image_size=448, max_num=12)
    expected = ref.reference_pixel_values(image, 448, 12, 1, True)
    assert _max_abs_diff(got, expected) <= TOLERANCE


def test_image_to_tiles_layout_hand_checked():
    """Constant-colour quadrants: tile k must hold quadrant k (row-major), thumbnail last."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    image = Image.new("RGB", (112, 112))
    for k, colour in enumerate(colours):
        image.paste(colour, (56 * (k % 2), 56 * (k // 2), 56 * (k % 2 + 1), 56 * (k // 2 + 1)))
    # 112x112 with S=56 and max_num=4: 2x2 grid (area 12544 > 0.5*56²*4), no resampling at all.
    tiles = image_to_tiles(image, image_size=56, max_num=4)
    assert tiles.shape == (5, 3, 56, 56)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for k, colour in enumerate(colours):
        expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).div(255) - mean) / std
        assert torch.equal(tiles[k], expected.expand(3, 56, 56))


def test_frames_to_tiles_equals_model_card_video_path():
    transform = ref.build_transform(56)
    frames = [
        _noise_image(w, h, seed=i) for i, (w, h) in enumerate([(64, 48), (56, 56), (20, 300), (500, 17)])
    ]
    expected = torch.stack(
        [transform(ref.dynamic_preprocess(f, image_size=56, max_num=1)[0]) for f in frames]
    )
    got = frames_to_tiles(frames, 56)
    assert got.shape == (4, 3, 56, 56)
    assert _max_abs_diff(got, expected) <= TOLERANCE
