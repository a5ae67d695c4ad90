"""data.media: image loading errors, JPEG augmentation, frame sampling and decord decoding."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlmtune.data import media
from vlmtune.data.media import (
    MediaError,
    draw_jpeg_quality,
    jpeg_compress,
    jpeg_roundtrip,
    load_image,
    load_video_frames,
    sample_frame_indices,
)

# ---------------------------------------------------------------------------------------- images


def _noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_with_size(width: int, height: int) -> bytes:
    """A hand-made PNG (PIL refuses to write a 0-size image): signature, IHDR, empty IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_load_image_returns_rgb_with_the_file_pixels(tmp_path):
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (30, 20)
    assert np.array_equal(np.asarray(img), np.asarray(rgba)[..., :3])


def test_load_image_missing(tmp_path):
    with pytest.raises(MediaError) as err:
        load_image(tmp_path / "nope.jpg")
    assert err.value.reason == "missing_image" and "nope.jpg" in str(err.value)


def test_load_image_garbage_is_corrupt(tmp_path):
    (tmp_path / "g.jpg").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(MediaError) as err:
        load_image(tmp_path / "g.jpg")
    assert err.value.reason == "corrupt_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_load_image_truncated_is_corrupt(tmp_path, fmt):
    buffer = io.BytesIO()
    _noise(200, 150).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"t.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert Image.open(path).size == (200, 150)  # the header alone looks fine: only a full decode finds it
    with pytest.raises(MediaError) as err:
        load_image(path)
    assert err.value.reason == "corrupt_image"


def test_handmade_png_with_real_size_is_corrupt_not_zero_size(tmp_path):
    """Control for the next test: the same hand-made bytes with a non-zero size get the other reason."""
    path = tmp_path / "ok.png"
    path.write_bytes(_png_with_size(3, 2))
    with pytest.raises(MediaError) as err:  # empty IDAT: it is corrupt, but NOT zero-size
        load_image(path)
    assert err.value.reason == "corrupt_image"


@pytest.mark.parametrize("size", [(0, 5), (7, 0)])
def test_load_image_zero_size_png_header(tmp_path, size):
    path = tmp_path / "zero.png"
    path.write_bytes(_png_with_size(*size))
    with pytest.raises(MediaError) as err:
        load_image(path)
    assert err.value.reason == "zero_size_image"


def test_load_image_zero_size_when_pil_opens_it(tmp_path, monkeypatch):
    """If a PIL plugin ever hands back a 0-size image, it is reported as such (PIL itself refuses them today)."""
    path = tmp_path / "z.png"
    _noise().save(path)
    monkeypatch.setattr(media.Image, "open", lambda p: Image.new("RGB", (0, 4)))
    with pytest.raises(MediaError) as err:
        load_image(path)
    assert err.value.reason == "zero_size_image"


def test_media_error_rejects_unknown_reason():
    with pytest.raises(ValueError):
        MediaError("oops")


# ------------------------------------------------------------------------------------------ jpeg


def test_draw_jpeg_quality_in_range_and_uniform_enough():
    rng = random.Random(0)
    draws = [draw_jpeg_quality(rng, (75, 100)) for _ in range(2000)]
    assert min(draws) == 75 and max(draws) == 100  # both ends reachable (inclusive, like InternVL's 75..100)
    assert set(draws) == set(range(75, 101))
    assert [draw_jpeg_quality(random.Random(s), (90, 90)) for s in range(5)] == [90] * 5
    with pytest.raises(ValueError):
        draw_jpeg_quality(rng, (80, 101))


def test_jpeg_compress_deterministic_and_lossy():
    image = _noise()
    a = jpeg_compress(image, random.Random(7))
    b = jpeg_compress(image, random.Random(7))
    assert a.mode == "RGB" and a.size == image.size
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != image.tobytes()  # noise never survives JPEG unchanged, even at quality 100
    # The output is exactly the round trip at the quality the same seed draws.
    quality = draw_jpeg_quality(random.Random(7), (75, 100))
    assert a.tobytes() == jpeg_roundtrip(image, quality).tobytes()


def test_jpeg_compress_different_seeds_give_different_qualities():
    image = _noise()
    qualities = {draw_jpeg_quality(random.Random(s)) for s in range(10)}
    assert len(qualities) > 1
    outputs = {jpeg_compress(image, random.Random(s)).tobytes() for s in range(10)}
    assert len(outputs) == len(qualities)  # one distinct image per distinct quality
    # Lower quality loses more: quality 75 is further from the original than quality 100.
    original = np.asarray(image, dtype=np.float64)
    err75 = np.abs(np.asarray(jpeg_roundtrip(image, 75), dtype=np.float64) - original).mean()
    err100 = np.abs(np.asarray(jpeg_roundtrip(image, 100), dtype=np.float64) - original).mean()
    assert err75 > err100


# ----------------------------------------------------------------------------- frame indices


def test_sample_frame_indices_eval_hand_computed():
    # 40 frames, 8 segments: bounds 0,5,10,...,40 -> middles (s + e - 1) // 2.
    assert sample_frame_indices(40, 8, training=False, rng=random.Random(0)) == [2, 7, 12, 17, 22, 27, 32, 37]
    # 10 frames, 4 segments: linspace(0, 10, 5) = 0, 2.5, 5, 7.5, 10 -> bounds 0, 2, 5, 7, 10
    # -> segments [0,1] [2,4] [5,6] [7,9] -> middles 0, 3, 5, 8.
    assert sample_frame_indices(10, 4, training=False, rng=random.Random(0)) == [0, 3, 5, 8]
    # Shorter than the request: one frame per video frame, no padding.
    assert sample_frame_indices(3, 8, training=False, rng=random.Random(0)) == [0, 1, 2]


def test_sample_frame_indices_training_stays_in_segments():
    rng = random.Random(3)
    seen_first, seen_last = False, False
    for _ in range(300):
        n, k = rng.randint(1, 200), rng.randint(1, 40)
        indices = sample_frame_indices(n, k, training=True, rng=rng)
        count = min(n, k)
        assert len(indices) == count
        bounds = np.linspace(0, n, count + 1).astype(int)
        for i, index in enumerate(indices):
            assert bounds[i] <= index < bounds[i + 1]
            seen_first |= index == bounds[i]
            seen_last |= index == bounds[i + 1] - 1
        assert indices == sorted(indices)
    assert seen_first and seen_last  # the whole segment is reachable, both ends included


def test_sample_frame_indices_training_is_seeded():
    a = sample_frame_indices(1000, 16, training=True, rng=random.Random(5))
    b = sample_frame_indices(1000, 16, training=True, rng=random.Random(5))
    c = sample_frame_indices(1000, 16, training=True, rng=random.Random(6))
    assert a == b and a != c


# ------------------------------------------------------------------------------------------ video

NUM_FRAMES = 40


def _colour(k: int) -> tuple[int, int, int]:
    """Frame k's fill: a grey level 6 apart from its neighbours; lossless H.264 comes back within +-1."""
    grey = 10 + 6 * k
    return (grey, grey, grey)


PALETTE = np.array([_colour(k) for k in range(NUM_FRAMES)], dtype=np.float64)


@pytest.fixture(scope="module")
def colour_video(tmp_path_factory):
    """40 frames of 32x32, frame k a flat _colour(k), H.264 at qp 0 (lossless but for RGB<->YUV rounding)."""
    path = tmp_path_factory.mktemp("video") / "colours.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"qp": "0"}
        for k in range(NUM_FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), _colour(k), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _frame_ids(frames: list[Image.Image]) -> list[int]:
    ids = []
    for frame in frames:
        assert frame.mode == "RGB" and frame.size == (32, 32)
        distance = np.abs(PALETTE - np.asarray(frame, dtype=np.float64).reshape(-1, 3).mean(0)).sum(1)
        assert distance.min() < 9, "frame colour matches no encoded frame"  # half the L1 spacing (18)
        ids.append(int(distance.argmin()))
    return ids


def test_video_eval_gives_segment_middles(colour_video):
    frames = load_video_frames(
        colour_video, min_num_frames=4, max_num_frames=8, training=False, rng=random.Random(0)
    )
    assert _frame_ids(frames) == [2, 7, 12, 17, 22, 27, 32, 37]


def test_video_eval_capped_by_length(colour_video):
    frames = load_video_frames(
        colour_video, min_num_frames=8, max_num_frames=64, training=False, rng=random.Random(0)
    )
    assert _frame_ids(frames) == list(range(NUM_FRAMES))


def test_video_training_counts_and_segments(colour_video):
    counts = set()
    for seed in range(6):
        frames = load_video_frames(
            colour_video, min_num_frames=4, max_num_frames=12, training=True, rng=random.Random(seed)
        )
        ids = _frame_ids(frames)
        assert 4 <= len(ids) <= 12
        counts.add(len(ids))
        bounds = np.linspace(0, NUM_FRAMES, len(ids) + 1).astype(int)
        assert all(bounds[i] <= index < bounds[i + 1] for i, index in enumerate(ids))
        # Same seed -> same count and the same frames as the pure index function draws.
        rng = random.Random(seed)
        expected = sample_frame_indices(NUM_FRAMES, rng.randint(4, 12), training=True, rng=rng)
        assert ids == expected
    assert len(counts) > 1


def test_video_missing_and_garbage(tmp_path):
    with pytest.raises(MediaError) as err:
        load_video_frames(tmp_path / "absent.mp4", training=False, rng=random.Random(0))
    assert err.value.reason == "missing_video"
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError) as err:
        load_video_frames(garbage, training=True, rng=random.Random(0))
    assert err.value.reason == "video_decode_error" and "garbage.mp4" in str(err.value)


# ------------------------------------------------------------------------- video under a time limit


def hanging_open(path: str):
    """A stand-in opener for the decoder process: decord's reader, except that a file named hang*
    never returns from get_batch (as decord issue #373's; it leaves ``<path>.hung`` to say it is
    stuck) and one named crash* kills its process."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("crash"):
        os._exit(3)
    reader = media.open_decord(path)
    if not name.startswith("hang"):
        return reader

    class Hangs:
        def __len__(self) -> int:
            return len(reader)

        def get_batch(self, indices):
            open(path + ".hung", "w").close()
            threading.Event().wait()  # blocks forever; only SIGKILL of the process ends it

    return Hangs()


HANGING_OPENER = f"{__name__}:hanging_open"


def _frames_equal(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) > 0 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("training", [True, False])
def test_decoder_process_frames_and_rng_equal_in_process_decode(colour_video, training):
    for seed in range(3):
        rng_child, rng_here = random.Random(seed), random.Random(seed)
        kwargs = dict(min_num_frames=3, max_num_frames=9, training=training)
        child = load_video_frames(colour_video, rng=rng_child, timeout_s=10, **kwargs)
        here = load_video_frames(colour_video, rng=rng_here, timeout_s=0, **kwargs)
        assert _frames_equal(child, here)
        assert rng_child.getstate() == rng_here.getstate()  # the augmentations after it stay the same
    assert media._decoder is not None and media._decoder.alive


def test_hung_decode_is_abandoned_at_the_limit_and_the_next_video_decodes(
    colour_video, tmp_path, monkeypatch
):
    monkeypatch.setattr(media, "VIDEO_OPENER", HANGING_OPENER)
    (tmp_path / "hang.mp4").write_bytes(colour_video.read_bytes())
    (tmp_path / "crash.mp4").write_bytes(colour_video.read_bytes())
    kwargs = dict(min_num_frames=4, max_num_frames=8, training=False, rng=random.Random(0))
    load_video_frames(colour_video, timeout_s=1.5, **kwargs)  # a decoder is up (its start is not timed)
    hung_child = media._decoder.process
    start = time.monotonic()
    with pytest.raises(MediaError) as err:
        load_video_frames(tmp_path / "hang.mp4", timeout_s=1.5, **kwargs)
    elapsed = time.monotonic() - start
    assert err.value.reason == "video_decode_error" and "timed out after 1.5 s" in err.value.detail
    assert "hang.mp4" in err.value.detail
    assert 1.5 <= elapsed < 4.0  # the limit, give or take a loaded machine
    assert hung_child.returncode == -signal.SIGKILL  # killed and reaped, not left hanging
    frames = load_video_frames(colour_video, timeout_s=1.5, **kwargs)
    assert media._decoder.process.pid != hung_child.pid  # a fresh decoder
    assert _frames_equal(frames, load_video_frames(colour_video, timeout_s=0, **kwargs))
    with pytest.raises(MediaError, match=r"decoder process died \(exit code 3\)"):
        load_video_frames(tmp_path / "crash.mp4", timeout_s=5, **kwargs)
    assert _frames_equal(load_video_frames(colour_video, timeout_s=5, **kwargs), frames)


def test_a_hung_video_sample_is_skipped_and_counted(colour_video, tmp_path, monkeypatch, tok):
    """Through the sample path: data.video_decode_timeout_s reaches the decode, the sample is skipped
    with the reason at its file:line, and the next video sample is processed."""
    import torch  # here, not at the top: the decoder process imports this module for hanging_open

    from vlmtune.data.dataset import DataConfig, SampleProcessor, iter_samples
    from vlmtune.data.meta import load_meta
    from vlmtune.data.report import SkipReport

    monkeypatch.setattr(media, "VIDEO_OPENER", HANGING_OPENER)
    (tmp_path / "hang.mp4").write_bytes(colour_video.read_bytes())
    (tmp_path / "ok.mp4").write_bytes(colour_video.read_bytes())
    turns = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "grey"}]
    lines = [{"video": v, "conversations": turns} for v in ("ok.mp4", "hang.mp4", "ok.mp4")]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "meta.json").write_text(json.dumps({"videos": {"root": ".", "annotation": "v.jsonl"}}))
    cfg = DataConfig(meta_path=str(tmp_path / "meta.json"), image_size=56, min_num_frames=4, max_num_frames=4)
    cfg.video_decode_timeout_s = 1.0
    specs = load_meta(cfg.meta_path)
    report = SkipReport()
    samples = list(
        iter_samples(SampleProcessor(cfg, tok, 16), specs, [(0, 0), (0, 1), (0, 2)], 0, report, False)
    )
    assert [s["index"] for s in samples] == [0, 2] and all(s["num_images"] == 4 for s in samples)
    assert torch.equal(samples[0]["pixel_values"], samples[1]["pixel_values"])
    [entry] = report.entries
    assert (entry["line"], entry["reason"]) == (2, "video_decode_error")
    assert "timed out after 1 s" in entry["detail"]  # the config's limit, not the 60 s default


def _decode_in_forked_child(path: str) -> tuple[int, list[bytes]]:
    frames = load_video_frames(
        path, min_num_frames=4, max_num_frames=4, training=False, rng=random.Random(0), timeout_s=10
    )
    return media._decoder.process.pid, [f.tobytes() for f in frames]


def test_a_forked_worker_starts_its_own_decoder(colour_video):
    """A process forked while this one holds a decoder (a DataLoader worker) must not talk on its socket."""
    import multiprocessing

    kwargs = dict(min_num_frames=4, max_num_frames=4, training=False, rng=random.Random(0))
    mine = load_video_frames(colour_video, timeout_s=10, **kwargs)
    my_decoder = media._decoder.process.pid
    with multiprocessing.get_context("fork").Pool(1) as pool:
        their_decoder, theirs = pool.apply(_decode_in_forked_child, (str(colour_video),))
    assert their_decoder != my_decoder and theirs == [f.tobytes() for f in mine]
    assert media._decoder.process.pid == my_decoder  # ours untouched, and still answering
    assert _frames_equal(load_video_frames(colour_video, timeout_s=10, **kwargs), mine)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie no one reaped is dead too
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_hung_decoder_dies_with_its_parent(colour_video, tmp_path):
    """A worker killed mid-decode (the decoder stuck in native code, reading nothing) leaves no orphan."""
    (tmp_path / "hang.mp4").write_bytes(colour_video.read_bytes())
    code = (
        "import random, sys; from vlmtune.data import media; "
        f"media.VIDEO_OPENER = {HANGING_OPENER!r}; "
        "media._decoder = media.VideoDecoder(media.VIDEO_OPENER); print(media._decoder.process.pid, flush=True); "
        f"media.load_video_frames({str(tmp_path / 'hang.mp4')!r}, training=False, rng=random.Random(0), timeout_s=600)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},  # for hanging_open
    )
    decoder = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while not (tmp_path / "hang.mp4.hung").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "hang.mp4.hung").exists() and not _gone(decoder)  # stuck in get_batch
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while not _gone(decoder) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(decoder)
