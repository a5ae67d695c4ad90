"""The export's processor files, loaded by plain transformers, build what training built.

Each case writes the serving files for a run's data settings, loads them back with `AutoProcessor`
(transformers' own InternVL processor and chat template, nothing of vlmtune), and compares the
prompt ids and pixel tiles with vlmtune's training path on the same record.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from vlmtune.data.conversation import DEFAULT_SYSTEM_PROMPT
from vlmtune.data.dataset import DataConfig, SampleProcessor, sample_settings
from vlmtune.data.meta import load_meta
from vlmtune.data.serving import chat_template_with_system, stop_at_im_end, write_serving_files
from vlmtune.train.runtime.eval_engines import record_to_item
from vlmtune.train.runtime.evaluate import split_prompt_answer

TILE, TOKENS_PER_TILE = 56, 16
#: One intensity level is 1/255/0.229 = 0.017 after ImageNet normalisation: transformers resamples in
#: float, the model card (and vlmtune, pixel-exact to it) on uint8, so single pixels round differently.
LEVEL = 1 / 255 / 0.225


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def export_processor(tmp_path, tokenizer, tiny_model_dir, cfg: DataConfig):
    from transformers import AutoProcessor

    out = tmp_path / "export"
    out.mkdir(exist_ok=True)
    write_serving_files(out, tokenizer, str(tiny_model_dir), sample_settings(cfg), TOKENS_PER_TILE)
    return AutoProcessor.from_pretrained(out)


def training_and_serving(tmp_path, tokenizer, tiny_model_dir, record, images, cfg_kwargs):
    for i, img in enumerate(images):
        img.save(tmp_path / f"img{i}.png")
    (tmp_path / "a.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"t": {"root": str(tmp_path), "annotation": "a.jsonl"}}))
    cfg = DataConfig(meta_path=str(tmp_path / "meta.json"), image_size=TILE, **cfg_kwargs)
    [spec] = load_meta(tmp_path / "meta.json")
    sample = SampleProcessor(cfg, tokenizer, TOKENS_PER_TILE)(spec, 0, random.Random(0), training=False)
    prompt, _, _ = split_prompt_answer(sample, tokenizer)
    processor = export_processor(tmp_path, tokenizer, tiny_model_dir, cfg)
    item = record_to_item(record, tmp_path, "a.jsonl:1", "t")
    text = processor.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=False)
    served = processor(
        text=text, images=[Image.open(p).convert("RGB") for p in item.images] or None, return_tensors="pt"
    )
    return sample, prompt, served


def assert_same_tiles(train_pixels: torch.Tensor, served_pixels: torch.Tensor) -> None:
    assert served_pixels.shape == train_pixels.shape  # same grid, same thumbnail
    diff = (served_pixels - train_pixels).abs()
    assert diff.max().item() <= 2.5 * LEVEL  # rounding of the resampled pixels, never a different image
    assert diff.mean().item() < 0.2 * LEVEL


SIZES = [(1, 2000), (5000, 10), (513, 511), (56, 56), (120, 40), (448, 170)]


@pytest.mark.parametrize("max_patch", [1, 2, 6, 12])
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_exported_processor_tiles_and_prompts_as_training(
    tmp_path, tokenizer, tiny_model_dir, size, max_patch
):
    record = {
        "image": "img0.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    image = noise_image(*size, seed=size[0] * 7 + size[1])
    sample, prompt, served = training_and_serving(
        tmp_path, tokenizer, tiny_model_dir, record, [image], {"max_dynamic_patch": max_patch}
    )
    assert served["input_ids"][0].tolist() == prompt.tolist()  # default system prompt included
    assert_same_tiles(sample["pixel_values"], served["pixel_values"])


@pytest.mark.parametrize("system_prompt", [None, DEFAULT_SYSTEM_PROMPT, 'Answer in one word, "quoted".'])
@pytest.mark.parametrize("own_system", [False, True])
def test_system_prompt_default_and_override(tmp_path, tokenizer, tiny_model_dir, system_prompt, own_system):
    turns = [{"from": "human", "value": "Which shape?"}, {"from": "gpt", "value": "circle"}]
    if own_system:
        turns = [{"from": "system", "value": "You are terse."}, *turns]
    record = {"image": "img0.png", "conversations": turns}  # no placeholder: the image goes first
    images = [noise_image(300, 200, 1)]
    sample, prompt, served = training_and_serving(
        tmp_path,
        tokenizer,
        tiny_model_dir,
        record,
        images,
        {"max_dynamic_patch": 4, "system_prompt": system_prompt},
    )
    assert served["input_ids"][0].tolist() == prompt.tolist()
    assert_same_tiles(sample["pixel_values"], served["pixel_values"])


@pytest.mark.parametrize("max_patch", [1, 4])
def test_multi_image_prompt_and_the_tile_budget_gap(tmp_path, tokenizer, tiny_model_dir, max_patch):
    """Several images: the same "Image-k: " prompt. Training gives each of n images
    ``max_dynamic_patch // n`` tiles (InternVL's rule); a processor has one ``max_patches`` for every
    image, so serving matches training only at one tile per image, and the export says so otherwise."""
    record = {
        "image": ["img0.png", "img1.png"],
        "conversations": [{"from": "human", "value": "Which is red?"}, {"from": "gpt", "value": "the first"}],
    }
    images = [noise_image(300, 200, 1), noise_image(90, 400, 2)]
    sample, prompt, served = training_and_serving(
        tmp_path, tokenizer, tiny_model_dir, record, images, {"max_dynamic_patch": max_patch}
    )
    if max_patch == 1:
        assert served["input_ids"][0].tolist() == prompt.tolist()
        assert_same_tiles(sample["pixel_values"], served["pixel_values"])
    else:
        assert len(served["pixel_values"]) > len(sample["pixel_values"])  # the documented gap
    settings = sample_settings(DataConfig(meta_path="-", image_size=TILE, max_dynamic_patch=max_patch))
    gaps = write_serving_files(tmp_path / "again", tokenizer, str(tiny_model_dir), settings, TOKENS_PER_TILE)
    assert any("multi-image" in g for g in gaps) == (max_patch > 1)


def test_text_only_record_prompts_as_training(tmp_path, tokenizer, tiny_model_dir):
    record = {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
    _, prompt, served = training_and_serving(tmp_path, tokenizer, tiny_model_dir, record, [], {})
    assert served["input_ids"][0].tolist() == prompt.tolist()


def test_template_prefix_is_written_once_on_re_export():
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    once = chat_template_with_system(template, "A")
    from vlmtune.data.serving import split_system_default

    assert split_system_default(once)[0] == "A"
    assert chat_template_with_system(split_system_default(once)[1], "B") == chat_template_with_system(
        template, "B"
    )
    assert chat_template_with_system(template, None) == template


def test_generation_config_stops_at_im_end_and_decodes_greedily(tokenizer):
    from transformers import GenerationConfig

    gen = GenerationConfig(eos_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.7, top_p=0.8)
    stop_at_im_end(gen, tokenizer)
    assert gen.eos_token_id[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen.do_sample is False and gen.temperature is None and gen.top_p is None
