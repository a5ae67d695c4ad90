"""Reading media for training: images (PIL), video frames (decord), random JPEG re-encoding.

Every failure is a ``MediaError`` with a short machine-readable ``reason``, so the dataset can
skip the sample and count it per reason instead of crashing a multi-day run on one bad file.

Images come from files or, for Hugging Face datasets that embed them, from bytes carried by an
`EmbeddedImage`. Videos can be decoded under a time limit in a child process (`VideoDecoder`):
decord can deadlock inside native code (decord issue #373), and a hung DataLoader worker stalls
every rank.
"""

from __future__ import annotations

import atexit
import importlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

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


class EmbeddedImage(str):
    """An image stored in a dataset row rather than a file: the string says where it came from
    (``"PATH[split]:row N:column"``, what errors print), ``data`` holds the encoded bytes.

    A ``str`` so that a record holding one has the jsonl records' shape (``image``: a string or a
    list of strings) and goes through the same validation; `resolve_media` keeps it as it is where a
    path would be joined to the dataset's ``root``. The bytes are decoded only when the sample is.
    """

    data: bytes

    def __new__(cls, label: str, data: bytes) -> EmbeddedImage:
        self = super().__new__(cls, label)
        self.data = data
        return self

    def __reduce__(self) -> tuple[Any, tuple[str, bytes]]:
        return EmbeddedImage, (str(self), self.data)


def resolve_media(root: Path, ref: str) -> Path | EmbeddedImage:
    """Where a record's image or video is: ``root / ref`` for a path, the `EmbeddedImage` itself."""
    return ref if isinstance(ref, EmbeddedImage) else root / ref


def _header_has_zero_size(head: bytes) -> bool:
    """True if a PNG/GIF/BMP header (the first 26 bytes) declares a 0 width or height.

    PIL refuses such files with the same ``UnidentifiedImageError`` as garbage, so the header
    is read here to report the more useful reason.
    """
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


def load_image(path: str | Path | EmbeddedImage) -> Image.Image:
    """Open ``path`` (a file, or an `EmbeddedImage`'s bytes) as an RGB image, fully decoded so a
    truncated file fails here and not in a worker later."""
    if isinstance(path, EmbeddedImage):
        source: Any = io.BytesIO(path.data)
        head: bytes | None = path.data[:26]
    else:
        path = Path(path)
        if not path.is_file():
            raise MediaError(
                "missing_image", f"{path}: no such file (check the meta file's root + the jsonl image path)"
            )
        source = path
        head = None
    try:
        with Image.open(source) as img:
            if img.width == 0 or img.height == 0:
                raise MediaError("zero_size_image", f"{path}: size {img.width}x{img.height}")
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError as e:
        if head is None:
            with open(path, "rb") as f:
                head = f.read(26)
        if _header_has_zero_size(head):
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


#: What opens a video, as ``"module:function"`` (importable in the decoder process too): a callable
#: ``path -> reader`` with ``len(reader)`` and ``reader.get_batch(indices).asnumpy()``, decord's API.
VIDEO_OPENER = "vlmtune.data.media:open_decord"


def open_decord(path: str) -> Any:
    """decord's reader on ``path`` (one decode thread: the DataLoader workers are the parallelism)."""
    from decord import VideoReader  # imported lazily: decord pulls in ffmpeg, unused by image-only runs

    return VideoReader(path, num_threads=1)


@lru_cache(maxsize=8)
def _resolve_opener(opener: str) -> Callable[[str], Any]:
    module, _, name = opener.partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def decode_video(
    opener: str,
    path: str,
    *,
    min_num_frames: int,
    max_num_frames: int,
    training: bool,
    rng: random.Random,
) -> np.ndarray:
    """uint8 [frames, H, W, 3] of ``path``: the decode itself, run in this process or a `VideoDecoder`'s.

    Training draws the number of frames uniformly in ``[min_num_frames, max_num_frames]``
    (InternVL's ``read_frames_decord``) so the model sees varied frame counts; evaluation
    uses ``max_num_frames`` so it is deterministic. Both are capped by the video length.
    """
    try:
        reader = _resolve_opener(opener)(path)
        num_video_frames = len(reader)
        if num_video_frames == 0:
            raise MediaError("video_decode_error", f"{path}: the video has no frames")
        num_segments = rng.randint(min_num_frames, max_num_frames) if training else max_num_frames
        indices = sample_frame_indices(num_video_frames, num_segments, training=training, rng=rng)
        return reader.get_batch(indices).asnumpy()
    except MediaError:
        raise
    except Exception as e:  # decord raises DECORDError, RuntimeError, ... depending on where ffmpeg fails
        raise MediaError("video_decode_error", f"{path}: decord failed ({type(e).__name__}: {e})") from e


class VideoDecoder:
    """A child interpreter that runs `decode_video`, killed and replaced when a decode overruns.

    A hung native call holds its thread forever and a thread cannot be killed, so the decode runs in
    another process, which can. The child is a fresh interpreter (``subprocess``: fork + exec), never
    a fork of the caller: DataLoader workers are daemonic and ``multiprocessing`` refuses them
    children, and a fork of a process with threads (torch's intra-op pool, decord's and pyarrow's
    threads, CUDA in the main process) can inherit a lock some other thread held, the very kind of
    hang this guards against. It imports numpy, PIL and decord only, and dies with its parent (EOF on
    its socket; ``PR_SET_PDEATHSIG`` for a child stuck in native code).

    One request at a time: the process-wide decoder (`load_video_frames`) is behind a lock.
    """

    #: Seconds a new child may take to import decord and answer; not counted against the time limit.
    START_TIMEOUT_S = 120.0

    def __init__(self, opener: str = VIDEO_OPENER) -> None:
        from multiprocessing import Pipe

        ours, theirs = Pipe(duplex=True)
        code = (
            "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
            "from vlmtune.data.media import _decoder_main; "
            "_decoder_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])"
        )
        self.pid, self.opener = os.getpid(), opener
        argv = [
            sys.executable,
            "-c",
            code,
            json.dumps(sys.path),
            str(theirs.fileno()),
            str(os.getpid()),
            opener,
        ]
        try:
            self.process = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        except OSError as e:  # out of processes or descriptors: this video is skipped, the next tries again
            ours.close()
            raise MediaError("video_decode_error", f"cannot start the video decoder process ({e})") from e
        finally:
            theirs.close()
        self.conn: Connection = ours
        try:
            ready = self.conn.poll(self.START_TIMEOUT_S) and self.conn.recv()
        except (EOFError, OSError):
            ready = None
        if ready != ("ready",):
            self.kill()
            raise MediaError(
                "video_decode_error",
                f"the video decoder process did not start (exit code {self.process.returncode}; "
                "its error is on stderr)",
            )

    def decode(
        self,
        opener: str,
        path: str,
        *,
        min_num_frames: int,
        max_num_frames: int,
        training: bool,
        rng: random.Random,
        timeout_s: float,
    ) -> np.ndarray:
        """`decode_video` in the child; ``rng`` advances exactly as it would in this process.

        Past ``timeout_s`` the child is killed and MediaError("video_decode_error", "timed out after
        N s") raised; the decoder is then dead (``alive`` is False) and the caller starts a new one.
        """
        try:
            self.conn.send(("decode", opener, path, min_num_frames, max_num_frames, training, rng.getstate()))
            answered = self.conn.poll(timeout_s)
            reply = self.conn.recv() if answered else None
        except (EOFError, OSError):
            self.kill()
            code = self.process.returncode
            raise MediaError(
                "video_decode_error", f"{path}: the decoder process died (exit code {code})"
            ) from None
        if reply is None:
            self.kill()
            raise MediaError(
                "video_decode_error",
                f"{path}: timed out after {timeout_s:g} s (data.video_decode_timeout_s; the decoder "
                "process was killed, the next video gets a new one)",
            )
        if reply[0] == "error":
            raise MediaError(reply[1], reply[2])
        _, frames, state = reply
        rng.setstate(state)
        return frames

    @property
    def alive(self) -> bool:
        return self.process.poll() is None and not self.conn.closed

    def kill(self) -> None:
        """Kill the child (SIGKILL: a hung native call ignores anything gentler) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self.conn.closed:
            self.conn.close()

    def close(self) -> None:
        """Let the child exit on EOF (it is idle between requests); kill it if it does not."""
        if not self.conn.closed:
            self.conn.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()


def _decoder_main(fd: int, parent_pid: int, opener: str) -> None:
    """The child's loop: requests in, frames (and the RNG state after them) or a MediaError out."""
    if sys.platform.startswith("linux"):  # killed with the parent even while stuck in native code
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; EOF ends this loop
    conn = Connection(fd)
    try:  # imported before "ready": their start-up is not a decode's time
        import decord  # noqa: F401

        _resolve_opener(opener)
    except Exception as e:
        print(f"vlmtune video decoder: {opener}: {type(e).__name__}: {e}", file=sys.stderr)
    conn.send(("ready",))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        _, opener, path, min_num_frames, max_num_frames, training, state = request
        rng = random.Random()
        rng.setstate(state)
        try:
            frames = decode_video(
                opener,
                path,
                min_num_frames=min_num_frames,
                max_num_frames=max_num_frames,
                training=training,
                rng=rng,
            )
        except MediaError as e:
            conn.send(("error", e.reason, e.detail))
            continue
        conn.send(("ok", frames, rng.getstate()))


_decoder: VideoDecoder | None = None
_decoder_lock = threading.Lock()


def _forget_decoder_after_fork() -> None:
    """A forked process (a DataLoader worker) must not share its parent's decoder: drop our copy of
    the socket without killing the parent's child; the first video here starts this process's own."""
    global _decoder, _decoder_lock
    if _decoder is not None:
        _decoder.conn.close()
        _decoder.process.returncode = 0  # not our child: never wait for or kill it
    _decoder, _decoder_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_decoder_after_fork)


@atexit.register
def _close_decoder() -> None:
    if _decoder is not None and _decoder.pid == os.getpid():
        _decoder.close()


def load_video_frames(
    path: str | Path,
    *,
    min_num_frames: int = 8,
    max_num_frames: int = 32,
    training: bool,
    rng: random.Random,
    timeout_s: float = 0.0,
) -> list[Image.Image]:
    """Decode a few frames of a video (`decode_video`: decord, InternVL's frame sampling) as RGB images.

    ``timeout_s`` > 0: the decode runs in this process's `VideoDecoder` child and one that takes longer
    is abandoned as MediaError("video_decode_error", "timed out after N s"); the same frames either
    way. 0: decoded in this process, with no limit and no inter-process copy.
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
    kwargs = dict(min_num_frames=min_num_frames, max_num_frames=max_num_frames, training=training, rng=rng)
    if timeout_s <= 0:
        frames = decode_video(VIDEO_OPENER, str(path), **kwargs)
    else:
        global _decoder
        with _decoder_lock:
            if _decoder is not None and _decoder.opener != VIDEO_OPENER:  # importing it is not decode time
                _decoder.close()
            if _decoder is None or not _decoder.alive:
                _decoder = VideoDecoder(VIDEO_OPENER)
            frames = _decoder.decode(VIDEO_OPENER, str(path), timeout_s=timeout_s, **kwargs)
    return [Image.fromarray(frame) for frame in frames]
