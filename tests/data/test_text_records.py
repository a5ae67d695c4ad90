"""Pre-training text records and ``supervision``: label masks against masks built by hand."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.data.tokens import enc, image_ids
from vlmtune.data.collate import collate_packed, collate_padded
from vlmtune.data.conversation import IGNORE_INDEX, tokenize_conversation, tokenize_text
from vlmtune.data.dataset import DataConfig, SampleProcessor, iter_samples
from vlmtune.data.meta import load_meta
from vlmtune.data.report import SkipReport, SkipSample
from vlmtune.data.synthetic import scene

TILE, TOKENS = 56, 16


def test_text_record_is_raw_text_then_eos_all_labelled(tok):
    text = "The red circle is above the blue square."
    ids, labels = tokenize_text(text, tok, [])
    expected = enc(tok, text) + enc(tok, "<|im_end|>")
    assert tok.eos_token == "<|im_end|>"
    assert ids.tolist() == expected
    assert labels.tolist() == expected  # every token a target, the eos included; no template


def test_text_record_images_never_labelled(tok):
    ids, labels = tokenize_text("A red circle.<image>\nThen a square.", tok, [2 * TOKENS])
    img = image_ids(tok, 2 * TOKENS)
    first, second, eos = enc(tok, "A red circle."), enc(tok, "\nThen a square."), enc(tok, "<|im_end|>")
    assert ids.tolist() == first + img + second + eos
    assert labels.tolist() == first + [IGNORE_INDEX] * len(img) + second + eos
    # no placeholder: the image goes in front, as for a conversation
    ids, labels = tokenize_text("A caption.", tok, [TOKENS])
    img = image_ids(tok, TOKENS)
    assert ids.tolist() == img + enc(tok, "\nA caption.") + eos
    assert labels.tolist() == [IGNORE_INDEX] * len(img) + enc(tok, "\nA caption.") + eos


def test_supervision_all_labels_every_text_token_of_a_conversation(tok):
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    ids_a, labels_a = tokenize_conversation(conv, tok, [TOKENS], system_prompt="Be brief.")
    ids, labels = tokenize_conversation(conv, tok, [TOKENS], system_prompt="Be brief.", supervision="all")
    assert ids.tolist() == ids_a.tolist()  # same tokens, only the mask differs
    img = image_ids(tok, TOKENS)
    head = enc(tok, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    tail = enc(tok, "\nWhat colour?<|im_end|>\n<|im_start|>assistant\n")
    answer = enc(tok, "red") + enc(tok, "<|im_end|>") + enc(tok, "\n")
    assert ids.tolist() == head + img + tail + answer
    assert labels.tolist() == head + [IGNORE_INDEX] * len(img) + tail + answer
    # "assistant" (the default) is unchanged: the answer and its <|im_end|> only
    n_before = len(head) + len(img) + len(tail)
    expected_a = [IGNORE_INDEX] * n_before + enc(tok, "red") + enc(tok, "<|im_end|>") + [IGNORE_INDEX]
    assert labels_a.tolist() == expected_a
    _, labels_explicit = tokenize_conversation(
        conv, tok, [TOKENS], system_prompt="Be brief.", supervision="assistant"
    )
    assert torch.equal(labels_explicit, labels_a)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """A meta file: text records, conversations with an image, and bad text records, with line numbers known."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    scene(random.Random(0), (60, 60), 1, "circle", "red").save(root / "images/a.png")
    text_lines = [
        {"text": "I see a red circle. The circle is red."},
        {"text": 5},
        {"text": "   "},
        {"text": "x", "conversations": []},
        {"text": "<image>\nA caption.", "image": "images/a.png"},
    ]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text_lines))
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    (root / "conv.jsonl").write_text(json.dumps({"image": "images/a.png", "conversations": conv}) + "\n")
    meta = {
        "corpus": {"annotation": "text.jsonl"},
        "chat": {"annotation": "conv.jsonl"},
        "chat_all": {"annotation": "conv.jsonl", "supervision": "all"},
        "corpus_assistant": {"annotation": "text.jsonl", "supervision": "assistant"},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def test_processor_defaults_by_record_kind_and_counts_bad_text_records(tok, mixed):
    specs = load_meta(mixed)
    cfg = DataConfig(meta_path=str(mixed), max_length=1024, image_size=TILE, system_prompt=None)
    proc = SampleProcessor(cfg, tok, TOKENS)
    index = [(0, k) for k in range(5)] + [(1, 0), (2, 0), (3, 0)]
    report = SkipReport()
    samples = list(iter_samples(proc, specs, index, 0, report, training=False))
    text = str(mixed.parent / "text.jsonl")
    got = {(e["dataset"], e["line"]): (e["reason"], e["detail"].split(":")[0]) for e in report.entries}
    assert got == {
        ("corpus", 2): ("bad_conversation", "text"),
        ("corpus", 3): ("missing_field", "text (empty)"),
        ("corpus", 4): ("bad_conversation", "text and conversations"),
        ("corpus_assistant", 1): (
            "missing_field",
            "conversations (dataset 'corpus_assistant' has supervision 'assistant'; a text record has no assistant turn",
        ),
    }
    assert all(e["file"] == text for e in report.entries)
    by = {(s["dataset"], s["source"]): s for s in samples}
    plain = by[("corpus", f"{text}:1")]
    assert (
        plain["kind"] == "text"
        and plain["num_tiles"] == 0
        and plain["pixel_values"].shape == (0, 3, TILE, TILE)
    )
    assert torch.equal(plain["labels"], plain["input_ids"])
    caption = by[("corpus", f"{text}:5")]
    assert caption["num_tiles"] == 1
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    image_span = torch.isin(
        caption["input_ids"], torch.tensor(tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]))
    )
    assert int((caption["input_ids"] == ctx).sum()) == TOKENS
    assert torch.equal(caption["labels"], torch.where(image_span, IGNORE_INDEX, caption["input_ids"]))
    conv = str(mixed.parent / "conv.jsonl")
    chat, chat_all = by[("chat", f"{conv}:1")], by[("chat_all", f"{conv}:1")]
    assert chat["kind"] == chat_all["kind"] == "conversation"
    assert torch.equal(chat["input_ids"], chat_all["input_ids"])
    span = torch.isin(
        chat["input_ids"], torch.tensor(tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]))
    )
    assert torch.equal(chat_all["labels"], torch.where(span, IGNORE_INDEX, chat["input_ids"]))
    assert int((chat["labels"] != IGNORE_INDEX).sum()) == len(enc(tok, "red")) + 1  # answer + <|im_end|>


def test_collate_never_targets_padding_or_image_tokens(tok, mixed):
    specs = load_meta(mixed)
    cfg = DataConfig(meta_path=str(mixed), max_length=1024, image_size=TILE, system_prompt=None)
    proc = SampleProcessor(cfg, tok, TOKENS)
    text = proc(specs[0], 0, random.Random(0), False)
    chat_all = proc(specs[2], 0, random.Random(0), False)
    batch = collate_padded([text, chat_all], "token", tok.pad_token_id)
    n_text, n_chat = len(text["input_ids"]), len(chat_all["input_ids"])
    width = max(n_text, n_chat)
    for row, sample, n in ((0, text, n_text), (1, chat_all, n_chat)):
        targets = batch["targets"][row]
        assert targets[n - 1 :].eq(IGNORE_INDEX).all()  # last token and the padding after it: nothing
        assert torch.equal(targets[: n - 1], sample["labels"][1:])  # every labelled token is a target
        assert (batch["weights"][row][targets == IGNORE_INDEX] == 0).all()
    assert width > min(n_text, n_chat)  # there was padding to check
    assert batch["datasets"] == ["corpus", "chat_all"] and batch["sample_tokens"] == [n_text, n_chat]
    # a pack of text only: no tiles, the vision tower gets its blank tile from train/model/forward.py
    pack = collate_packed([text, text], "token")
    assert pack["pixel_values"].numel() == 0
    assert int(pack["supervised_counts"].sum()) == 2 * (n_text - 1)


def test_skip_sample_reason_for_text_under_assistant(tok, mixed):
    specs = load_meta(mixed)
    proc = SampleProcessor(DataConfig(meta_path=str(mixed), image_size=TILE), tok, TOKENS)
    with pytest.raises(SkipSample) as e:
        proc(specs[3], 0, random.Random(0), False)
    assert e.value.reason == "missing_field"
