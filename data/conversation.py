"""InternVL records -> token ids and labels: validation, image placeholders, chat template, masks.

Follows InternVL's ``preprocess_internvl2_5`` (internvl_chat/internvl/train/dataset.py), the
template InternVL2.5 and InternVL3 are trained with (Qwen2.5's ChatML)::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

Label convention (as ``preprocess_internvl2_5``): loss on each answer's tokens **and its
``<|im_end|>``** (the model must learn to stop); ``-100`` on the system and user turns, on
``<|im_start|>assistant\\n`` and on the ``\\n`` that follows each ``<|im_end|>`` (InternVL masks
the last token of every assistant segment: ``target[-1:] = IGNORE_TOKEN_ID``). Image tokens are
inside user turns, so they are never labelled.

The template is tokenised piece by piece (role headers, text between placeholders, answers), with
image tokens inserted as ids, so the label mask is exact by construction and a prompt of thousands
of ``<IMG_CONTEXT>`` tokens is never passed through the tokenizer. The pieces split at special
tokens or before the first character of an answer, where Qwen2.5's pre-tokenizer splits anyway, so
the ids equal tokenising the whole rendered string; the one exception is an answer that starts with
a newline, which is then tokenised the way the model sees it at generation time (after a
separately tokenised ``<|im_start|>assistant\\n``).

Pre-training (InternVL3's native multimodal pre-training) adds two things: ``supervision="all"``,
which labels every text token of a conversation (role headers included; image tokens still never),
and text records (``{"text": ...}``, optionally with images placed by ``<image>``), tokenised raw,
without the chat template, by `tokenize_text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmtune.data.report import SkipSample

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

#: InternVL2.5/InternVL3's default system message (InternVL's conversation template ``internvl2_5``).
DEFAULT_SYSTEM_PROMPT = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

_ROLE_NAMES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class TextRecord:
    """A validated pre-training text record: raw text (with ``<image>``/``<video>`` placeholders) and media."""

    text: str
    images: list[str]
    video: str | None


def is_text_record(record: dict[str, Any]) -> bool:
    """A ``{"text": ...}`` line (pre-training corpus) rather than a conversation."""
    return "text" in record and "conversations" not in record


def validate_text_record(record: dict[str, Any]) -> TextRecord:
    """Check a text record's fields; raises SkipSample naming the field at fault."""
    text = record.get("text")
    if not isinstance(text, str):
        raise SkipSample("bad_conversation", f"text: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise SkipSample("missing_field", "text (empty)")
    images, video = validate_media(record)
    return TextRecord(text=text, images=images, video=video)


@dataclass(frozen=True)
class Record:
    """A validated jsonl record: the turns and the media paths it refers to (relative to ``root``)."""

    conversations: list[dict[str, str]]
    images: list[str]
    video: str | None


def validate_record(record: dict[str, Any]) -> Record:
    """Check an InternVL record's fields; raises SkipSample naming the field at fault.

    ``conversations``: an optional ``system`` turn, then ``human``/``gpt`` alternating, ending with
    ``gpt``. ``image``: a path or a list of paths (multi-image); ``video``: a path; neither: pure text.
    An empty ``image``/``video`` counts as absent, as in InternVL.
    """
    if "conversations" not in record:
        raise SkipSample("missing_field", "conversations")
    if "text" in record:
        raise SkipSample("bad_conversation", "text and conversations: a record is one or the other")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise SkipSample("bad_conversation", "conversations: expected a non-empty list of turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SkipSample("bad_conversation", f"conversations[{i}]: expected an object")
        for key in ("from", "value"):
            if key not in turn:
                raise SkipSample("missing_field", f"conversations[{i}].{key}")
        if turn["from"] not in _ROLE_NAMES:
            raise SkipSample(
                "bad_conversation", f"conversations[{i}].from: {turn['from']!r} is not human/gpt/system"
            )
        if not isinstance(turn["value"], str):
            raise SkipSample("bad_conversation", f"conversations[{i}].value: expected a string")
    start = 1 if turns[0]["from"] == "system" else 0
    dialogue = turns[start:]
    for i, turn in enumerate(dialogue, start=start):
        expected = "human" if (i - start) % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise SkipSample(
                "bad_conversation", f"conversations[{i}].from: expected {expected!r}, got {turn['from']!r}"
            )
    if not dialogue or len(dialogue) % 2:
        raise SkipSample("bad_conversation", "conversations: must end with a gpt turn")
    images, video = validate_media(record)
    return Record(conversations=[dict(t) for t in turns], images=images, video=video)


def validate_media(record: dict[str, Any]) -> tuple[list[str], str | None]:
    """``(image paths, video path or None)`` of a record; shared by SFT and preference records.

    ``image``: a path or a list of paths (multi-image); ``video``: a path; neither: pure text.
    An empty ``image``/``video`` counts as absent, as in InternVL.
    """
    images = record.get("image")
    if images is None or images == "" or images == []:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise SkipSample("bad_conversation", "image: expected a path or a list of non-empty paths")
    video = record.get("video")
    if video == "":
        video = None
    if video is not None and not isinstance(video, str):
        raise SkipSample("bad_conversation", "video: expected a path")
    if images and video is not None:
        raise SkipSample("bad_conversation", "image and video: a sample has one or the other")
    return images, video


def insert_placeholders(
    conversations: list[dict[str, str]], num_images: int, video: bool
) -> list[dict[str, str]]:
    """A copy of ``conversations`` whose human turns hold exactly one ``<image>`` per image.

    Missing placeholders are added at the front of the first human turn, as InternVL does:
    ``<image>\\n`` for one image, ``Image-1: <image>\\nImage-2: <image>\\n`` for several (the
    multi-image prompt of InternVL's chat examples) and ``<video>\\n`` for a video. Any other count
    is a SkipSample("placeholder_mismatch").
    """
    turns = [dict(t) for t in conversations]
    humans = [t for t in turns if t["from"] == "human"]
    for t in turns:
        if t["from"] != "human" and (IMAGE_PLACEHOLDER in t["value"] or VIDEO_PLACEHOLDER in t["value"]):
            raise SkipSample("placeholder_mismatch", f"{t['from']} turn contains a media placeholder")
    n_img = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in humans)
    n_vid = sum(t["value"].count(VIDEO_PLACEHOLDER) for t in humans)
    if video:
        if n_img:
            raise SkipSample("placeholder_mismatch", f"video sample with {n_img} <image> placeholder(s)")
        if n_vid == 0:
            humans[0]["value"] = VIDEO_PLACEHOLDER + "\n" + humans[0]["value"]
        elif n_vid > 1:
            raise SkipSample("placeholder_mismatch", f"{n_vid} <video> placeholders for 1 video")
        return turns
    if n_vid:
        raise SkipSample("placeholder_mismatch", f"{n_vid} <video> placeholder(s) but no video")
    if n_img == 0 and num_images:
        if num_images == 1:
            prefix = IMAGE_PLACEHOLDER + "\n"
        else:
            prefix = "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1))
        humans[0]["value"] = prefix + humans[0]["value"]
    elif n_img != num_images:
        raise SkipSample("placeholder_mismatch", f"{n_img} <image> placeholder(s) for {num_images} image(s)")
    return turns


def video_frames_text(num_frames: int) -> str:
    """What ``<video>`` becomes: ``Frame1: <image>\\nFrame2: <image>...`` (one tile per frame)."""
    return "\n".join(f"Frame{i}: {IMAGE_PLACEHOLDER}" for i in range(1, num_frames + 1))


def tokenize_conversation(
    conversations: list[dict[str, str]],
    tokenizer: Any,
    image_token_counts: list[int],
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    max_length: int | None = None,
    frame_token_counts: list[int] | None = None,
    supervision: str = "assistant",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format ``conversations`` and return ``(input_ids, labels)`` as LongTensors.

    ``image_token_counts[i]``: ``<IMG_CONTEXT>`` tokens for image i (its tiles x tokens per tile);
    ``frame_token_counts``: the same per video frame, for a video sample. The sample's own system
    turn wins over ``system_prompt``; ``system_prompt=None`` omits the system turn.
    ``supervision="assistant"`` labels the answers (and their ``<|im_end|>``) only; ``"all"`` labels
    every text token, template included, and never an image's ``<img>..</img>`` span;
    ``"assistant_content"`` labels the answers without their ``<|im_end|>`` (a PRM's ``+``/``-``
    verdicts: the turn's end is given, not learnt).

    A sample longer than ``max_length`` is dropped (SkipSample("too_long")), never truncated:
    InternVL truncates, which can cut through image tokens (and then fails its own image-count
    assert) or leave a question without its answer; dropping keeps every sample whole and
    check-data reports how many were lost.
    """
    if supervision not in ("all", "assistant", "assistant_content"):
        raise ValueError(
            f"supervision must be 'all', 'assistant' or 'assistant_content', got {supervision!r}"
        )
    turns, counts = _expand_media(conversations, image_token_counts, frame_token_counts)

    system = system_prompt
    if turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]

    # pieces: (text, labelled) for the tokenizer, or an int = an image of that many context tokens
    pieces: list[tuple[str, bool] | int] = []
    if system is not None:
        pieces.append((f"{IM_START}system\n{system}{IM_END}\n", False))
    for turn in turns:
        if turn["from"] == "human":
            parts = turn["value"].split(IMAGE_PLACEHOLDER)
            pieces.append((f"{IM_START}user\n{parts[0]}", False))
            for part in parts[1:]:
                pieces.append(counts.pop(0))
                pieces.append((part, False))
            pieces.append((f"{IM_END}\n", False))
        else:
            pieces += [
                (f"{IM_START}assistant\n", False),
                (turn["value"], True),
                (IM_END, supervision != "assistant_content"),
                ("\n", False),
            ]

    if supervision == "all":
        pieces = [p if isinstance(p, int) else (p[0], True) for p in pieces]
    return _encode_pieces(pieces, tokenizer, max_length)


def _expand_media(
    turns: list[dict[str, str]], image_token_counts: list[int], frame_token_counts: list[int] | None
) -> tuple[list[dict[str, str]], list[int]]:
    """Placeholders checked/inserted and ``<video>`` expanded to frames; the token count of each ``<image>``."""
    is_video = frame_token_counts is not None
    if is_video and image_token_counts:
        raise ValueError("a sample has images or a video, not both")
    turns = insert_placeholders(turns, len(image_token_counts), is_video)
    counts = list(image_token_counts)
    if is_video:
        counts = list(frame_token_counts)
        for t in turns:
            if t["from"] == "human":
                t["value"] = t["value"].replace(VIDEO_PLACEHOLDER, video_frames_text(len(counts)))
    return turns, counts


def _encode_pieces(
    pieces: list[tuple[str, bool] | int], tokenizer: Any, max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise text pieces in one call, insert images as ids, label the pieces marked so."""
    texts = [p[0] for p in pieces if not isinstance(p, int)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    img_start, img_end, img_ctx = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, IMG_CONTEXT])
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids = [img_start] + [img_ctx] * piece + [img_end]
            labelled = False
        else:
            ids, labelled = next(encoded), piece[1]
        input_ids += ids
        labels += ids if labelled else [IGNORE_INDEX] * len(ids)
    if max_length is not None and len(input_ids) > max_length:
        raise SkipSample("too_long", f"{len(input_ids)} tokens > max_length {max_length}")
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def tokenize_text(
    text: str,
    tokenizer: Any,
    image_token_counts: list[int],
    *,
    max_length: int | None = None,
    frame_token_counts: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-training text record -> ``(input_ids, labels)``: the raw text, then the tokenizer's eos.

    No chat template: a corpus document is not an answer to anyone, and role headers would spend
    tokens and teach the model that documents follow a user turn. The document ends with
    ``tokenizer.eos_token`` (``<|im_end|>`` in InternVL3-hf / Qwen2.5-Instruct), the token generation
    stops at, so the model learns to end a text as it ends an answer; not ``<|endoftext|>``, which is
    the padding token here and padding is never a target. Every text token and the eos are labelled;
    images (``<image>`` in the text, or put in front as for a conversation) never are.
    """
    [turn], counts = _expand_media([{"from": "human", "value": text}], image_token_counts, frame_token_counts)
    parts = turn["value"].split(IMAGE_PLACEHOLDER)
    pieces: list[tuple[str, bool] | int] = [(parts[0], True)] if parts[0] else []
    for part in parts[1:]:
        pieces.append(counts.pop(0))
        if part:
            pieces.append((part, True))
    pieces.append((tokenizer.eos_token or IM_END, True))
    return _encode_pieces(pieces, tokenizer, max_length)


PROBE_CONVERSATION = [
    {"from": "system", "value": "You are a careful assistant."},
    {"from": "human", "value": "What is drawn here?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "And its size?"},
    {"from": "gpt", "value": "Small."},
]


def check_chat_format(tokenizer: Any, where: str) -> None:
    """Refuse, before training, a tokenizer whose own chat template formats a conversation otherwise
    than `tokenize_conversation` (another template family, other role names or separators): such a
    model would be trained in one format and served in another. No template: nothing to compare."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return
    ours, _ = tokenize_conversation(PROBE_CONVERSATION, tokenizer, [], system_prompt=None)
    messages = [
        {"role": _ROLE_NAMES[t["from"]], "content": [{"type": "text", "text": t["value"]}]}
        for t in PROBE_CONVERSATION
    ]
    try:
        theirs = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template for plain-string contents only
        theirs = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"][0]["text"]} for m in messages], tokenize=False
        )
    ours_text = tokenizer.decode(ours)
    if theirs.rstrip("\n") != ours_text.rstrip("\n"):
        at = next(
            (i for i, (a, b) in enumerate(zip(ours_text, theirs)) if a != b), min(len(ours_text), len(theirs))
        )
        raise ValueError(
            f"{where}: the tokenizer's chat template formats a conversation differently from the one vlmtune "
            f"trains with (InternVL3 / Qwen2.5 chat format), from character {at}:\n"
            f"  vlmtune:  {ours_text[max(0, at - 40) : at + 60]!r}\n  template: {theirs[max(0, at - 40) : at + 60]!r}"
        )
