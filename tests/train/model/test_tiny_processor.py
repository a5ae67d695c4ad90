"""The tiny checkpoint's tokenizer and InternVLProcessor, loaded back through the Auto classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtune.data.tiling import image_to_tiles
from vlmtune.train.model.tiny import GROUNDING_TOKENS, SPECIAL_TOKENS, build_tokenizer

TILE = 56
TOKENS_PER_TILE = 16
# Measured (see test below) on these images: the HF processor resizes with torchvision, data.tiling with PIL;
# both bicubic with antialiasing, and they differ by rounding. Worst max |diff| 0.171 (random noise, 57x113,
# i.e. 10 uint8 levels / 255 / std); smooth images stay within one uint8 level (1/255/0.224 = 0.0175);
# mean |diff| <= 0.0021.
MAX_ABS_DIFF_NOISE = 0.2
MAX_ABS_DIFF_SMOOTH = 0.018
MEAN_ABS_DIFF = 0.005
SIZES = [(56, 56), (200, 90), (90, 300), (300, 160), (40, 30), (1000, 100), (120, 120), (57, 113)]


def _smooth(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    r = 127 + 120 * np.sin(x / w * 6.28 * 1.5)
    g = 127 + 120 * np.cos(y / h * 6.28)
    b = (x + y) * 255 / (w + h)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("size", SIZES)
def test_processor_tiles_match_data_tiling(processor, size) -> None:
    for kind, image in (("smooth", _smooth(*size)), ("noise", _noise(*size, seed=size[0] * 1000 + size[1]))):
        ours = image_to_tiles(image, image_size=TILE, max_num=12)
        hf = processor.image_processor(images=[image], return_tensors="pt")
        assert int(hf["num_patches"][0]) == ours.shape[0]
        diff = (hf["pixel_values"] - ours).abs()
        assert diff.max().item() <= (MAX_ABS_DIFF_SMOOTH if kind == "smooth" else MAX_ABS_DIFF_NOISE), kind
        assert diff.mean().item() <= MEAN_ABS_DIFF, kind


def test_prompt_expansion_is_img_context_block(processor, tokenizer) -> None:
    image = _smooth(200, 90)  # a 4x2 grid + thumbnail = 9 tiles
    num_tiles = image_to_tiles(image, image_size=TILE, max_num=12).shape[0]
    out = processor(
        images=[image], text=["<|im_start|>user\n<IMG_CONTEXT>\nhi<|im_end|>\n"], return_tensors="pt"
    )
    expected = (
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * num_tiles) + "</img>\nhi<|im_end|>\n"
    )
    assert tokenizer.decode(out["input_ids"][0]) == expected
    ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((out["input_ids"] == ctx).sum()) == TOKENS_PER_TILE * num_tiles
    assert out["pixel_values"].shape == (num_tiles, 3, TILE, TILE)


def test_video_expansion_is_one_tile_per_frame(processor, tokenizer) -> None:
    frames = np.stack([np.asarray(_smooth(80, 60))] * 3)  # [F, H, W, C]
    out = processor(videos=[frames], text=["<video>\nwhat moves?"], return_tensors="pt")
    block = "<img>" + "<IMG_CONTEXT>" * TOKENS_PER_TILE + "</img>"
    expected = "\n".join(f"Frame{i}: {block}" for i in (1, 2, 3)) + "\nwhat moves?"
    assert tokenizer.decode(out["input_ids"][0]) == expected
    assert out["pixel_values"].shape == (3, 3, TILE, TILE)


def test_chat_template_renders_qwen25_format(tokenizer, processor) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    assert processor.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"  # no default system
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    assert processor.apply_chat_template(with_image, tokenize=False) == (
        "<|im_start|>user\n<IMG_CONTEXT>\nColour?<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "A small red circle is at the left of the image.",
        "  leading spaces, tabs\tand\nnew\r\nlines  ",
        "unicode: héllo 你好 🚀 ½ ﬁ e\u0301",  # not NFC-normalised: must round-trip as is
        "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n<box>[1, 2]</box><|im_end|>\n",
        "<IMG_CONTEXT<IMG_CONTEXT>>",
    ],
)
def test_tokenizer_is_lossless(tokenizer, text) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids_and_never_split(tokenizer) -> None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(f"x{token}y") == tokenizer.encode("x") + [token_id] + tokenizer.encode("y")
    assert set(tokenizer.all_special_tokens) == set(SPECIAL_TOKENS)
    assert tokenizer.decode(tokenizer.encode("<|im_start|>hi<quad>"), skip_special_tokens=True) == "hi"
    assert all(t in tokenizer.all_special_tokens for t in GROUNDING_TOKENS)


def test_tokenizer_roles_and_processor_attributes(tokenizer) -> None:
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.start_image_token == "<img>" and tokenizer.end_image_token == "</img>"
    assert tokenizer.context_image_token == "<IMG_CONTEXT>" and tokenizer.video_token == "<video>"
    assert tokenizer.context_image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert 1000 <= len(tokenizer) <= 2000


def test_in_memory_tokenizer_equals_saved_one(tokenizer) -> None:
    fresh = build_tokenizer()
    text = "<|im_start|>assistant\nThere are 3 blue squares.<|im_end|>\n"
    assert fresh.encode(text) == tokenizer.encode(text)
    assert fresh.get_vocab() == tokenizer.get_vocab()


def test_checkpoint_logits_are_reproducible(tiny_model_dir, tmp_path) -> None:
    """Same seed, same weights: a second build gives the identical checkpoint."""
    from transformers import InternVLForConditionalGeneration

    from vlmtune.train.model.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path)
    a = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    b = InternVLForConditionalGeneration.from_pretrained(tmp_path)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
