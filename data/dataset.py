"""One SFT sample from one jsonl record: read -> validate -> load media -> augment -> tile -> tokenize.

`SampleProcessor` is the whole per-sample path as one call that either returns a sample dict or
raises `SkipSample`; `iter_samples` walks the shuffled index, counts the skips and yields the rest.
Every random choice for the sample at index position k comes from an RNG seeded by (seed, k), so
a run resumed at position k sees exactly the augmentations the interrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING

from data.conversation import DEFAULT_SYSTEM_PROMPT, tokenize_conversation, validate_record
from data.media import MediaError, jpeg_compress, load_image, load_video_frames
from data.meta import DatasetSpec, jsonl_file
from data.report import SkipReport, SkipSample
from data.tiling import frames_to_tiles, image_to_tiles


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
    #: Random JPEG re-compression quality, applied when a dataset has ``data_augment: true`` (InternVL2.5).
    jpeg_quality_range: tuple[int, int] = (75, 100)
    #: System message for samples without one; InternVL3's default. None: no system turn.
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    #: Seeds the sample order (repeat subsets, shuffle) and every sample's augmentation RNG.
    seed: int = 0


def sample_rng(seed: int, position: int, epoch: int = 0) -> random.Random:
    """The augmentation RNG of the sample at ``position`` of epoch ``epoch``: a pure function of the three."""
    return random.Random(f"vlmtune:{seed}:{epoch}:{position}")


class SampleProcessor:
    """Turns (dataset, record index) into a processed SFT sample dict, or raises SkipSample.

    The dict holds ``input_ids``/``labels`` (LongTensor[L]), ``pixel_values`` (float[T, 3, S, S],
    T = 0 for pure text), ``num_tiles``, ``num_images`` (images or video frames), ``dataset`` and
    ``source`` (``"file:line"``).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, tokens_per_tile: int) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile

    def tile_limits(self, spec: DatasetSpec, num_images: int) -> tuple[int, int]:
        """(min, max) tiles per image: the meta entry's values win; several images share the
        budget as in InternVL (``max(1, max_dynamic_patch // num_images)``)."""
        max_num = spec.max_dynamic_patch if spec.max_dynamic_patch is not None else self.cfg.max_dynamic_patch
        min_num = spec.min_dynamic_patch if spec.min_dynamic_patch is not None else self.cfg.min_dynamic_patch
        if num_images > 1:
            max_num = max(1, max_num // num_images)
        return min(min_num, max_num), max_num

    def __call__(self, spec: DatasetSpec, line_no: int, rng: random.Random, training: bool) -> dict[str, Any]:
        jf = jsonl_file(spec.annotation)
        source = jf.source(line_no)
        record = validate_record(jf.read(line_no))
        augment = spec.data_augment and training
        quality = tuple(self.cfg.jpeg_quality_range)
        size = self.cfg.image_size

        tiles: list[torch.Tensor] = []
        image_tokens: list[int] = []
        frame_tokens: list[int] | None = None
        try:
            if record.video is not None:
                frames = load_video_frames(
                    spec.root / record.video,
                    min_num_frames=self.cfg.min_num_frames,
                    max_num_frames=self.cfg.max_num_frames,
                    training=training,
                    rng=rng,
                )
                if augment:
                    frames = [jpeg_compress(f, rng, quality) for f in frames]
                tiles.append(frames_to_tiles(frames, size))
                frame_tokens = [self.tokens_per_tile] * len(frames)
            min_num, max_num = self.tile_limits(spec, len(record.images))
            for path in record.images:
                image = load_image(spec.root / path)
                if augment:
                    image = jpeg_compress(image, rng, quality)
                t = image_to_tiles(
                    image,
                    image_size=size,
                    max_num=max_num,
                    min_num=min_num,
                    use_thumbnail=self.cfg.use_thumbnail,
                )
                tiles.append(t)
                image_tokens.append(t.shape[0] * self.tokens_per_tile)
        except MediaError as e:
            raise SkipSample(e.reason, e.detail) from e

        input_ids, labels = tokenize_conversation(
            record.conversations,
            self.tokenizer,
            image_tokens,
            system_prompt=self.cfg.system_prompt,
            max_length=self.cfg.max_length,
            frame_token_counts=frame_tokens,
        )
        pixel_values = torch.cat(tiles) if tiles else torch.zeros(0, 3, size, size)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "num_tiles": int(pixel_values.shape[0]),
            "num_images": len(record.images) if frame_tokens is None else len(frame_tokens),
            "dataset": spec.name,
            "source": source,
        }


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
        ds, line = index[position]
        spec = specs[ds]
        try:
            sample = processor(spec, line, sample_rng(processor.cfg.seed, position, epoch), training)
        except SkipSample as e:
            report.skip(spec.name, jsonl_file(spec.annotation).source(line), e.reason, e.detail)
            continue
        sample["index"] = position
        yield sample
