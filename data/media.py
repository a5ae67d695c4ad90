"""Reading media for training: images (PIL), video frames (decord), random JPEG re-encoding.

Every failure is a ``MediaError`` with a short machine-readable ``reason``, so the dataset can
skip the sample and count it per reason instead of crashing a multi-day run on one bad file.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MEDIA_REASONS = ("missing_image", "corrupt_image", "zero_size_image", "video_decode_error", "missing_video")


class MediaError(Exception):
    """A media file that cannot be used; ``reason`` is one of ``MEDIA_REASONS``, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in MEDIA_REASONS:
            raise ValueError(f"unknown MediaError reason {reason!r}; expected one of {MEDIA_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------- images


def _header_has_zero_size(path: Path) -> bool:
    """True if a PNG/GIF/BMP header declares a 0 width or height.

    PIL refuses such files with the same ``UnidentifiedImageError`` as garbage, so the header
    is read here to report the more useful reason.
    """
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        width, height = int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    elif head[:2] == b"BM" and len(head) >= 26:
        width, height = (
            int.from_bytes(head[18:22], "little", signed=True),
            int.from_bytes(head[22:26], "little", signed=True),
        )
    else:
        return False
    return width == 0 or height == 0


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB image, fully decoded so a truncated file fails here and not in a worker later."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(
            "missing_image", f"{path}: no such file (check the meta file's root + the jsonl image path)"
        )
    try:
        with Image.open(path) as img:
            if img.width == 0 or img.height == 0:
                raise MediaError("zero_size_image", f"{path}: size {img.width}x{img.height}")
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError as e:
        if _header_has_zero_size(path):
            raise MediaError("zero_size_image", f"{path}: header declares a 0 width or height") from e
        raise MediaError("corrupt_image", f"{path}: not a readable image ({e})") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError("corrupt_image", f"{path}: decoding failed ({type(e).__name__}: {e})") from e


def draw_jpeg_quality(rng: random.Random, quality_range: tuple[int, int] = (75, 100)) -> int:
    """A JPEG quality drawn uniformly from the inclusive range, as InternVL's 26 qualities 75..100."""
    low, high = quality_range
    if not 1 <= low <= high <= 100:
        raise ValueError(f"quality_range must satisfy 1 <= low <= high <= 100, got {quality_range}")
    return rng.randint(low, high)


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    """``image`` encoded as JPEG at ``quality`` in memory and decoded back (RGB)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def jpeg_compress(
    image: Image.Image, rng: random.Random, quality_range: tuple[int, int] = (75, 100)
) -> Image.Image:
    """InternVL's random JPEG augmentation: re-encode at a quality drawn with ``rng``.

    Training images are often screenshots or PNGs while test-time images are JPEGs; seeing
    compression artefacts in training makes the model robust to them (InternVL
    ``build_transform(is_train=True)``). Deterministic for a given ``rng`` state.
    """
    return jpeg_roundtrip(image, draw_jpeg_quality(rng, quality_range))


# ----------------------------------------------------------------------------------------- video


def sample_frame_indices(
    num_video_frames: int, num_segments: int, *, training: bool, rng: random.Random
) -> list[int]:
    """Frame indices: the video cut into equal segments, one frame from each.

    InternVL's ``get_frame_indices`` ("rand" when training, "middle" otherwise): segment
    bounds are ``np.linspace(0, n, k + 1)`` truncated to ints; training takes a random frame
    of each segment, evaluation its middle ``(start + last) // 2``. Two deliberate
    differences: the random frame may be any frame of the segment (InternVL's
    ``range(start, last)`` never takes the last one and falls back to an unsorted-by-segment
    random subset when a segment has one frame), and a video shorter than ``num_segments``
    gives one frame per video frame instead of repeating the last frame to pad.
    """
    if num_video_frames < 1 or num_segments < 1:
        raise ValueError(
            f"need at least one video frame and one segment, got {num_video_frames}, {num_segments}"
        )
    count = min(num_segments, num_video_frames)
    bounds = np.linspace(0, num_video_frames, count + 1).astype(int).tolist()
    segments = list(zip(bounds[:-1], bounds[1:]))  # [start, end), never empty since count <= frames
    if training:
        return [rng.randint(start, end - 1) for start, end in segments]
    return [(start + end - 1) // 2 for start, end in segments]


def load_video_frames(
    path: str | Path,
    *,
    min_num_frames: int = 8,
    max_num_frames: int = 32,
    training: bool,
    rng: random.Random,
) -> list[Image.Image]:
    """Decode a few frames of a video with decord, as RGB PIL images.

    Training draws the number of frames uniformly in ``[min_num_frames, max_num_frames]``
    (InternVL's ``read_frames_decord``) so the model sees varied frame counts; evaluation
    uses ``max_num_frames`` so it is deterministic. Both are capped by the video length.
    """
    if not 1 <= min_num_frames <= max_num_frames:
        raise ValueError(
            f"need 1 <= min_num_frames <= max_num_frames, got {min_num_frames}, {max_num_frames}"
        )
    path = Path(path)
    if not path.is_file():
        raise MediaError(
            "missing_video", f"{path}: no such file (check the meta file's root + the jsonl video path)"
        )
    from decord import VideoReader  # imported lazily: decord pulls in ffmpeg, unused by image-only runs

    try:
        reader = VideoReader(str(path), num_threads=1)
        num_video_frames = len(reader)
        if num_video_frames == 0:
            raise MediaError("video_decode_error", f"{path}: the video has no frames")
        num_segments = rng.randint(min_num_frames, max_num_frames) if training else max_num_frames
        indices = sample_frame_indices(num_video_frames, num_segments, training=training, rng=rng)
        frames = reader.get_batch(indices).asnumpy()
    except MediaError:
        raise
    except Exception as e:  # decord raises DECORDError, RuntimeError, ... depending on where ffmpeg fails
        raise MediaError("video_decode_error", f"{path}: decord failed ({type(e).__name__}: {e})") from e
    return [Image.fromarray(frame) for frame in frames]
