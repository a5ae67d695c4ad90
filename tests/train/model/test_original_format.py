"""vlmtune.train.model.original_format: original InternVL (InternVLChatModel) <-> -hf checkpoints.

Round trips are bit-identical tensor for tensor (tiny model and small random models with each size's
shape features, sharded ones included); a converted -hf checkpoint loads with no missing/unexpected key and
gives the source model's logits; the real sizes map on the meta device to the shapes the original
config implies, with equal parameter counts; non-Qwen2 LLMs are refused; the CLI round-trips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import InternVLConfig, InternVLForConditionalGeneration

from vlmtune.train.model.build import (
    ModelConfig,
    build_internvl_config,
    build_model_on_meta,
    count_parameters,
)
from vlmtune.train.model.original_format import (
    convert,
    hf_config_from_original,
    hf_keys,
    hf_to_original,
    is_original_format,
    load_original,
    original_config_from_hf,
    original_key,
    original_to_hf,
    to_disk_key,
)
from vlmtune.train.model.tiny import build_tokenizer


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} in two shards"
                tensors[key] = f.get_tensor(key)
    return tensors


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def shard_files(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("*.safetensors"))


# -- names ----------------------------------------------------------------------------------------------

L = "model.vision_tower.encoder.layer.3."
PAIRS = [  # (original, in-memory -hf): the map of transformers' convert_internvl_weights_to_hf.py
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (
        "vision_model.embeddings.patch_embedding.weight",
        "model.vision_tower.embeddings.patch_embeddings.projection.weight",
    ),
    ("vision_model.encoder.layers.3.ls1", L + "lambda_1"),
    ("vision_model.encoder.layers.3.ls2", L + "lambda_2"),
    ("vision_model.encoder.layers.3.norm1.weight", L + "layernorm_before.weight"),
    ("vision_model.encoder.layers.3.norm1.bias", L + "layernorm_before.bias"),
    ("vision_model.encoder.layers.3.norm2.weight", L + "layernorm_after.weight"),
    ("vision_model.encoder.layers.3.attn.proj.bias", L + "attention.projection_layer.bias"),
    ("vision_model.encoder.layers.3.attn.q_norm.weight", L + "attention.q_norm.weight"),
    ("vision_model.encoder.layers.3.attn.k_norm.weight", L + "attention.k_norm.weight"),
    ("vision_model.encoder.layers.3.mlp.fc1.weight", L + "mlp.fc1.weight"),
    ("vision_model.encoder.layers.3.mlp.fc2.bias", L + "mlp.fc2.bias"),
    ("mlp1.0.weight", "model.multi_modal_projector.layer_norm.weight"),
    ("mlp1.1.bias", "model.multi_modal_projector.linear_1.bias"),
    ("mlp1.3.weight", "model.multi_modal_projector.linear_2.weight"),
    ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
    (
        "language_model.model.layers.5.self_attn.k_proj.bias",
        "model.language_model.layers.5.self_attn.k_proj.bias",
    ),
    (
        "language_model.model.layers.5.mlp.gate_proj.weight",
        "model.language_model.layers.5.mlp.gate_proj.weight",
    ),
    ("language_model.lm_head.weight", "lm_head.weight"),
]


def test_key_map_both_ways_and_both_hf_spellings() -> None:
    for orig, hf in PAIRS:
        assert hf_keys(orig) == [(hf, None)]
        assert original_key(hf) == (orig, None)
        assert original_key(to_disk_key(hf)) == (orig, None)  # the on-disk spelling reads too
    qkv = "vision_model.encoder.layers.7.attn.qkv.bias"
    pieces = [f"model.vision_tower.encoder.layer.7.attention.{x}_proj.bias" for x in "qkv"]
    assert hf_keys(qkv) == [(pieces[0], 0), (pieces[1], 1), (pieces[2], 2)]
    assert [original_key(p) for p in pieces] == [(qkv, 0), (qkv, 1), (qkv, 2)]
    assert to_disk_key("model.language_model.norm.weight") == "language_model.model.norm.weight"
    assert to_disk_key("lm_head.weight") == "language_model.lm_head.weight"
    assert to_disk_key("model.vision_tower.embeddings.cls_token") == "vision_tower.embeddings.cls_token"
    for unknown in (
        "language_model.model.tok_embeddings.weight",  # InternLM2
        "language_model.model.layers.0.attention.wqkv.weight",  # InternLM2
        "vision_model.encoder.layers.0.attn.qkv.lora_A.weight",  # peft-wrapped
    ):
        with pytest.raises(ValueError, match="no -hf counterpart"):
            hf_keys(unknown)
    for unknown in ("model.vision_tower.embeddings.mask_token", "model.vision_tower.layernorm.weight"):
        with pytest.raises(ValueError, match="no counterpart"):
            original_key(unknown)


# -- tiny checkpoint --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chain(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny -hf -> original -> -hf -> original."""
    root = tmp_path_factory.mktemp("original_format")
    chain = {"hf0": Path(tiny_model_dir)}
    for src, dst, to in (("hf0", "orig1", "original"), ("orig1", "hf2", "hf"), ("hf2", "orig3", "original")):
        chain[dst] = root / dst
        convert(chain[src], chain[dst], to)
    return chain


def test_tiny_round_trips_are_bit_identical(tiny_chain: dict[str, Path]) -> None:
    assert_identical(load_tensors(tiny_chain["hf0"]), load_tensors(tiny_chain["hf2"]))
    assert_identical(load_tensors(tiny_chain["orig1"]), load_tensors(tiny_chain["orig3"]))
    assert json.loads((tiny_chain["orig1"] / "config.json").read_text()) == json.loads(
        (tiny_chain["orig3"] / "config.json").read_text()
    )


def test_tiny_original_layout_and_config(tiny_chain: dict[str, Path]) -> None:
    hf = load_tensors(tiny_chain["hf0"])
    orig = load_tensors(tiny_chain["orig1"])
    assert is_original_format(tiny_chain["orig1"]) and not is_original_format(tiny_chain["hf0"])
    assert all(k.startswith(("vision_model.", "mlp1.", "language_model.")) for k in orig)
    # The fused qkv is q, k, v stacked in that order; the rest are the very tensors, renamed.
    v = "vision_tower.encoder.layer.1.attention."
    fused = torch.cat([hf[v + "q_proj.weight"], hf[v + "k_proj.weight"], hf[v + "v_proj.weight"]])
    assert torch.equal(orig["vision_model.encoder.layers.1.attn.qkv.weight"], fused)
    assert orig["vision_model.encoder.layers.1.attn.qkv.weight"].shape == (3 * 64, 64)
    for o, h in PAIRS:
        if to_disk_key(h) in hf:
            assert torch.equal(orig[o], hf[to_disk_key(h)]), o
    config = json.loads((tiny_chain["orig1"] / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"] and config["model_type"] == "internvl_chat"
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert config["vision_config"]["architectures"] == ["InternVisionModel"]
    assert (config["template"], config["ps_version"], config["select_layer"]) == ("internvl2_5", "v2", -1)
    assert (config["downsample_ratio"], config["force_image_size"]) == (0.5, 56)
    assert (config["max_dynamic_patch"], config["min_dynamic_patch"], config["use_thumbnail"]) == (
        12,
        1,
        True,
    )
    vision = config["vision_config"]
    assert (vision["qk_normalization"], vision["qkv_bias"], vision["norm_type"]) == (True, False, "rms_norm")
    assert (vision["image_size"], vision["patch_size"], vision["initializer_factor"]) == (56, 7, 0.1)
    assert config["auto_map"] == {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}
    assert "system_message" not in config  # the tiny template inserts no system prompt
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_chain["orig1"] / name).read_bytes() == (tiny_chain["hf0"] / name).read_bytes()
    # The chat template differs only in its image placeholder, and is the -hf one again after the round trip.
    hf_template = (tiny_chain["hf0"] / "chat_template.jinja").read_text()
    assert (tiny_chain["orig1"] / "chat_template.jinja").read_text() == hf_template.replace(
        "'<IMG_CONTEXT>\n'", "'<image>\n'"
    )
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_chain["hf2"] / name).read_bytes() == (tiny_chain["hf0"] / name).read_bytes(), name
    assert not (tiny_chain["hf2"] / "processor_config.json").exists()  # the caller writes the processor
    assert not (tiny_chain["hf2"] / "configuration_internvl_chat.py").exists()


def _logits(model, config, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    image = config.image_token_id
    words = [t for t in torch.randint(0, vocab, (12,), generator=gen).tolist() if t != image]
    ids = words[:4] + [image] * (2 * config.image_seq_length) + words[4:]
    size = config.vision_config.image_size[0]
    pixels = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float32).to(model.dtype)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits


def _load_checked(model_dir: Path):
    model, info = InternVLForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_tiny_converted_hf_loads_and_gives_the_same_logits(tiny_chain: dict[str, Path]) -> None:
    source = InternVLForConditionalGeneration.from_pretrained(tiny_chain["hf0"]).eval()
    converted = _load_checked(tiny_chain["hf2"])
    assert converted.config.image_token_id == source.config.image_token_id
    assert converted.config.image_seq_length == source.config.image_seq_length == 16
    torch.testing.assert_close(_logits(converted, converted.config), _logits(source, source.config))
    in_memory = load_original(tiny_chain["orig1"])
    assert in_memory.config.tie_word_embeddings == source.config.tie_word_embeddings
    torch.testing.assert_close(_logits(in_memory, in_memory.config), _logits(source, source.config))


def test_in_memory_loading_names_what_is_missing_or_left_over(
    tiny_chain: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    for change, expected in (("drop", "no tensor for 1 key"), ("extra", "no -hf counterpart")):
        broken = tmp_path / change
        broken.mkdir()
        for f in tiny_chain["orig1"].iterdir():
            if f.suffix != ".safetensors":
                (broken / f.name).write_bytes(f.read_bytes())
        tensors = load_file(tiny_chain["orig1"] / "model.safetensors")
        if change == "drop":
            tensors.pop("mlp1.1.bias")
        else:
            tensors["vision_model.encoder.layers.0.attn.qkv.lora_A.weight"] = torch.zeros(2, 2)
        save_file(tensors, broken / "model.safetensors")
        with pytest.raises(ValueError, match=expected):
            load_original(broken)


# -- small random models with each size's shape features ---------------------------------------------

VARIANTS = {
    # InternViT-6B (38B/78B): RMSNorm, QK-norm, no qkv bias; LLM with 2 KV heads of 4; sharded, bf16.
    "vit6b_gqa2_sharded_bf16": dict(
        kv=2, bias=False, qk_norm=True, norm="rms_norm", dtype=torch.bfloat16, shard="16KB"
    ),
    # InternViT-300M (1B-14B): LayerNorm, qkv bias, no QK-norm; multi-query LLM.
    "vit300m_mqa": dict(kv=1, bias=True, qk_norm=False, norm="layer_norm", dtype=torch.float32, shard=None),
    # Mixed: LayerNorm with QK-norm and bias; full multi-head LLM; sharded fp32.
    "mixed_mha_sharded": dict(
        kv=4, bias=True, qk_norm=True, norm="layer_norm", dtype=torch.float32, shard="40KB"
    ),
    # RMSNorm without QK-norm or bias; 8 query heads sharing 2 KV heads (groups of 4).
    "rms_plain_gqa4": dict(
        kv=2, bias=False, qk_norm=False, norm="rms_norm", dtype=torch.float32, shard=None, heads=8
    ),
}
VISION_HIDDEN = 32


def _random_checkpoint(path: Path, variant: dict) -> InternVLForConditionalGeneration:
    tokenizer = build_tokenizer()
    heads = variant.get("heads", 4)
    cfg = ModelConfig(
        name="random",
        vision=dict(
            hidden_size=VISION_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            norm_type=variant["norm"],
            attention_bias=variant["bias"],
            use_qk_norm=variant["qk_norm"],
            image_size=28,
            patch_size=7,
        ),
        text=dict(
            model_type="qwen2",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=variant["kv"],
            intermediate_size=96,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
        ),
    )
    config = build_internvl_config(cfg, tokenizer)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration._from_config(config, dtype=variant["dtype"]).eval()
    with torch.no_grad():  # every tensor distinct (init leaves norms at 1, lambdas at 0.1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kwargs = {} if variant["shard"] is None else {"max_shard_size": variant["shard"]}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_random_models_round_trip_load_and_match(name: str, tmp_path: Path) -> None:
    variant = VARIANTS[name]
    source = _random_checkpoint(tmp_path / "hf0", variant)
    for src, dst, to in (("hf0", "orig1", "original"), ("orig1", "hf2", "hf"), ("hf2", "orig3", "original")):
        convert(tmp_path / src, tmp_path / dst, to)
    hf0, orig1, hf2 = (load_tensors(tmp_path / d) for d in ("hf0", "orig1", "hf2"))
    assert_identical(hf0, hf2)
    assert_identical(orig1, load_tensors(tmp_path / "orig3"))
    assert {t.dtype for t in orig1.values()} == {variant["dtype"]}
    # Shards: as many as the source (each round), same file names, an index when sharded.
    names = shard_files(tmp_path / "hf0")
    for d in ("orig1", "hf2", "orig3"):
        assert shard_files(tmp_path / d) == names
        assert (tmp_path / d / "model.safetensors.index.json").exists() == (len(names) > 1)
    if variant["shard"] is not None:
        assert len(names) > 2
        index = json.loads((tmp_path / "hf0" / "model.safetensors.index.json").read_text())["weight_map"]
        straddles = [
            i
            for i in range(2)
            if len({index[f"vision_tower.encoder.layer.{i}.attention.{x}_proj.weight"] for x in "qkv"}) > 1
        ]
        assert straddles, "no vision layer's q/k/v spans two shards: pick another shard size"
        orig_index = json.loads((tmp_path / "orig1" / "model.safetensors.index.json").read_text())[
            "weight_map"
        ]
        assert set(orig_index) == set(orig1)
    # The original layout has what this variant's features imply.
    h = VISION_HIDDEN
    for i in range(2):
        layer = f"vision_model.encoder.layers.{i}."
        assert orig1[layer + "attn.qkv.weight"].shape == (3 * h, h)
        assert (layer + "attn.qkv.bias" in orig1) == variant["bias"]
        assert (
            (layer + "attn.q_norm.weight" in orig1)
            == (layer + "attn.k_norm.weight" in orig1)
            == variant["qk_norm"]
        )
        assert (layer + "norm1.bias" in orig1) == (variant["norm"] == "layer_norm")
        state = source.state_dict()
        att = f"model.vision_tower.encoder.layer.{i}.attention."
        fused = torch.cat([state[att + f"{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(orig1[layer + "attn.qkv.weight"], fused)
    # Each tensor lands under its name in the published map (the source's norms, lambdas... all differ).
    for orig_name, hf_name in PAIRS:
        orig_name = orig_name.replace("layers.3.", "layers.1.").replace("layers.5.", "layers.1.")
        hf_name = hf_name.replace("layer.3.", "layer.1.").replace("layers.5.", "layers.1.")
        if orig_name in orig1:
            assert torch.equal(orig1[orig_name], hf0[to_disk_key(hf_name)]), orig_name
    head_dim = 64 // variant.get("heads", 4)
    assert orig1["language_model.model.layers.0.self_attn.k_proj.weight"].shape == (
        variant["kv"] * head_dim,
        64,
    )
    assert orig1["mlp1.1.weight"].shape == (64, h * 4)
    # The converted -hf checkpoint loads cleanly and computes what the source model does.
    converted = _load_checked(tmp_path / "hf2")
    assert converted.dtype == variant["dtype"]
    torch.testing.assert_close(_logits(converted, converted.config), _logits(source, source.config))
    # Converted in memory (no disk copy): the same tensors, the same logits.
    in_memory = load_original(tmp_path / "orig1")
    assert in_memory.dtype == variant["dtype"]
    assert_identical(in_memory.state_dict(), converted.state_dict())
    torch.testing.assert_close(_logits(in_memory, in_memory.config), _logits(source, source.config))


def test_a_shard_holding_only_a_qkv_piece_keeps_the_shard_count(tmp_path: Path) -> None:
    """A shard whose only tensor is one layer's k_proj gets that layer's fused qkv (not an empty file)."""
    from safetensors.torch import save_file

    _random_checkpoint(tmp_path / "single", VARIANTS["vit300m_mqa"])
    tensors = load_tensors(tmp_path / "single")
    lonely = "vision_tower.encoder.layer.0.attention.k_proj.weight"
    src = tmp_path / "hf0"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tmp_path / "single" / name).read_bytes())
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: t for k, t in tensors.items() if k != lonely}, src / files[0], metadata={"format": "pt"})
    save_file({lonely: tensors[lonely]}, src / files[1], metadata={"format": "pt"})
    weight_map = {k: files[k == lonely] for k in tensors}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    convert(src, tmp_path / "orig", "original")
    assert shard_files(tmp_path / "orig") == files
    orig_map = json.loads((tmp_path / "orig" / "model.safetensors.index.json").read_text())["weight_map"]
    assert orig_map["vision_model.encoder.layers.0.attn.qkv.weight"] == files[1]
    convert(tmp_path / "orig", tmp_path / "hf", "hf")
    assert shard_files(tmp_path / "hf") == files
    assert_identical(tensors, load_tensors(tmp_path / "hf"))


# -- real sizes, names and shapes only -------------------------------------------------------------------


def expected_original_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an original InternVLChatModel (InternVisionModel + mlp1 + Qwen2ForCausalLM) and its
    shape, written from the original modeling code, not from the converter."""
    v, t = config["vision_config"], config["llm_config"]
    vh, lh = v["hidden_size"], t["hidden_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, vh),
        "vision_model.embeddings.position_embedding": (1, patches + 1, vh),
        "vision_model.embeddings.patch_embedding.weight": (vh, 3, v["patch_size"], v["patch_size"]),
        "vision_model.embeddings.patch_embedding.bias": (vh,),
    }
    norms = ("weight", "bias") if v["norm_type"] == "layer_norm" else ("weight",)
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        shapes[p + "attn.qkv.weight"] = (3 * vh, vh)
        if v["qkv_bias"]:
            shapes[p + "attn.qkv.bias"] = (3 * vh,)
        if v["qk_normalization"]:
            shapes[p + "attn.q_norm.weight"] = shapes[p + "attn.k_norm.weight"] = (vh,)
        shapes[p + "attn.proj.weight"], shapes[p + "attn.proj.bias"] = (vh, vh), (vh,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (
            (v["intermediate_size"], vh),
            (v["intermediate_size"],),
        )
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (vh, v["intermediate_size"]), (vh,)
        for n in ("norm1", "norm2"):
            for part in norms:
                shapes[f"{p}{n}.{part}"] = (vh,)
        shapes[p + "ls1"] = shapes[p + "ls2"] = (vh,)
    shuffled = vh * int(1 / config["downsample_ratio"]) ** 2
    shapes.update({"mlp1.0.weight": (shuffled,), "mlp1.0.bias": (shuffled,)})
    shapes.update({"mlp1.1.weight": (lh, shuffled), "mlp1.1.bias": (lh,)})
    shapes.update({"mlp1.3.weight": (lh, lh), "mlp1.3.bias": (lh,)})
    head_dim = lh // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * head_dim
    shapes["language_model.model.embed_tokens.weight"] = (t["vocab_size"], lh)
    shapes["language_model.model.norm.weight"] = (lh,)
    shapes["language_model.lm_head.weight"] = (t["vocab_size"], lh)
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        for proj, rows in (("q", t["num_attention_heads"] * head_dim), ("k", kv), ("v", kv)):
            shapes[f"{p}self_attn.{proj}_proj.weight"], shapes[f"{p}self_attn.{proj}_proj.bias"] = (
                (rows, lh),
                (rows,),
            )
        shapes[p + "self_attn.o_proj.weight"] = (lh, lh)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (t["intermediate_size"], lh)
        shapes[p + "mlp.down_proj.weight"] = (lh, t["intermediate_size"])
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (lh,)
    return shapes


@pytest.mark.parametrize("size", ["1b", "2b", "8b", "14b", "38b", "78b"])
def test_real_sizes_map_to_the_original_shapes_and_back(size: str) -> None:
    from vlmtune.train.runtime.config import model_preset

    model = build_model_on_meta(model_preset(f"internvl3_{size}"))
    hf = dict(model.state_dict())  # meta tensors: names and shapes only
    original_config = original_config_from_hf(model.config.to_dict())
    orig = dict(hf_to_original(hf.items()))
    assert {k: tuple(t.shape) for k, t in orig.items()} == expected_original_shapes(original_config)
    total = count_parameters(model)["total"]
    assert sum(t.numel() for t in orig.values()) == sum(t.numel() for t in hf.values()) == total
    if size == "38b":
        assert total == pytest.approx(38.39e9, rel=0.005)
        assert orig["vision_model.encoder.layers.0.attn.qkv.weight"].shape == (3 * 3200, 3200)
        assert orig["mlp1.1.weight"].shape == (5120, 3200 * 4)
    back = dict(original_to_hf(orig.items(), on_disk=False))
    assert {k: tuple(t.shape) for k, t in back.items()} == {k: tuple(t.shape) for k, t in hf.items()}
    # The config round trip builds the same model.
    rebuilt_config = InternVLConfig(**hf_config_from_original(original_config))
    with torch.device("meta"):
        rebuilt = InternVLForConditionalGeneration(rebuilt_config)
    assert {k: tuple(t.shape) for k, t in rebuilt.state_dict().items()} == {
        k: tuple(t.shape) for k, t in hf.items()
    }
    assert rebuilt_config.image_token_id == model.config.image_token_id
    assert rebuilt_config.image_seq_length == 256 and rebuilt_config.tie_word_embeddings is False
    assert rebuilt_config.text_config.rope_parameters == model.config.text_config.rope_parameters


# The config.json of OpenGVLab/InternVL3-1B(-Pretrained) as published (values as printed by its
# InternVLChatConfig, trimmed of 4.x bookkeeping): what the original trainer reads and writes.
PUBLISHED_1B = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "image_fold": None,
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "pad2square": False,
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internvl2_5",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": True,
    "llm_config": {
        "_name_or_path": "./pretrained/Qwen2.5-32B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 70,
        "model_type": "qwen2",
        "moe_config": None,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "use_bfloat16": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151674,
    },
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": 448,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_experts": 8,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
        "use_flash_attn": False,
        "use_moe": False,
    },
}


def test_published_1b_config_builds_the_preset_model_and_round_trips() -> None:
    from vlmtune.train.model.original_format import dropped_original_settings, serving_settings
    from vlmtune.train.runtime.config import model_preset

    hf = hf_config_from_original(PUBLISHED_1B)
    config = InternVLConfig(**hf)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    preset = build_model_on_meta(model_preset("internvl3_1b"))
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert shapes == {k: tuple(t.shape) for k, t in preset.state_dict().items()}
    assert count_parameters(model)["total"] == pytest.approx(0.938e9, rel=0.005)
    assert (config.image_token_id, config.image_seq_length, config.tie_word_embeddings) == (
        151667,
        256,
        False,
    )
    assert config.text_config.rope_parameters["rope_type"] == "dynamic"
    assert config.text_config.rope_parameters["factor"] == 2.0
    assert config.text_config.eos_token_id == 151643  # carried as published, not rewritten
    assert (config.vision_config.attention_bias, config.vision_config.use_qk_norm) == (True, False)
    assert config.vision_config.norm_type == "layer_norm" and config.vision_feature_layer == -1
    serving = serving_settings(PUBLISHED_1B)
    assert (serving["image_size"], serving["max_dynamic_patch"], serving["use_thumbnail"]) == (448, 12, True)
    assert serving["template"] == "internvl2_5"
    # Settings with no -hf or serving meaning are named, not silently lost (4.x bookkeeping is not).
    dropped = dropped_original_settings(PUBLISHED_1B)
    assert dropped == [
        "image_fold",
        "llm_config.moe_config",
        "vision_config.num_experts",
        "vision_config.use_moe",
    ]
    back = original_config_from_hf(hf, serving)
    for key in ("downsample_ratio", "select_layer", "ps_version", "template", "force_image_size"):
        assert back[key] == PUBLISHED_1B[key], key
    for key in ("max_dynamic_patch", "min_dynamic_patch", "use_thumbnail", "dynamic_image_size"):
        assert back[key] == PUBLISHED_1B[key], key
    # Back to the original: every published value again but 4.x bookkeeping and the unused MoE knobs.
    for section, lost in (
        ("llm_config", {"_name_or_path", "use_bfloat16"}),
        ("vision_config", {"num_experts", "use_moe"}),
    ):
        differ = {k for k, v in PUBLISHED_1B[section].items() if back[section].get(k, None) != v}
        assert differ == lost, section
    assert back["llm_config"]["rope_scaling"] == PUBLISHED_1B["llm_config"]["rope_scaling"]
    assert back["vision_config"]["use_flash_attn"] is False  # carried through the serving settings


# -- refusals ---------------------------------------------------------------------------------------------


def _original_config(architecture: str, model_type: str) -> dict:
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "ps_version": "v2",
        "downsample_ratio": 0.5,
        "llm_config": {"architectures": [architecture], "model_type": model_type, "vocab_size": 92553},
        "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": 32, "image_size": 28},
    }


@pytest.mark.parametrize(
    "architecture,model_type,named",
    [
        ("InternLM2ForCausalLM", "internlm2", "InternLM2"),
        ("InternLM3ForCausalLM", "internlm3", "InternLM3"),
        ("LlamaForCausalLM", "llama", "Llama"),
    ],
)
def test_non_qwen2_llms_are_refused(architecture: str, model_type: str, named: str, tmp_path: Path) -> None:
    config = _original_config(architecture, model_type)
    with pytest.raises(ValueError, match=named):
        hf_config_from_original(config)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        convert(src, tmp_path / "dst", "hf")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()


def test_hf_side_refusals() -> None:
    with pytest.raises(ValueError, match="llama"):
        original_config_from_hf({"text_config": {"model_type": "llama"}, "vision_config": {}})
    config = _original_config("Qwen2ForCausalLM", "qwen2")
    config["ps_version"] = "v1"
    with pytest.raises(ValueError, match="ps_version"):
        hf_config_from_original(config)


# -- CLI --------------------------------------------------------------------------------------------------


def test_cli_round_trip_and_errors(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from vlmtune.train.commands.convert import main

    assert main([str(tiny_model_dir), "--out", str(tmp_path / "orig"), "--to", "original"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["serving"]["max_dynamic_patch"] == 12 and summary["serving"]["image_size"] == 56
    assert main([str(tmp_path / "orig"), "--out", str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert_identical(load_tensors(Path(tiny_model_dir)), load_tensors(tmp_path / "hf"))
    capsys.readouterr()
    # Errors: exit 2, one line naming the file.
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "missing" / "config.json") in err
    assert main([str(tiny_model_dir), "--out", str(tmp_path / "hf2"), "--to", "hf"]) == 2  # already -hf
    assert "config.json" in capsys.readouterr().err
    assert main([str(tiny_model_dir), "--out", str(tmp_path / "hf"), "--to", "original"]) == 2  # not empty
    assert str(tmp_path / "hf") in capsys.readouterr().err


# -- serving the original layout (vLLM's InternVLChatModel): config class, chat template, settings -------

MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "What shape?"},
            {"type": "video"},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
    {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
]


def _render(model_dir: Path, messages: list[dict] = MESSAGES) -> str:
    """The prompt a server builds from the directory's own tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _copy_tiny(tiny_model_dir: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_the_config_class_loads_with_autoconfig(tiny_chain: dict[str, Path]) -> None:
    from transformers import AutoConfig, Qwen2Config

    orig = tiny_chain["orig1"]
    written = json.loads((orig / "config.json").read_text())
    assert (orig / "configuration_internvl_chat.py").is_file()
    config = AutoConfig.from_pretrained(orig, trust_remote_code=True)
    assert type(config).__name__ == "InternVLChatConfig" and config.model_type == "internvl_chat"
    assert type(config.vision_config).__name__ == "InternVisionConfig"
    assert isinstance(config.llm_config, Qwen2Config)
    # What vLLM's InternVLChatModel and its processor read, as config.json says.
    for key in (
        "max_dynamic_patch",
        "min_dynamic_patch",
        "use_thumbnail",
        "dynamic_image_size",
        "force_image_size",
        "downsample_ratio",
        "select_layer",
        "ps_version",
        "template",
    ):
        assert getattr(config, key) == written[key], key
    vision = config.vision_config
    for key in ("hidden_size", "image_size", "patch_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(vision, key) == written["vision_config"][key], key
    for key in ("qkv_bias", "qk_normalization", "norm_type", "layer_norm_eps", "initializer_factor"):
        assert getattr(vision, key) == written["vision_config"][key], key
    llm = config.llm_config
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "eos_token_id"):
        assert getattr(llm, key) == written["llm_config"][key], key
    assert llm.rope_parameters["rope_theta"] == written["llm_config"]["rope_theta"]
    # The class serialises its sub-configs (save_pretrained, vLLM's config hashing).
    as_dict = config.to_dict()
    assert as_dict["vision_config"]["hidden_size"] == vision.hidden_size
    assert as_dict["llm_config"]["hidden_size"] == llm.hidden_size
    json.dumps(as_dict)


def test_the_config_class_refuses_other_llms(tiny_chain: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoConfig

    orig = _copy_tiny(tiny_chain["orig1"], tmp_path / "orig")
    config = json.loads((orig / "config.json").read_text())
    config["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    (orig / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM only"):
        AutoConfig.from_pretrained(orig, trust_remote_code=True)


def test_the_original_template_emits_image_placeholders(tiny_chain: dict[str, Path]) -> None:
    hf_prompt, orig_prompt = _render(tiny_chain["hf0"]), _render(tiny_chain["orig1"])
    assert "<IMG_CONTEXT>\n" in hf_prompt
    assert "<IMG_CONTEXT>" not in orig_prompt
    assert orig_prompt == hf_prompt.replace("<IMG_CONTEXT>\n", "<image>\n")
    assert orig_prompt.count("<image>\n") == 1 and orig_prompt.count("<video>\n") == 1
    assert orig_prompt.startswith("<|im_start|>user\n<image>\nWhat shape?")
    assert orig_prompt.endswith("<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n")
    assert _render(tiny_chain["hf2"]) == hf_prompt  # back to -hf: <IMG_CONTEXT> again


def test_template_rewrite_is_precise_both_newline_spellings() -> None:
    from vlmtune.data.serving import INTERNVL3_HF_CHAT_TEMPLATE
    from vlmtune.train.model.original_format import hf_chat_template, original_chat_template

    real = INTERNVL3_HF_CHAT_TEMPLATE
    escaped = real.replace("\n", "\\n")  # as transformers' convert script's Python source spells it
    for template, newline in ((real, "\n"), (escaped, "\\n")):
        out = original_chat_template(template)
        assert out == template.replace(f"'<IMG_CONTEXT>{newline}'", f"'<image>{newline}'")
        assert hf_chat_template(out) == template
    dashed = real.replace("{% if content['type'] == 'image' %}", '{%- if content["type"] == "image" -%}')
    assert "<image>" in original_chat_template(dashed)
    # Templates of other checkpoints (OpenGVLab's, which take string content) are left as they are.
    plain = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{% endfor %}"
    assert hf_chat_template(plain) == plain
    for bad, what in (
        (plain, "0 image parts"),
        (real + real, "2 image parts"),
        (real.replace("{{ content['text'] }}", "{{ content['text'] }}{{ '<IMG_CONTEXT>' }}"), "outside"),
    ):
        with pytest.raises(ValueError, match=what):
            original_chat_template(bad)


def test_a_template_without_the_image_part_is_refused_before_writing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    src = _copy_tiny(tiny_model_dir, tmp_path / "hf")
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: the chat template has 0 image parts"):
        convert(src, tmp_path / "orig", "original")
    assert not (tmp_path / "orig").exists() and not (tmp_path / "orig.partial").exists()


def test_the_default_system_prompt_is_kept_and_set_in_the_config(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from vlmtune.data.serving import chat_template_with_system
    from vlmtune.train.model.original_format import template_system_prompt

    prompt = 'You are "Tiny".\nAnswer in one word, 你好.'
    src = _copy_tiny(tiny_model_dir, tmp_path / "hf")
    template = chat_template_with_system((src / "chat_template.jinja").read_text(), prompt)
    (src / "chat_template.jinja").write_text(template)
    assert template_system_prompt(template) == prompt
    summary = convert(src, tmp_path / "orig", "original")
    assert summary["serving"]["system_message"] == prompt
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert config["system_message"] == prompt
    hf_prompt, orig_prompt = _render(src), _render(tmp_path / "orig")
    assert orig_prompt.startswith(f"<|im_start|>system\n{prompt}<|im_end|>\n<|im_start|>user\n<image>\n")
    assert orig_prompt == hf_prompt.replace("<IMG_CONTEXT>\n", "<image>\n")
    own_system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *MESSAGES]
    assert _render(tmp_path / "orig", own_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    convert(tmp_path / "orig", tmp_path / "back", "hf")
    assert (tmp_path / "back" / "chat_template.jinja").read_text() == template


def test_json_stored_templates_are_rewritten_too(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A template in chat_template.json or tokenizer_config.json (a named list too) is rewritten like
    chat_template.jinja, so no file a server may read still says <IMG_CONTEXT>."""
    src = _copy_tiny(tiny_model_dir, tmp_path / "hf")
    template = (src / "chat_template.jinja").read_text()
    (src / "chat_template.jinja").unlink()
    (src / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["chat_template"] = [{"name": "default", "template": template}, {"name": "tool_use", "template": "x"}]
    (src / "tokenizer_config.json").write_text(json.dumps(tok))
    summary = convert(src, tmp_path / "orig", "original")
    assert summary["chat_template_rewritten"] == ["chat_template.json", "tokenizer_config.json"]
    expected = template.replace("'<IMG_CONTEXT>\n'", "'<image>\n'")
    assert json.loads((tmp_path / "orig" / "chat_template.json").read_text())["chat_template"] == expected
    written = json.loads((tmp_path / "orig" / "tokenizer_config.json").read_text())
    assert written["chat_template"] == [
        {"name": "default", "template": expected},
        {"name": "tool_use", "template": "x"},
    ]
    assert {k: v for k, v in written.items() if k != "chat_template"} == {
        k: v for k, v in tok.items() if k != "chat_template"
    }


@pytest.mark.parametrize(
    "image_processor,expected",
    [
        # the demo's: one tile per image, no cropping
        (
            {"max_patches": 1, "min_patches": 1, "crop_to_patches": False},
            {"max_dynamic_patch": 1, "min_dynamic_patch": 1, "dynamic_image_size": False},
        ),
        (
            {"max_patches": 6, "min_patches": 2, "crop_to_patches": True},
            {"max_dynamic_patch": 6, "min_dynamic_patch": 2, "dynamic_image_size": True},
        ),
    ],
)
def test_the_processor_tiling_is_carried_into_the_config(
    tiny_model_dir: Path, tmp_path: Path, image_processor: dict, expected: dict
) -> None:
    from transformers import AutoConfig

    src = _copy_tiny(tiny_model_dir, tmp_path / "hf")
    processor = json.loads((src / "processor_config.json").read_text())
    processor["image_processor"].update(image_processor)
    (src / "processor_config.json").write_text(json.dumps(processor))
    convert(src, tmp_path / "orig", "original")
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    expected = {**expected, "use_thumbnail": True, "force_image_size": 56}
    assert {k: config[k] for k in expected} == expected
    assert config["vision_config"]["image_size"] == 56  # the tile vLLM's InternVL processor cuts
    loaded = AutoConfig.from_pretrained(tmp_path / "orig", trust_remote_code=True)
    assert {k: getattr(loaded, k) for k in expected} == expected


def test_check_data_reads_the_card_layout_as_the_hf_one(tiny_chain: dict[str, Path]) -> None:
    from vlmtune.train.commands.check_data import load_tokenizer

    _, size, per_tile = load_tokenizer(str(tiny_chain["orig1"]))
    assert (size, per_tile) == load_tokenizer(str(tiny_chain["hf0"]))[1:]
