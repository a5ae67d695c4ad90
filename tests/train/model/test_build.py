"""vlmtune.train.model.build: real-size configs against published parameter counts, the tiny model's forward/backward,
freezing, and save -> from_pretrained."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vlmtune.train.model.build import (
    ModelConfig,
    apply_freezing,
    build_model,
    build_model_on_meta,
    count_parameters,
    num_image_tokens_per_tile,
    part_of,
)
from vlmtune.train.model.tiny import build_tokenizer, load_tiny_model_config

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "model"

# Published totals: the "Model size" (safetensors parameter count) on each OpenGVLab/InternVL3-*(-hf) Hugging Face
# page. Parts: InternViT-300M-448px-V2_5 "0.3B" and InternViT-6B-448px-V2_5 "5.5B" (its 45-layer cut; the
# 48-layer InternViT-6B is the 5.9B one) from the InternViT model cards; Qwen2.5-32B "32.8B" (Qwen2.5 card;
# its vocabulary is 152064 rows, InternVL3 keeps 151674). Tolerance: 0.5% on totals, which the pages round to
# 3 significant figures; 2% on parts, which are rounded to 1-2 figures.
PUBLISHED_TOTAL = {
    "1b": 0.938e9,
    "2b": 2.09e9,
    "8b": 7.94e9,
    "9b": 9.14e9,
    "14b": 15.1e9,
    "38b": 38.4e9,
    "78b": 78.4e9,
}
PUBLISHED_VISION = {
    "1b": 0.3e9,
    "2b": 0.3e9,
    "8b": 0.3e9,
    "9b": 0.3e9,
    "14b": 0.3e9,
    "38b": 5.5e9,
    "78b": 5.5e9,
}
PUBLISHED_LLM = {"38b": 32.8e9 - (152064 - 151674) * 5120 * 2}  # Qwen2.5-32B, minus the rows InternVL3 drops


def load_model_config(name: str) -> ModelConfig:
    from vlmtune.train.runtime.config import model_preset

    return model_preset(name)


@pytest.mark.parametrize("size", sorted(PUBLISHED_TOTAL))
def test_real_size_parameter_counts_match_published(size: str) -> None:
    cfg = load_model_config(f"internvl3_{size}")
    model = build_model_on_meta(cfg)
    counts = count_parameters(model)
    assert counts["total"] == pytest.approx(PUBLISHED_TOTAL[size], rel=0.005)
    assert counts["vision"] == pytest.approx(PUBLISHED_VISION[size], rel=0.02)
    if size in PUBLISHED_LLM:
        assert counts["llm"] == pytest.approx(PUBLISHED_LLM[size], rel=0.02)
    assert counts["vision"] + counts["projector"] + counts["llm"] == counts["total"]
    assert num_image_tokens_per_tile(model.config) == 256
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight  # InternVL3 never ties


def test_38b_shapes_are_the_published_ones() -> None:
    config = build_model_on_meta(load_model_config("internvl3_38b")).config
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (
        3200,
        45,
        25,
        12800,
    )
    assert (v.use_qk_norm, v.norm_type, v.attention_bias) == (True, "rms_norm", False)
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (
        "qwen2",
        5120,
        64,
        40,
    )
    assert (t.num_key_value_heads, t.intermediate_size, t.vocab_size) == (8, 27648, 151674)
    assert config.image_token_id == 151667 and config.tie_word_embeddings is False


def test_projector_input_is_pixel_shuffled_vision_width() -> None:
    model = build_model_on_meta(load_model_config("internvl3_38b"))
    proj = model.model.multi_modal_projector
    assert proj.linear_1.in_features == 3200 * 4 and proj.linear_1.out_features == 5120


def test_tiny_yaml_matches_tokenizer_and_tile_size() -> None:
    tokenizer = build_tokenizer()
    cfg = load_tiny_model_config()
    assert cfg.text["vocab_size"] == len(tokenizer)
    config = build_model_on_meta(cfg, tokenizer).config
    assert num_image_tokens_per_tile(config) == (56 // 7) ** 2 // 4 == 16
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")


def test_image_token_mismatch_is_an_error() -> None:
    cfg = dataclasses.replace(load_tiny_model_config(), image_token_id=3)
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        build_model_on_meta(cfg, build_tokenizer())


def _tiny_batch(tokenizer, tokens_per_tile: int, num_tiles: int = 2):
    """One conversation with `num_tiles` image tiles: <img> + N*<IMG_CONTEXT> + </img>, labels on the answer."""
    ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    prompt = tokenizer.encode("<|im_start|>user\n<img>")
    prompt += [ctx] * (tokens_per_tile * num_tiles)
    prompt += tokenizer.encode("</img>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n")
    answer = tokenizer.encode("The circle is red.<|im_end|>\n")
    input_ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    gen = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(num_tiles, 3, 56, 56, generator=gen)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tiny_forward_backward_reaches_every_trainable_parameter(tokenizer) -> None:
    torch.manual_seed(0)
    model = build_model(load_tiny_model_config(), tokenizer)
    batch = _tiny_batch(tokenizer, num_image_tokens_per_tile(model.config))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # Random init predicts ~uniformly over the vocabulary: the loss sits near log(V).
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(len(tokenizer))).item(), rel=0.1)
    out.loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


def test_image_features_change_the_logits(tokenizer) -> None:
    torch.manual_seed(0)
    model = build_model(load_tiny_model_config(), tokenizer).eval()
    batch = _tiny_batch(tokenizer, num_image_tokens_per_tile(model.config))
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        b = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"] + 1.0).logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "flags,frozen_parts",
    [
        ({"freeze_vision": True}, {"vision"}),
        ({"freeze_projector": True}, {"projector"}),
        ({"freeze_llm": True}, {"llm"}),
        ({"freeze_vision": True, "freeze_llm": True}, {"vision", "llm"}),
        ({}, set()),
    ],
)
def test_freezing_flags_set_exactly_the_intended_requires_grad(tokenizer, flags, frozen_parts) -> None:
    cfg = dataclasses.replace(load_tiny_model_config(), **flags)
    model = build_model_on_meta(cfg, tokenizer)
    for name, param in model.named_parameters():
        assert param.requires_grad == (part_of(name) not in frozen_parts), name
    counts = count_parameters(model)
    assert counts["trainable"] == sum(
        counts[p] for p in ("vision", "projector", "llm") if p not in frozen_parts
    )
    apply_freezing(model, load_tiny_model_config())  # unfreezing restores everything
    assert all(p.requires_grad for p in model.parameters())


def test_save_then_from_pretrained_gives_identical_logits(tokenizer, tmp_path) -> None:
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(0)
    model = build_model(load_tiny_model_config(), tokenizer).eval()
    model.save_pretrained(tmp_path)
    reloaded = InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    via_cfg = build_model(
        dataclasses.replace(load_tiny_model_config(), pretrained=str(tmp_path)), tokenizer
    ).eval()
    batch = _tiny_batch(tokenizer, num_image_tokens_per_tile(model.config))
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        for other in (reloaded, via_cfg):
            assert torch.equal(
                other(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits, ref
            )


def test_untied_flag_survives_a_config_without_top_level_tie(tokenizer, tmp_path) -> None:
    """A transformers-4 style config (untied only in text_config) must not be tied on load."""
    import json

    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(0)
    model = build_model(load_tiny_model_config(), tokenizer)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("tie_word_embeddings", None)
    config_file.write_text(json.dumps(config))
    loaded = build_model(dataclasses.replace(load_tiny_model_config(), pretrained=str(tmp_path)), tokenizer)
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight is not loaded.model.language_model.embed_tokens.weight
    # Plain transformers 5 would leave tie_word_embeddings=True and drop lm_head on the next save.
    loaded.save_pretrained(tmp_path / "again")
    again = InternVLForConditionalGeneration.from_pretrained(tmp_path / "again")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_gradient_checkpointing_flag(tokenizer) -> None:
    cfg = dataclasses.replace(load_tiny_model_config(), gradient_checkpointing=True)
    model = build_model(cfg, tokenizer)
    assert model.is_activation_checkpointing and model.config.use_cache is False


def test_liger_kernels_refused_without_cuda(monkeypatch):
    """A CPU run asking for Liger's Triton kernels stops at model build, saying why."""
    from vlmtune.train.model.build import apply_liger_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        apply_liger_kernels(torch.nn.Linear(2, 2))
