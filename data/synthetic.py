"""A synthetic InternVL-format SFT dataset whose answers live only in the pixels.

Coloured shapes on a plain background; questions ask for the colour, the shape or the count, with
one-word answers. Everything a model could exploit without looking is made independent of the
answer: the question's phrasing, the image's size and aspect ratio and the background are drawn
separately, and the answers of each task are exactly balanced. So a model that ignores the image
scores chance, and a tiny model that learns to see scores near 100%: a quick end-to-end check
that pixels really reach the language model. Shapes are big and saturated so they survive 56 px
tiles. Images vary from 40 to 300 px per side with aspect ratios 1:3..3:1, so dynamic tiling
yields one to many tiles.

The ``background`` task (the LoRA domain-adaptation demo's new domain) asks what the others never
do: the colour of the background, vivid there and pale grey everywhere else; its answers are the
colour words the other tasks already use, so a model needs a new way of looking, not new words.

`generate_bad_samples` writes one record of every bad-input kind among good ones, for the
bad-input accounting tests. `generate_pair_dataset` writes preference pairs (MMPR format) on the
same scenes: the right answer chosen, another colour / shape / count rejected.

`generate_text_corpus` writes a pre-training text corpus (``{"text": ...}`` lines) from a small
grammar about the same shapes and colours: random slot fillers, deterministic structure (sentences
that repeat, count on or add up what an earlier one said), so a model that learns the grammar
predicts most tokens and its perplexity falls from the vocabulary size to a few.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3", "4")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 240, 225), (215, 220, 225))

QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the shape?",
        "What colour is the shape in the image?",
        "Which color is the object? Answer with one word.",
        "Name the color of the shape.",
    ),
    "shape": (
        "What shape is shown?",
        "Which shape is in the image?",
        "What kind of shape is this? Answer with one word.",
        "Name the shape.",
    ),
    "count": (
        "How many shapes are there?",
        "Count the shapes in the image.",
        "How many objects are shown? Answer with a number.",
    ),
    "multi_image": ("Which image shows a {colour} shape? Answer first or second.",),
    "background": (
        "What color is the background?",
        "What colour is the background of the image?",
        "Which color is the background? Answer with one word.",
        "Name the background color.",
    ),
    "video": ("What color is the moving shape?", "Which colour is the shape in the video?"),
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNTS,
    "multi_image": ("first", "second"),
    "background": tuple(COLOURS),
    "video": tuple(COLOURS),
}
#: Share of each task in the data (pure text and video are small extras).
TASK_WEIGHTS = {"color": 0.3, "shape": 0.3, "count": 0.3, "multi_image": 0.07, "text": 0.03}

_NUMBER = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of its square bounding box


def random_size(rng: random.Random, size_range: tuple[int, int], max_aspect: float = 3.0) -> tuple[int, int]:
    """(w, h) with sides in ``size_range`` and aspect ratio log-uniform in 1:max_aspect..max_aspect:1."""
    lo, hi = size_range
    ratio = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
    long_side = rng.randint(lo, hi)
    short_side = max(lo, round(long_side / max(ratio, 1 / ratio)))
    return (long_side, short_side) if ratio >= 1 else (short_side, long_side)


def layout(width: int, height: int, count: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """Non-overlapping square boxes for ``count`` shapes: one per grid cell, sized from the cell.

    Cells run along the long side (or a 2x2 grid for 3-4 shapes in a near-square image); each box
    fills 60-80% of its cell's short side, so a shape is as large as the image allows.
    """
    if count >= 3 and max(width, height) < 2 * min(width, height):
        cols, rows = 2, 2
    elif width >= height:
        cols, rows = count, 1
    else:
        cols, rows = 1, count
    if count == 1:  # one shape: centred and large, so it stays whole in the middle tile and the thumbnail
        side = max(4, int(min(width, height) * rng.uniform(0.7, 0.9)))
        x0, y0 = (width - side) // 2, (height - side) // 2
        return [(x0, y0, x0 + side, y0 + side)]
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    rng.shuffle(cells)
    cw, ch = width / cols, height / rows
    boxes = []
    for c, r in cells[:count]:
        side = max(4, int(min(cw, ch) * rng.uniform(0.6, 0.8)))
        x0 = int(c * cw + rng.uniform(0, cw - side))
        y0 = int(r * ch + rng.uniform(0, ch - side))
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def draw(width: int, height: int, shapes: list[Shape], background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), background)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        fill = COLOURS[s.colour]
        x0, y0, x1, y1 = s.box
        if s.kind == "circle":
            pen.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def scene(
    rng: random.Random,
    size_range: tuple[int, int],
    count: int,
    kind: str | None,
    colour: str | None,
    max_aspect: float = 3.0,
):
    """An image of ``count`` shapes; kind/colour fixed when given, else random (all shapes alike)."""
    width, height = random_size(rng, size_range, max_aspect)
    kind = kind or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    shapes = [Shape(kind, colour, box) for box in layout(width, height, count, rng)]
    return draw(width, height, shapes, rng.choice(BACKGROUNDS))


def background_scene(
    rng: random.Random, size_range: tuple[int, int], background: str, max_aspect: float = 3.0
) -> Image.Image:
    """One small shape of another colour on a ``background``-coloured image (most of the pixels)."""
    width, height = random_size(rng, size_range, max_aspect)
    side = max(4, int(min(width, height) * rng.uniform(0.3, 0.5)))
    x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
    colour = rng.choice([c for c in COLOURS if c != background])
    shape = Shape(rng.choice(SHAPES), colour, (x0, y0, x0 + side, y0 + side))
    return draw(width, height, [shape], COLOURS[background])


def _balanced(values: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


def _task_counts(n: int, weights: dict[str, float]) -> dict[str, int]:
    counts = {task: int(n * w) for task, w in weights.items()}
    counts["color" if "color" in counts else next(iter(counts))] += n - sum(counts.values())
    return counts


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


class _ImageWriter:
    """Saves PNGs under ``images/`` and refuses byte-identical images across splits (disjoint eval)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.seen: set[str] = set()
        self.counter = 0

    def save(self, image: Image.Image, name: str) -> str | None:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        digest = hashlib.sha1(buf.getvalue()).hexdigest()
        if digest in self.seen:
            return None
        self.seen.add(digest)
        rel = f"images/{name}.png"
        (self.root / rel).write_bytes(buf.getvalue())
        return rel

    def save_new(self, make: Callable[[], Image.Image], prefix: str) -> str:
        """Draw with ``make`` and save under the next free name, redrawing on the (rare)
        byte-identical collision with an earlier image."""
        while True:
            self.counter += 1
            rel = self.save(make(), f"{prefix}_{self.counter:06d}")
            if rel is not None:
                return rel


def write_video(path: Path, frames: list[Image.Image], fps: int = 8) -> None:
    """A tiny MPEG-4 video (PyAV), frames sized to even sides as yuv420p needs."""
    import av

    w, h = (frames[0].width // 2) * 2, (frames[0].height // 2) * 2
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_image(frame.resize((w, h))).reformat(format="yuv420p")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def moving_shape_frames(
    rng: random.Random, colour: str, num_frames: int = 8, size: int = 96
) -> list[Image.Image]:
    """A shape of ``colour`` sliding left to right across ``num_frames`` frames."""
    kind, background = rng.choice(SHAPES), rng.choice(BACKGROUNDS)
    side = size // 2
    y0 = rng.randint(0, size - side)
    frames = []
    for i in range(num_frames):
        x0 = round(i * (size - side) / max(1, num_frames - 1))
        frames.append(draw(size, size, [Shape(kind, colour, (x0, y0, x0 + side, y0 + side))], background))
    return frames


def make_records(
    split: str,
    n: int,
    rng: random.Random,
    writer: _ImageWriter,
    size_range: tuple[int, int],
    num_videos: int = 0,
    task_weights: dict[str, float] | None = None,
    max_aspect: float = 3.0,
) -> list[dict[str, Any]]:
    """``n`` records (+ ``num_videos``) of the split, images written through ``writer``."""
    records: list[dict[str, Any]] = []

    def save(make: Callable[[], Image.Image]) -> str:
        return writer.save_new(make, split)

    for task, k in _task_counts(n, task_weights or TASK_WEIGHTS).items():
        if task == "text":
            for _ in range(k):
                a, b = rng.randint(0, 4), rng.randint(0, 4)
                question = f"What is {_NUMBER[a]} plus {_NUMBER[b]}? Answer with a number."
                records.append(
                    {"conversations": _turns(question, str(a + b)), "task": task, "answer": str(a + b)}
                )
            continue
        for answer in _balanced(ANSWERS[task], k, rng):
            question = rng.choice(QUESTIONS[task])
            record: dict[str, Any] = {"task": task, "answer": answer}
            if task == "color":
                record["image"] = save(lambda a=answer: scene(rng, size_range, 1, None, a, max_aspect))
            elif task == "shape":
                record["image"] = save(lambda a=answer: scene(rng, size_range, 1, a, None, max_aspect))
            elif task == "count":
                record["image"] = save(
                    lambda a=answer: scene(rng, size_range, int(a), None, None, max_aspect)
                )
            elif task == "background":
                record["image"] = save(lambda a=answer: background_scene(rng, size_range, a, max_aspect))
            else:
                colour = rng.choice(list(COLOURS))
                other = rng.choice([c for c in COLOURS if c != colour])
                first, second = (colour, other) if answer == "first" else (other, colour)
                record["image"] = [
                    save(lambda c=c: scene(rng, size_range, 1, None, c, max_aspect)) for c in (first, second)
                ]
                question = question.format(colour=colour)
            placeholder = (
                "<image>\n" if isinstance(record["image"], str) else "Image-1: <image>\nImage-2: <image>\n"
            )
            record["conversations"] = _turns(placeholder + question, answer)
            records.append(record)
    for answer in _balanced(ANSWERS["video"], num_videos, rng):
        writer.counter += 1
        rel = f"images/{split}_{writer.counter:06d}.mp4"
        write_video(writer.root / rel, moving_shape_frames(rng, answer))
        question = "<video>\n" + rng.choice(QUESTIONS["video"])
        records.append(
            {"video": rel, "conversations": _turns(question, answer), "task": "video", "answer": answer}
        )
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_meta(path: Path, name: str, annotation: str, *, data_augment: bool, **extra: Any) -> Path:
    """An InternVL meta file with one dataset whose root is the meta file's directory."""
    entry = {"root": ".", "annotation": annotation, "data_augment": data_augment, "repeat_time": 1, **extra}
    path.write_text(json.dumps({name: entry}, indent=2) + "\n", encoding="utf-8")
    return path


def write_split(
    out: Path,
    stem: str,
    name: str,
    records: list[dict[str, Any]],
    data_augment: bool | None = None,
    **extra: Any,
) -> Path:
    """One split of a generated dataset: ``{stem}.jsonl`` and its meta file ``meta_{stem}.json`` (dataset
    ``name``; augmented, unless told otherwise, when the stem is a training split)."""
    write_jsonl(out / f"{stem}.jsonl", records)
    augment = stem.endswith("train") if data_augment is None else data_augment
    return write_meta(
        out / f"meta_{stem}.json", name, f"{stem}.jsonl", data_augment=augment, length=len(records), **extra
    )


def generate_sft_dataset(
    out_dir: str | Path,
    *,
    num_train: int = 2000,
    num_eval: int = 200,
    seed: int = 0,
    image_size_range: tuple[int, int] = (40, 300),
    num_videos: int = 0,
    max_dynamic_patch: int | None = None,
    task_weights: dict[str, float] | None = None,
    max_aspect: float = 3.0,
    name: str = "shapes",
) -> Path:
    """Write the demo dataset to ``out_dir`` and return the path of ``meta_train.json``.

    Layout: ``images/``, ``train.jsonl``, ``eval.jsonl`` (held out: its images are other files and
    never byte-identical to a training image), ``meta_train.json`` / ``meta_eval.json``. Records
    carry InternVL's fields plus ``task`` and ``answer`` for exact-match evaluation. Deterministic
    under ``seed``. ``task_weights`` (default ``TASK_WEIGHTS``) sets each task's share; ``max_aspect``
    bounds the images' aspect ratio (1:3..3:1 by default). The meta files name their datasets
    ``{name}_train`` / ``{name}_eval``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ImageWriter(out)
    rng = random.Random(seed)
    extra = {} if max_dynamic_patch is None else {"max_dynamic_patch": max_dynamic_patch}
    splits = {"train": (num_train, num_videos), "eval": (num_eval, max(0, num_videos // 4))}
    for split, (n, videos) in splits.items():
        records = make_records(split, n, rng, writer, image_size_range, videos, task_weights, max_aspect)
        write_split(out, split, f"{name}_{split}", records, **extra)
    return out / "meta_train.json"


def zero_width_png(height: int = 8) -> bytes:
    """A PNG whose header declares width 0 (PIL cannot write one): the zero-size image case."""
    ihdr = struct.pack(">IIBBBBB", 0, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


@dataclass
class BadDataset:
    """A dataset with one record of every bad-input kind: ``expected`` maps file line -> reason."""

    meta_path: Path
    annotation: Path
    expected: dict[int, str]
    good_lines: list[int]


def generate_bad_samples(
    out_dir: str | Path, *, seed: int = 0, num_good: int = 6, with_video: bool = True
) -> BadDataset:
    """Good records interleaved with one of each bad kind (for max_length <= 1024).

    The good ones include a pure-text and a two-image record. Bad kinds: malformed JSON, missing field, bad conversation, missing / corrupt / zero-size
    image, missing / undecodable video, placeholder mismatch, too long. ``with_video`` adds a good
    video record (needs PyAV to write it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ImageWriter(out)
    rng = random.Random(seed)
    good = make_records("good", num_good, rng, writer, (40, 200), 1 if with_video else 0)
    singles = [r["image"] for r in good if isinstance(r.get("image"), str)]
    img = singles[0]
    good.append({"conversations": _turns("What is two plus two? Answer with a number.", "4"), "task": "text"})
    pair = _turns("Image-1: <image>\nImage-2: <image>\nAre these the same? Answer yes or no.", "no")
    good.append({"image": singles[:2], "conversations": pair, "task": "multi_image"})
    (out / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (out / "images/zero.png").write_bytes(zero_width_png())
    (out / "images/broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    ask = _turns("<image>\nWhat color is the shape?", "red")
    bad: list[tuple[str, str]] = [
        ("malformed_json", '{"image": "images/x.png", "conversations": ['),
        ("missing_field", json.dumps({"image": img, "question": "no conversations"})),
        ("bad_conversation", json.dumps({"image": img, "conversations": _turns("<image>\nHi", "x")[::-1]})),
        ("missing_image", json.dumps({"image": "images/does_not_exist.png", "conversations": ask})),
        ("corrupt_image", json.dumps({"image": "images/corrupt.png", "conversations": ask})),
        ("zero_size_image", json.dumps({"image": "images/zero.png", "conversations": ask})),
        (
            "missing_video",
            json.dumps({"video": "images/nope.mp4", "conversations": _turns("<video>\nColour?", "red")}),
        ),
        (
            "video_decode_error",
            json.dumps({"video": "images/broken.mp4", "conversations": _turns("Colour?", "red")}),
        ),
        (
            "placeholder_mismatch",
            json.dumps({"image": img, "conversations": _turns("<image>\n<image>\nWhat?", "red")}),
        ),
        (
            "too_long",
            json.dumps(
                {"image": img, "conversations": _turns("<image>\nDescribe.", " ".join(["shape"] * 2000))}
            ),
        ),
    ]
    lines: list[str] = []
    expected: dict[int, str] = {}
    good_lines: list[int] = []
    goods = [json.dumps(r) for r in good]
    while goods or bad:
        if goods:
            lines.append(goods.pop(0))
            good_lines.append(len(lines))
        if bad:
            reason, line = bad.pop(0)
            lines.append(line)
            expected[len(lines)] = reason
    annotation = out / "bad.jsonl"
    annotation.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = write_meta(out / "meta_bad.json", "bad_mix", "bad.jsonl", data_augment=False)
    return BadDataset(meta_path=meta, annotation=annotation, expected=expected, good_lines=good_lines)


#: Share of preference pairs whose responses are short reasoning chains instead of one word.
REASONING_SHARE = 0.3
#: Tasks of the preference pairs: one image, a one-word answer, several plausible wrong ones.
PAIR_TASKS = ("color", "shape", "count")


def _observation(task: str, value: str) -> str:
    if task == "color":
        return f"The shape is {value}"
    if task == "shape":
        return f"The shape is a {value}"
    return f"I count {_NUMBER[int(value)]} shape{'s' if value != '1' else ''}"


def reasoning_answer(task: str, seen: str, answer: str) -> str:
    """A one-sentence chain: what is seen, then the answer ("The shape is red, so the answer is red.")."""
    return f"{_observation(task, seen)}, so the answer is {answer}."


def make_pair_records(
    split: str,
    n: int,
    rng: random.Random,
    writer: _ImageWriter,
    size_range: tuple[int, int],
    reasoning_share: float = REASONING_SHARE,
    tasks: tuple[str, ...] = PAIR_TASKS,
    max_aspect: float = 3.0,
) -> list[dict[str, Any]]:
    """``n`` MMPR records: chosen = the right answer, rejected = another value of the same task.

    Per task, every ordered (right, wrong) combination appears equally often, so each value is
    as often chosen as rejected and neither side can be told apart without the image. A
    ``reasoning_share`` of each task answers with a short chain; half of those wrong chains
    misread the image, the other half read it right and then conclude wrongly.
    """
    records: list[dict[str, Any]] = []

    def save(make: Callable[[], Image.Image]) -> str:
        return writer.save_new(make, split)

    for task, k in _task_counts(n, dict.fromkeys(tasks, 1 / len(tasks))).items():
        values, m = ANSWERS[task], len(ANSWERS[task])
        # every block of m holds each value once as chosen and once as rejected, so any k is balanced
        combos = [(values[i], values[(i + shift) % m]) for shift in range(1, m) for i in range(m)]
        pairs = [combos[i % len(combos)] for i in range(k)]
        rng.shuffle(pairs)
        n_reason = round(k * reasoning_share)
        styles = ["reasoning"] * n_reason + ["short"] * (k - n_reason)
        rng.shuffle(styles)
        for i, ((answer, wrong), style) in enumerate(zip(pairs, styles)):
            if task == "color":
                image = save(lambda a=answer: scene(rng, size_range, 1, None, a, max_aspect))
            elif task == "shape":
                image = save(lambda a=answer: scene(rng, size_range, 1, a, None, max_aspect))
            else:
                image = save(lambda a=answer: scene(rng, size_range, int(a), None, None, max_aspect))
            if style == "short":
                question, chosen, rejected = rng.choice(QUESTIONS[task]), answer, wrong
            else:
                question = rng.choice([q for q in QUESTIONS[task] if "Answer with" not in q])
                question += " Explain briefly, then answer."
                chosen = reasoning_answer(task, answer, answer)
                rejected = reasoning_answer(task, wrong if i % 2 else answer, wrong)
            records.append(
                {
                    "image": image,
                    "question": "<image>\n" + question,
                    "chosen": chosen,
                    "rejected": rejected,
                    "task": task,
                    "answer": answer,
                    "style": style,
                }
            )
    rng.shuffle(records)
    return records


def generate_pair_dataset(
    out_dir: str | Path,
    *,
    num_train: int = 2000,
    num_eval: int = 200,
    seed: int = 0,
    image_size_range: tuple[int, int] = (40, 300),
    reasoning_share: float = REASONING_SHARE,
    max_dynamic_patch: int | None = None,
    tasks: tuple[str, ...] = PAIR_TASKS,
    max_aspect: float = 3.0,
) -> Path:
    """Write a preference-pair (MMPR-format) demo set to ``out_dir``; return ``meta_pairs_train.json``.

    Layout: ``images/pairs_*.png``, ``pairs_train.jsonl``, ``pairs_eval.jsonl`` (images never
    byte-identical to a training image), ``meta_pairs_train.json`` / ``meta_pairs_eval.json``. It can
    share a directory with `generate_sft_dataset`'s output. Records carry MMPR's fields plus
    ``task``, ``answer`` and ``style``. Deterministic under ``seed``. ``tasks`` and ``max_aspect``
    as in `generate_sft_dataset`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ImageWriter(out)
    rng = random.Random(f"pairs:{seed}")
    extra = {} if max_dynamic_patch is None else {"max_dynamic_patch": max_dynamic_patch}
    for split, n in {"train": num_train, "eval": num_eval}.items():
        records = make_pair_records(
            f"pairs_{split}", n, rng, writer, image_size_range, reasoning_share, tasks, max_aspect
        )
        write_split(out, f"pairs_{split}", f"shapes_pairs_{split}", records, **extra)
    return out / "meta_pairs_train.json"


#: Relations between two shapes in the text corpus.
RELATIONS = ("above", "below", "left of", "right of", "next to", "behind")


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def text_sentences(rng: random.Random) -> list[str]:
    """One grammar unit: a sentence with random slots and what must follow it.

    Four kinds: a relation restated the other way round; a count continued in words; two counts
    added up; a shape described and then recalled. The second half of each is determined by the
    first, which is what a model can learn.
    """
    colours, kind = list(COLOURS), rng.randrange(4)
    a, b = rng.choice(SHAPES), rng.choice(SHAPES)
    ca, cb = rng.choice(colours), rng.choice(colours)
    if kind == 0:
        rel = rng.choice(RELATIONS)
        inverse = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}.get(
            rel, rel
        )
        return [f"The {ca} {a} is {rel} the {cb} {b}.", f"So the {cb} {b} is {inverse} the {ca} {a}."]
    if kind == 1:
        start = rng.randint(0, 5)
        words = ", ".join(_NUMBER[start : start + 5])
        return [f"Count the {ca} {a}s: {words}."]
    if kind == 2:
        x, y = rng.randint(1, 4), rng.randint(1, 4)
        return [
            f"There are {_NUMBER[x]} {ca} {_plural(a, x)} and {_NUMBER[y]} {cb} {_plural(b, y)}.",
            f"That makes {_NUMBER[x + y]} shapes.",
        ]
    return [f"I see a {ca} {a}.", f"The {a} is {ca}."]


def text_document(rng: random.Random, min_units: int = 2, max_units: int = 4) -> str:
    """A corpus document: a few grammar units in one paragraph."""
    units = [" ".join(text_sentences(rng)) for _ in range(rng.randint(min_units, max_units))]
    return " ".join(units)


def generate_text_corpus(
    out_dir: str | Path, *, num_train: int = 4000, num_eval: int = 200, seed: int = 0, name: str = "text"
) -> Path:
    """Write ``{name}_train.jsonl`` / ``{name}_eval.jsonl`` (``{"text": ...}`` lines) and
    ``meta_{name}_train.json`` / ``meta_{name}_eval.json``; return the train meta. The held-out
    documents never occur in the training split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"text:{seed}")
    seen: set[str] = set()
    for split, n in {"train": num_train, "eval": num_eval}.items():
        docs: list[str] = []
        while len(docs) < n:
            doc = text_document(rng)
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
        write_split(
            out, f"{name}_{split}", f"{name}_{split}", [{"text": d} for d in docs], data_augment=False
        )
    return out / f"meta_{name}_train.json"


#: The multi-step questions (the PRM / Best-of-N demo): two facts read from the image, then the answer
#: built from them, one step per paragraph (data/prm.py splits steps on blank lines).
STEP_QUESTIONS = (
    "Describe the shape in two steps, its colour and then its kind, and end with 'Answer: <colour> <shape>'.",
    "What is shown? First say its colour, then its shape, then answer as 'Answer: <colour> <shape>'.",
)


def step_solution(colour: str, kind: str) -> str:
    """A three-step solution: the colour read, the shape read, the answer made of both. A wrong read
    in a step carries into the answer, as a policy's reasoning does."""
    return f"The colour is {colour}.\n\nThe shape is a {kind}.\n\nAnswer: {colour} {kind}"


def make_step_records(
    split: str,
    n: int,
    rng: random.Random,
    writer: _ImageWriter,
    size_range: tuple[int, int],
    max_aspect: float = 3.0,
) -> list[dict[str, Any]]:
    """``n`` records of one shape each, every (colour, shape) combination equally often; the reference
    answer (``answer``) is ``"<colour> <shape>"``, the gpt turn the full `step_solution`."""
    combos = [(c, k) for c in COLOURS for k in SHAPES]
    records = []
    for i in range(n):
        colour, kind = combos[i % len(combos)]
        image = writer.save_new(lambda k=kind, c=colour: scene(rng, size_range, 1, k, c, max_aspect), split)
        question = "<image>\n" + rng.choice(STEP_QUESTIONS)
        records.append(
            {
                "image": image,
                "conversations": _turns(question, step_solution(colour, kind)),
                "task": "steps",
                "answer": f"{colour} {kind}",
            }
        )
    rng.shuffle(records)
    return records


#: What a general model (the PRM demo's base, standing in for the InternVL model VisualPRM starts from)
#: is asked besides the multi-step questions: one-word reads of the image, the attribute a sentence names
#: (text alone: the step sentences' wording), and yes/no checks of a claim against the image.
READ_QUESTIONS = {
    "colour": "What colour is the shape? Answer with one word.",
    "shape": "What shape is it? Answer with one word.",
}
WORDING_QUESTIONS = {
    "colour": "Which colour does this sentence name? Answer with one word.",
    "shape": "Which shape does this sentence name? Answer with one word.",
}
CHECK_QUESTIONS = {
    "colour": "Is the colour of the shape {claim}? Answer yes or no.",
    "shape": "Is the shape a {claim}? Answer yes or no.",
}


def make_general_records(step_records: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Per multi-step record, on its image: a one-word read of each attribute and a yes/no check of each
    (the claim right half the time, else another value); per attribute a text-only question on the wording
    of a step sentence (`step_solution`'s, any value). ``task``/``answer`` as the other generators'.

    Why a base needs these (measured on the tiny model, PRMs trained at lr 1e-3, which the demo no longer
    uses; not re-measured at its 3e-4): SFT on the multi-step answers alone leaves the claim of a step
    unreadable at the position that judges it (a linear probe: 0.48 of 6 colours), and a PRM trained from
    there never learnt to compare claim and image (held-out AUC 0.50 on noise-free labels); the wording
    questions bring the claim there (probe 0.89), the checks the comparison itself."""
    values = {"colour": tuple(COLOURS), "shape": SHAPES}
    out: list[dict[str, Any]] = []
    for record in step_records:
        truth, image = dict(zip(("colour", "shape"), record["answer"].split())), record["image"]
        for attr, pool in values.items():
            out.append(_record(image, READ_QUESTIONS[attr], truth[attr], f"read_{attr}"))
            claim = truth[attr] if rng.random() < 0.5 else rng.choice([v for v in pool if v != truth[attr]])
            answer = "yes" if claim == truth[attr] else "no"
            out.append(_record(image, CHECK_QUESTIONS[attr].format(claim=claim), answer, f"check_{attr}"))
            word = rng.choice(pool)
            colour, kind = (
                (word, rng.choice(SHAPES)) if attr == "colour" else (rng.choice(list(COLOURS)), word)
            )
            lines = step_solution(colour, kind).split("\n\n")
            sentence = rng.choice(lines)
            if word not in sentence:  # the answer line names both; the other lines one attribute each
                sentence = lines[0 if attr == "colour" else 1]
            text = f"{sentence}\n{WORDING_QUESTIONS[attr]}"
            out.append({"conversations": _turns(text, word), "task": f"wording_{attr}", "answer": word})
    rng.shuffle(out)
    return out


def _record(image: str, question: str, answer: str, task: str) -> dict[str, Any]:
    return {
        "image": image,
        "conversations": _turns("<image>\n" + question, answer),
        "task": task,
        "answer": answer,
    }


def generate_step_dataset(
    out_dir: str | Path,
    *,
    num_train: int = 2000,
    num_eval: int = 200,
    seed: int = 0,
    image_size_range: tuple[int, int] = (40, 300),
    max_aspect: float = 3.0,
    name: str = "steps",
    general: bool = False,
) -> Path:
    """The multi-step questions' dataset, laid out as `generate_sft_dataset`'s (``train.jsonl``,
    ``eval.jsonl``, ``meta_train.json``, ``meta_eval.json``); returns ``meta_train.json``. ``general``:
    also ``general_{train,eval}.jsonl`` and ``meta_general_*.json``, the multi-step records plus
    `make_general_records` on the same images (a general model's SFT data)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ImageWriter(out)
    rng = random.Random(seed)
    for split, n in (("train", num_train), ("eval", num_eval)):
        records = make_step_records(split, n, rng, writer, image_size_range, max_aspect)
        write_split(out, split, f"{name}_{split}", records)
        if general:
            mixed = records + make_general_records(records, rng)
            rng.shuffle(mixed)
            write_split(out, f"general_{split}", f"general_{split}", mixed)
    return out / "meta_train.json"
