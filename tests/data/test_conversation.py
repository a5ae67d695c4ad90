"""Chat template, placeholder handling and label masks against masks built by hand from the pieces."""

from __future__ import annotations

import pytest

from tests.data.tokens import enc, image_ids
from vlmtune.data.conversation import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    insert_placeholders,
    tokenize_conversation,
    validate_record,
)
from vlmtune.data.report import SkipSample

TOKENS_PER_TILE = 16


def hand_built(tok, pieces: list[tuple[list[int], bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for p, labelled in pieces:
        ids += p
        labels += p if labelled else [IGNORE_INDEX] * len(p)
    return ids, labels


def assistant(tok, answer: str) -> list[tuple[list[int], bool]]:
    return [
        (enc(tok, "<|im_start|>assistant\n"), False),
        (enc(tok, answer), True),
        (enc(tok, "<|im_end|>"), True),
        (enc(tok, "\n"), False),
    ]


def turns(*values: str, system: str | None = None) -> list[dict[str, str]]:
    out = [{"from": "system", "value": system}] if system is not None else []
    return out + [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_text_only_matches_chat_template_and_masks_all_but_answer(tok):
    conv = turns("What colour is the sky?", "Blue, I think.")
    ids, labels = tokenize_conversation(conv, tok, [], system_prompt="You are a helpful assistant.")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue, I think."},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ids.tolist() == enc(tok, rendered)
    exp_ids, exp_labels = hand_built(
        tok,
        [(enc(tok, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"), False)]
        + [(enc(tok, "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n"), False)]
        + assistant(tok, "Blue, I think."),
    )
    assert (ids.tolist(), labels.tolist()) == (exp_ids, exp_labels)
    assert tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX]) == "Blue, I think.<|im_end|>"


def test_default_system_prompt_is_internvl3s(tok):
    ids, _ = tokenize_conversation(turns("Hi", "Hello"), tok, [])
    assert tok.decode(ids.tolist()).startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    no_sys, _ = tokenize_conversation(turns("Hi", "Hello"), tok, [], system_prompt=None)
    assert tok.decode(no_sys.tolist()).startswith("<|im_start|>user\nHi")


def test_one_image_three_tiles_exact_tokens(tok):
    conv = turns("<image>\nWhat shape is shown?", "circle")
    ids, labels = tokenize_conversation(conv, tok, [3 * TOKENS_PER_TILE], system_prompt=None)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (ids == ctx).sum().item() == 48
    exp_ids, exp_labels = hand_built(
        tok,
        [
            (enc(tok, "<|im_start|>user\n"), False),
            (image_ids(tok, 48), False),
            (enc(tok, "\nWhat shape is shown?<|im_end|>\n"), False),
            *assistant(tok, "circle"),
        ],
    )
    assert (ids.tolist(), labels.tolist()) == (exp_ids, exp_labels)
    # and it equals tokenising the fully rendered string in one go
    rendered = "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 48 + "</img>\nWhat shape is shown?<|im_end|>\n"
    rendered += "<|im_start|>assistant\ncircle<|im_end|>\n"
    assert ids.tolist() == enc(tok, rendered)


def test_missing_placeholder_inserted_single_and_multi(tok):
    ids, _ = tokenize_conversation(turns("Describe.", "ok"), tok, [16], system_prompt=None)
    assert tok.decode(ids.tolist()).startswith(
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 16 + "</img>\nDescribe."
    )
    ids, labels = tokenize_conversation(turns("Which is red?", "first"), tok, [16, 32], system_prompt=None)
    text = tok.decode(ids.tolist())
    img1, img2 = "<img>" + "<IMG_CONTEXT>" * 16 + "</img>", "<img>" + "<IMG_CONTEXT>" * 32 + "</img>"
    assert text.startswith(f"<|im_start|>user\nImage-1: {img1}\nImage-2: {img2}\nWhich is red?<|im_end|>")
    img_ids = set(tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]))
    assert not any(t in img_ids for t in labels.tolist())


def test_several_images_in_multi_turn_each_get_their_count(tok):
    conv = turns("<image>\nA?", "one", "And <image>?", "two", system="Be brief.")
    ids, labels = tokenize_conversation(conv, tok, [16, 80], system_prompt="ignored")
    exp_ids, exp_labels = hand_built(
        tok,
        [
            (enc(tok, "<|im_start|>system\nBe brief.<|im_end|>\n"), False),
            (enc(tok, "<|im_start|>user\n"), False),
            (image_ids(tok, 16), False),
            (enc(tok, "\nA?<|im_end|>\n"), False),
            *assistant(tok, "one"),
            (enc(tok, "<|im_start|>user\nAnd "), False),
            (image_ids(tok, 80), False),
            (enc(tok, "?<|im_end|>\n"), False),
            *assistant(tok, "two"),
        ],
    )
    assert (ids.tolist(), labels.tolist()) == (exp_ids, exp_labels)


def test_video_frames_one_tile_each(tok):
    conv = turns("<video>\nWhat moves?", "a ball")
    ids, labels = tokenize_conversation(conv, tok, [], system_prompt=None, frame_token_counts=[16, 16, 16])
    frame = "<img>" + "<IMG_CONTEXT>" * 16 + "</img>"
    expected = f"<|im_start|>user\nFrame1: {frame}\nFrame2: {frame}\nFrame3: {frame}\nWhat moves?<|im_end|>\n"
    expected += "<|im_start|>assistant\na ball<|im_end|>\n"
    assert ids.tolist() == enc(tok, expected)
    assert tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX]) == "a ball<|im_end|>"
    # no <video> in the text: inserted at the front, as InternVL does
    ids2, _ = tokenize_conversation(
        turns("What moves?", "a ball"), tok, [], system_prompt=None, frame_token_counts=[16] * 3
    )
    assert ids2.tolist() == ids.tolist()


def test_pure_text_with_placeholder_is_mismatch(tok):
    with pytest.raises(SkipSample) as e:
        tokenize_conversation(turns("<image>\nHi", "x"), tok, [], system_prompt=None)
    assert e.value.reason == "placeholder_mismatch"


@pytest.mark.parametrize(
    ("conv", "n_images", "video"),
    [
        (turns("<image><image>Hi", "x"), 1, False),
        (turns("<image>Hi", "x"), 3, False),
        (turns("Hi", "<image>"), 1, False),
        (turns("<video><video>", "x"), 0, True),
        (turns("<image>", "x"), 0, True),
    ],
)
def test_placeholder_mismatch(conv, n_images, video):
    with pytest.raises(SkipSample) as e:
        insert_placeholders(conv, n_images, video)
    assert e.value.reason == "placeholder_mismatch"


def test_too_long_is_dropped_not_truncated(tok):
    conv = turns("<image>\nQ", "A")
    ids, _ = tokenize_conversation(conv, tok, [64], system_prompt=None)
    same, _ = tokenize_conversation(conv, tok, [64], system_prompt=None, max_length=len(ids))
    assert same.tolist() == ids.tolist()
    with pytest.raises(SkipSample) as e:
        tokenize_conversation(conv, tok, [64], system_prompt=None, max_length=len(ids) - 1)
    assert e.value.reason == "too_long"


@pytest.mark.parametrize(
    ("record", "reason", "field"),
    [
        ({"image": "a.png"}, "missing_field", "conversations"),
        ({"conversations": "hi"}, "bad_conversation", "conversations"),
        ({"conversations": [{"from": "human"}]}, "missing_field", "conversations[0].value"),
        ({"conversations": [{"from": "user", "value": "x"}]}, "bad_conversation", "conversations[0].from"),
        ({"conversations": [{"from": "human", "value": 3}]}, "bad_conversation", "conversations[0].value"),
        ({"conversations": turns("a", "b")[::-1]}, "bad_conversation", "conversations[0].from"),
        ({"conversations": turns("a", "b", "c")}, "bad_conversation", "end with a gpt turn"),
        ({"conversations": turns("a", "b"), "image": 5}, "bad_conversation", "image"),
        (
            {"conversations": turns("a", "b"), "image": "x.png", "video": "y.mp4"},
            "bad_conversation",
            "image and video",
        ),
    ],
)
def test_validate_record_names_the_field(record, reason, field):
    with pytest.raises(SkipSample) as e:
        validate_record(record)
    assert e.value.reason == reason and field in e.value.detail


def test_validate_record_media_forms():
    base = {"conversations": turns("a", "b", system="s")}
    assert validate_record({**base, "image": "x.png"}).images == ["x.png"]
    assert validate_record({**base, "image": ["x.png", "y.png"]}).images == ["x.png", "y.png"]
    assert validate_record({**base, "image": ""}).images == []
    r = validate_record({**base, "video": "v.mp4"})
    assert r.video == "v.mp4" and r.images == []


def test_chat_format_check_accepts_the_internvl3_template_and_refuses_another():
    """The start-of-run check compares vlmtune's hand-built format with the tokenizer's own template."""
    from vlmtune.data.conversation import check_chat_format
    from vlmtune.data.serving import chat_template_with_system
    from vlmtune.train.model.tiny import build_tokenizer

    tok = build_tokenizer()
    check_chat_format(tok, "tiny")  # InternVL3-hf's template: the same format
    tok.chat_template = chat_template_with_system(tok.chat_template, "Be brief.")  # an export's template
    check_chat_format(tok, "export")
    tok.chat_template = tok.chat_template.replace("message['role'] + '\n'", "message['role'] + ': '")
    with pytest.raises(ValueError, match="broken: the tokenizer's chat template formats"):
        check_chat_format(tok, "broken")
