"""InternVL dynamic tiling: pick a tile grid for an image, cut it into SxS tiles, normalise.

The grid choice and the crops follow the InternVL3 model card's ``dynamic_preprocess``
(kept verbatim as the test oracle in ``tests/data/reference_tiling.py``) bit for bit.
``image_to_tiles`` is the trainer's fast path: one bicubic resize to the whole grid, one
uint8 -> float conversion fused with the tile split, one in-place normalisation. It gives
exactly the tensors of the reference pipeline (tiles -> ``T.Resize`` -> ``ToTensor`` ->
``Normalize``) because every step is the same per-pixel float32 arithmetic in the same order.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
_BICUBIC = Image.Resampling.BICUBIC


@functools.lru_cache(maxsize=64)
def target_ratios(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Candidate grids (cols, rows) with ``min_num <= cols*rows <= max_num``, by tile count.

    Built exactly like the model card (a set, then a stable sort on the area): when
    ``min_num > 1`` two grids of equal area can tie on aspect ratio (4x1 and 2x2 for a 5:2
    image with ``min_num = max_num = 4``) and the set's iteration order then decides the
    winner, so it must match.
    """
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def choose_grid(width: int, height: int, *, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to ``width/height``.

    Ties keep the model card's rule: a later (larger) grid replaces the current best only if
    the image has more than half the pixels that grid would hold, so small images are not
    blown up to many tiles.
    """
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in target_ratios(min_num, max_num):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Tiles of ``image`` as PIL images, row-major, plus a whole-image thumbnail if >1 tile.

    Same output as the model card's function (InternVL3 model card, "inference with
    transformers"); the resize is PIL's bicubic, which is also its default there.
    """
    cols, rows = choose_grid(*image.size, min_num=min_num, max_num=max_num, image_size=image_size)
    resized = image.resize((cols * image_size, rows * image_size), _BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), _BICUBIC))
    return tiles


def _rgb_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 view of ``image`` in RGB; converted after the resize, where the reference converts too."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _normalise_into(out: torch.Tensor, rgb: np.ndarray, rows: int, cols: int, size: int) -> None:
    """Write the HWC uint8 grid ``rgb`` as ``rows*cols`` CHW tiles into ``out`` and normalise in place.

    The uint8 -> float32 cast happens during the strided copy (no per-tile PIL crops or
    tensors); then ``x/255``, ``-mean``, ``/std`` in that order, as ``ToTensor`` +
    ``Normalize`` do. Done one tile at a time so the four passes stay in cache (~2x faster
    than whole-grid passes at 448 px).
    """
    tiles = rgb.reshape(rows, size, cols, size, 3).transpose(0, 2, 4, 1, 3)
    grid = out.view(rows, cols, 3, size, size)
    for r in range(rows):
        for c in range(cols):
            tile = grid[r, c]
            np.copyto(tile.numpy(), tiles[r, c], casting="unsafe")
            tile.div_(255).sub_(_MEAN).div_(_STD)


def image_to_tiles(
    image: Image.Image,
    *,
    image_size: int,
    max_num: int,
    min_num: int = 1,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Pixel tiles ``float32[N, 3, S, S]`` (ImageNet-normalised) exactly as the model trains on them.

    Equal to ``dynamic_preprocess`` followed by the model card's ``build_transform`` on each
    tile, in one resize and four in-cache passes per tile instead of N crops and N transforms.
    """
    cols, rows = choose_grid(*image.size, min_num=min_num, max_num=max_num, image_size=image_size)
    blocks = cols * rows
    with_thumb = use_thumbnail and blocks != 1
    out = torch.empty(blocks + int(with_thumb), 3, image_size, image_size, dtype=torch.float32)
    grid = image.resize((cols * image_size, rows * image_size), _BICUBIC)
    _normalise_into(out[:blocks], _rgb_array(grid), rows, cols, image_size)
    if with_thumb:
        thumb = image.resize((image_size, image_size), _BICUBIC)
        _normalise_into(out[blocks:], _rgb_array(thumb), 1, 1, image_size)
    return out


def frames_to_tiles(frames: list[Image.Image], image_size: int) -> torch.Tensor:
    """One tile per video frame: each frame resized to SxS (bicubic) and normalised, ``[F, 3, S, S]``.

    This is ``dynamic_preprocess(frame, max_num=1)`` + ``build_transform``, the model card's
    ``load_video`` path.
    """
    out = torch.empty(len(frames), 3, image_size, image_size, dtype=torch.float32)
    for i, frame in enumerate(frames):
        tile = frame.resize((image_size, image_size), _BICUBIC)
        _normalise_into(out[i : i + 1], _rgb_array(tile), 1, 1, image_size)
    return out
