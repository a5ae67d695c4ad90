"""One SFT sample from one jsonl record: read -> validate -> load media -> augment -> tile -> tokenize.

A record is a conversation or, for pre-training, a ``{"text": ...}`` document; what it is
supervised on follows its dataset's ``supervision`` (default: text records every text token,
conversations the assistant turns).

`SampleProcessor` is the whole per-sample path as one call that either returns a sample dict or
raises `SkipSample`; `iter_samples` walks the shuffled index, counts the skips and yields the rest.
Every random choice for the sample at index position k comes from an RNG seeded by (seed, k), so
a run resumed at position k sees exactly the augmentations the interrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING

from vlmtune.data.conversation import (
    DEFAULT_SYSTEM_PROMPT,
    Record,
    TextRecord,
    is_text_record,
    tokenize_conversation,
    tokenize_text,
    validate_record,
    validate_text_record,
)
from vlmtune.data.media import (
    EmbeddedImage,
    MediaError,
    jpeg_compress,
    load_image,
    load_video_frames,
    resolve_media,
)
from vlmtune.data.meta import DatasetSpec, record_source
from vlmtune.data.report import SkipReport, SkipSample
from vlmtune.data.stream import Skipped
from vlmtune.data.tiling import choose_grid, frames_to_tiles, image_to_tiles


@dataclass
class DataConfig:
    """The ``data`` config group: where the data is and how a sample is built from it."""

    #: InternVL meta JSON ({name: {root, annotation, repeat_time, max_dynamic_patch, data_augment, length}}).
    meta_path: str = MISSING
    #: Longest tokenised sample (image tokens included); longer samples are dropped and counted, not truncated.
    max_length: int | None = 8192
    #: Tile side in pixels (448 for InternVL3; the model config's vision image size).
    image_size: int = 448
    #: Most tiles per image (thumbnail excluded), InternVL's default; a meta entry's value wins.
    max_dynamic_patch: int = 12
    #: Fewest tiles per image; a meta entry's ``min_dynamic_patch`` wins.
    min_dynamic_patch: int = 1
    #: Add a whole-image thumbnail tile when an image is split into several tiles (InternVL3 does).
    use_thumbnail: bool = True
    #: Frames sampled per video: between these bounds (InternVL's video defaults are 8..32).
    min_num_frames: int = 8
    max_num_frames: int = 32
    #: Seconds a video's decode may take before it is abandoned and the sample skipped
    #: (``video_decode_error``): decord can hang in native code (decord issue #373), which would stall
    #: a DataLoader worker and every rank with it. Decoded in a child process that is killed and
    #: replaced when it overruns (data/media.py `VideoDecoder`); 0: in-process, no limit.
    video_decode_timeout_s: float = 60.0
    #: Random JPEG re-compression quality, applied when a dataset has ``data_augment: true`` (InternVL2.5).
    jpeg_quality_range: tuple[int, int] = (75, 100)
    #: System message for samples without one; InternVL3's default. None: no system turn.
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    #: Seeds the sample order (repeat subsets, shuffle) and every sample's augmentation RNG.
    seed: int = 0


def sample_settings(cfg: DataConfig) -> dict[str, Any]:
    """The settings that decide how a record becomes tokens and tiles (everything but where the data
    is and the seed): saved with an export so evaluation prompts the model as training did, and part
    of the key of a precomputed reference cache."""
    keys = (
        "max_length",
        "image_size",
        "max_dynamic_patch",
        "min_dynamic_patch",
        "use_thumbnail",
        "min_num_frames",
        "max_num_frames",
        "jpeg_quality_range",
        "system_prompt",
    )
    return {k: getattr(cfg, k) for k in keys}


def sample_rng(seed: int, position: int, epoch: int = 0) -> random.Random:
    """The augmentation RNG of the sample at ``position`` of epoch ``epoch``: a pure function of the three."""
    return random.Random(f"vlmtune:{seed}:{epoch}:{position}")


@dataclass
class Media:
    """A record's media as the model sees it: the tiles and the ``<IMG_CONTEXT>`` count of each part.

    ``image_tokens[i]``: context tokens of image i; ``frame_tokens``: one entry per video frame
    (``None`` for a sample without video), the two arguments `tokenize_conversation` takes.
    """

    pixel_values: torch.Tensor
    image_tokens: list[int]
    frame_tokens: list[int] | None

    @property
    def num_images(self) -> int:
        """Images, or video frames for a video sample."""
        return len(self.image_tokens) if self.frame_tokens is None else len(self.frame_tokens)


def tile_limits(cfg: DataConfig, spec: DatasetSpec, num_images: int) -> tuple[int, int]:
    """(min, max) tiles per image: the meta entry's values win; several images share the
    budget as in InternVL (``max(1, max_dynamic_patch // num_images)``)."""
    max_num = spec.max_dynamic_patch if spec.max_dynamic_patch is not None else cfg.max_dynamic_patch
    min_num = spec.min_dynamic_patch if spec.min_dynamic_patch is not None else cfg.min_dynamic_patch
    if num_images > 1:
        max_num = max(1, max_num // num_images)
    return min(min_num, max_num), max_num


def num_image_tiles(
    width: int, height: int, *, min_num: int, max_num: int, image_size: int, use_thumbnail: bool
) -> int:
    """Tiles `image_to_tiles` makes of a ``width`` x ``height`` image: the grid, plus the thumbnail
    when the grid has more than one tile. Known from the image header alone, without decoding."""
    cols, rows = choose_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    return cols * rows + int(use_thumbnail and cols * rows != 1)


def image_size_of(path: Path | EmbeddedImage) -> tuple[int, int]:
    """(width, height) from the file header (PIL reads no pixels); raises SkipSample like `load_image`."""
    import io

    from PIL import Image

    embedded = isinstance(path, EmbeddedImage)
    if not embedded and not path.is_file():
        raise SkipSample("missing_image", f"{path}: no such file")
    try:
        with Image.open(io.BytesIO(path.data) if embedded else path) as image:
            width, height = image.size
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... on bad headers
        raise SkipSample("corrupt_image", f"{path}: {type(e).__name__}: {e}") from e
    if width == 0 or height == 0:
        raise SkipSample("zero_size_image", f"{path}: {width}x{height}")
    return width, height


def load_media(
    cfg: DataConfig,
    spec: DatasetSpec,
    images: Sequence[str],
    video: str | None,
    tokens_per_tile: int,
    rng: random.Random,
    training: bool,
) -> Media:
    """Load, augment (``data_augment`` and training only) and tile a record's images or video.

    The one media path of every sample kind (SFT conversations, preference pairs), so a pair's
    pixels are exactly what the same record would give as an SFT sample. Raises SkipSample with
    the `MediaError`'s reason.
    """
    augment = spec.data_augment and training
    quality = tuple(cfg.jpeg_quality_range)
    size = cfg.image_size
    tiles: list[torch.Tensor] = []
    image_tokens: list[int] = []
    frame_tokens: list[int] | None = None
    try:
        if video is not None:
            frames = load_video_frames(
                spec.root / video,
                min_num_frames=cfg.min_num_frames,
                max_num_frames=cfg.max_num_frames,
                training=training,
                rng=rng,
                timeout_s=cfg.video_decode_timeout_s,
            )
            if augment:
                frames = [jpeg_compress(f, rng, quality) for f in frames]
            tiles.append(frames_to_tiles(frames, size))
            frame_tokens = [tokens_per_tile] * len(frames)
        min_num, max_num = tile_limits(cfg, spec, len(images))
        for path in images:
            image = load_image(resolve_media(spec.root, path))
            if augment:
                image = jpeg_compress(image, rng, quality)
            t = image_to_tiles(
                image, image_size=size, max_num=max_num, min_num=min_num, use_thumbnail=cfg.use_thumbnail
            )
            tiles.append(t)
            image_tokens.append(t.shape[0] * tokens_per_tile)
    except MediaError as e:
        raise SkipSample(e.reason, e.detail) from e
    pixel_values = torch.cat(tiles) if tiles else torch.zeros(0, 3, size, size)
    return Media(pixel_values, image_tokens, frame_tokens)


class SampleProcessor:
    """Turns (dataset, record index) into a processed SFT sample dict, or raises SkipSample.

    The dict holds ``input_ids``/``labels`` (LongTensor[L]), ``pixel_values`` (float[T, 3, S, S],
    T = 0 for pure text), ``num_tiles``, ``num_images`` (images or video frames), ``dataset``,
    ``source`` (``"file:line"``) and ``kind`` (``"text"`` for a text record, else ``"conversation"``).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, tokens_per_tile: int) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile

    def tile_limits(self, spec: DatasetSpec, num_images: int) -> tuple[int, int]:
        """(min, max) tiles per image for ``spec`` (see `tile_limits`)."""
        return tile_limits(self.cfg, spec, num_images)

    def read(self, spec: DatasetSpec, line_no: int) -> tuple[Record | TextRecord, str]:
        """The validated record and its supervision ("all" | "assistant"); raises SkipSample."""
        raw = record_source(spec).read(line_no)
        if is_text_record(raw):
            if spec.supervision == "assistant":
                raise SkipSample(
                    "missing_field",
                    f"conversations (dataset {spec.name!r} has supervision 'assistant'; a text record has "
                    "no assistant turn: set 'supervision': 'all' or drop the key)",
                )
            return validate_text_record(raw), "all"
        return validate_record(raw), spec.supervision or "assistant"

    def tokenize(
        self,
        record: Record | TextRecord,
        supervision: str,
        image_tokens: list[int],
        frame_tokens: list[int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(record, TextRecord):
            return tokenize_text(
                record.text,
                self.tokenizer,
                image_tokens,
                max_length=self.cfg.max_length,
                frame_token_counts=frame_tokens,
            )
        return tokenize_conversation(
            record.conversations,
            self.tokenizer,
            image_tokens,
            system_prompt=self.cfg.system_prompt,
            max_length=self.cfg.max_length,
            frame_token_counts=frame_tokens,
            supervision=supervision,
        )

    def __call__(self, spec: DatasetSpec, line_no: int, rng: random.Random, training: bool) -> dict[str, Any]:
        source = record_source(spec).source(line_no)
        record, supervision = self.read(spec, line_no)
        media = load_media(self.cfg, spec, record.images, record.video, self.tokens_per_tile, rng, training)
        input_ids, labels = self.tokenize(record, supervision, media.image_tokens, media.frame_tokens)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": media.pixel_values,
            "num_tiles": int(media.pixel_values.shape[0]),
            "num_images": media.num_images,
            "dataset": spec.name,
            "source": source,
            "kind": "text" if isinstance(record, TextRecord) else "conversation",
        }

    def count_tokens(self, spec: DatasetSpec, line_no: int) -> int:
        """The sample's length in tokens (text + image tokens) without decoding any pixels.

        Image tiles come from the header's size through the tiling maths, so this equals
        ``len(self(...)["input_ids"])`` for image and text records. A video's frame count is drawn
        at load time; it is taken as the middle of ``[min_num_frames, max_num_frames]`` here.
        Raises SkipSample for bad records, missing images and unreadable headers (pixel data that
        is corrupt past the header is only found by processing).
        """
        record, supervision = self.read(spec, line_no)
        image_tokens: list[int] = []
        min_num, max_num = self.tile_limits(spec, len(record.images))
        for path in record.images:
            width, height = image_size_of(resolve_media(spec.root, path))
            tiles = num_image_tiles(
                width,
                height,
                min_num=min_num,
                max_num=max_num,
                image_size=self.cfg.image_size,
                use_thumbnail=self.cfg.use_thumbnail,
            )
            image_tokens.append(tiles * self.tokens_per_tile)
        frame_tokens = None
        if record.video is not None:
            frames = (self.cfg.min_num_frames + self.cfg.max_num_frames) // 2
            frame_tokens = [self.tokens_per_tile] * frames
        input_ids, _ = self.tokenize(record, supervision, image_tokens, frame_tokens)
        return len(input_ids)


def iter_samples(
    processor: SampleProcessor,
    specs: Sequence[DatasetSpec],
    index: Sequence[tuple[int, int]],
    start: int,
    report: SkipReport,
    training: bool,
    epoch: int = 0,
) -> Iterator[dict[str, Any]]:
    """Processed samples from ``index[start:]``; bad ones are recorded in ``report`` and skipped.

    Each yielded sample carries ``index``: its position in ``index``, so a consumer that saves
    ``index + 1`` resumes right after it with the same samples and augmentations.
    """
    for position in range(start, len(index)):
        sample = process_position(processor, specs, index, position, processor.cfg.seed, epoch, training)
        if isinstance(sample, Skipped):
            report.skip(sample.dataset, sample.source, sample.reason, sample.detail)
            continue
        sample["index"] = position
        yield sample


def process_position(
    processor: Any,
    specs: Sequence[DatasetSpec],
    index: Sequence[tuple[int, int]],
    position: int,
    seed: int,
    epoch: int,
    training: bool,
) -> dict[str, Any] | Skipped:
    """The sample at ``index[position]``, or why it left the pipeline (with its file:line).

    Its augmentation RNG is seeded from (data seed, position, epoch) alone, so the same position gives
    the same sample in any process: what lets workers run ahead and a resumed run rebuild its buffer.
    """
    ds, line = index[position]
    spec = specs[ds]
    try:
        return processor(spec, line, sample_rng(seed, position, epoch), training)
    except SkipSample as e:
        return Skipped(spec.name, record_source(spec).source(line), e.reason, e.detail)
