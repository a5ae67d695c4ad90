"""The model presets' non-parameter fields (norms, epsilons, RoPE, position range, tying, token ids) against
the published InternVL3 -hf configs, for the values that can be confirmed from sources available offline.

tests/train/model/test_build.py checks the shapes (parameter counts reproduce the published totals); a
wrong epsilon, norm type, RoPE base or tying changes no count, so it is checked here, on the
`InternVLConfig` the preset builds (what the model really gets), not on the yaml alone.

Sources (S_*) and the reasoning from them:

* S_CARD: the InternVL3-38B model card (../shared/reference/internvl3-38b-model-card.zh.txt): 448x448 tiles,
  pixel shuffle to a quarter of the visual tokens (downsample ratio 0.5), InternViT-6B-448px-V2_5 + Qwen2.5-32B.
* S_TABLE: InternVL3's model table (InternVL README): InternViT-300M-448px-V2_5 for 1B/2B/8B/9B/14B,
  InternViT-6B-448px-V2_5 for 38B/78B; InternLM3-8B-instruct for 9B, Qwen2.5 for the others.
* S_1B: OpenGVLab/InternVL3-1B's config as loaded by transformers (printed in shivangjhalani/multicoco,
  InternVL3-1B_data.md): llm_config rope_theta 1e6, rope_scaling dynamic x2.0, rms_norm_eps 1e-6,
  max_position_embeddings 32768, vocab 151674, bos 151643; vision_config layer_norm, eps 1e-6,
  qk_normalization false, qkv_bias true, gelu, 448 px, patch 14; select_layer -1; mlp1 with GELU.
* S_CONVERT: transformers' convert_internvl_weights_to_hf.py (which wrote the -hf checkpoints): llm_config and
  vision_config passed through (qkv_bias -> attention_bias, qk_normalization -> use_qk_norm),
  use_absolute_position_embeddings forced true, eos_token_id forced to 151645 for InternVL3 on Qwen,
  image_token_id 151667 for Qwen LMs, Qwen2Config for all but 9B (LlamaConfig). downsample_ratio,
  projector_hidden_act and vision_feature_layer are not passed: the -hf configs hold InternVLConfig's
  defaults (0.5, gelu, -1); layer_scale_init_value is not in InternViT's config: InternVLVisionConfig's 0.1.
* S_CHAT: InternVL's configuration_internvl_chat.py: ``tie_word_embeddings=False for models of all sizes``,
  written into llm_config too (so the -hf text_config is untied for every size).
* S_VIT6B: InternVL's configuration_intern_vit.py, whose defaults are InternViT-6B's architecture: rms_norm,
  qk_normalization true, qkv_bias false, layer_norm_eps 1e-6, patch 14 (the V2_5 tower kept the
  architecture; its own config.json is not available here).

Not confirmed here, so not asserted (reported in UNCONFIRMED): the Qwen2.5 LLM fields of 2B/8B/14B/38B/78B
(rope_theta, rms_norm_eps, max_position_embeddings, rope_scaling, vocab, bos: their llm_configs are not
available; the presets' comments note the Instruct vs base 1e-6 / 1e-5 question) and every InternLM3 field of
9B (rope_theta 5e7, dynamic x6.0, rms_norm_eps 1e-5, head_dim 128, vocab 128512, its image token id).
"""

from __future__ import annotations

import pytest

from vlmtune.train.model.build import build_internvl_config
from vlmtune.train.runtime.config import model_preset

SMALL_VIT = ("internvl3_1b", "internvl3_2b", "internvl3_8b", "internvl3_9b", "internvl3_14b")  # S_TABLE
LARGE_VIT = ("internvl3_38b", "internvl3_78b")  # S_TABLE, S_CARD
PRESETS = SMALL_VIT + LARGE_VIT
QWEN = tuple(p for p in PRESETS if p != "internvl3_9b")  # S_TABLE, S_CONVERT

COMMON = {  # every size (S_CARD, S_CONVERT)
    "downsample_ratio": 0.5,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "tie_word_embeddings": False,  # S_CHAT
    "text_config.tie_word_embeddings": False,  # S_CHAT (llm_config) through S_CONVERT
    "vision_config.image_size": (448, 448),
    "vision_config.patch_size": (14, 14),
    "vision_config.hidden_act": "gelu",
    "vision_config.use_absolute_position_embeddings": True,
    "vision_config.layer_scale_init_value": 0.1,
}
INTERNVIT_300M = {  # S_1B's vision_config, renamed by S_CONVERT; one tower for all five sizes (S_TABLE)
    "vision_config.norm_type": "layer_norm",
    "vision_config.layer_norm_eps": 1e-6,
    "vision_config.use_qk_norm": False,
    "vision_config.attention_bias": True,
}
INTERNVIT_6B = {  # S_VIT6B, renamed by S_CONVERT
    "vision_config.norm_type": "rms_norm",
    "vision_config.layer_norm_eps": 1e-6,
    "vision_config.use_qk_norm": True,
    "vision_config.attention_bias": False,
}
QWEN_LM = {  # S_CONVERT
    "text_config.model_type": "qwen2",
    "text_config.eos_token_id": 151645,
    "image_token_id": 151667,
}
INTERNVL3_1B_LM = {  # S_1B
    "text_config.rope_parameters.rope_theta": 1e6,
    "text_config.rope_parameters.rope_type": "dynamic",
    "text_config.rope_parameters.factor": 2.0,
    "text_config.rms_norm_eps": 1e-6,
    "text_config.max_position_embeddings": 32768,
    "text_config.vocab_size": 151674,
    "text_config.bos_token_id": 151643,
    "text_config.hidden_act": "silu",
}
UNCONFIRMED = {
    **{
        p: [
            "text_config.rope_parameters.rope_theta",
            "text_config.rms_norm_eps",
            "text_config.max_position_embeddings",
            "text_config.rope_scaling (absent)",
            "text_config.vocab_size",
            "text_config.bos_token_id",
        ]
        for p in QWEN
        if p != "internvl3_1b"
    },
    "internvl3_9b": [
        "text_config.rope_parameters (rope_theta 5e7, dynamic x6.0)",
        "text_config.rms_norm_eps",
        "text_config.head_dim",
        "text_config.vocab_size",
        "text_config.eos_token_id",
        "image_token_id (S_CONVERT writes 92546 for a Llama-type LM, InternLM2's id; the preset reads it from the tokenizer)",
    ],
}


def expected_fields(preset: str) -> dict[str, object]:
    fields = dict(COMMON)
    fields.update(INTERNVIT_300M if preset in SMALL_VIT else INTERNVIT_6B)
    if preset in QWEN:
        fields.update(QWEN_LM)
    else:
        fields["text_config.model_type"] = "llama"  # S_CONVERT: LM_TYPE_CORRESPONDENCE
    if preset == "internvl3_1b":
        fields.update(INTERNVL3_1B_LM)
    return fields


MISSING = "<missing>"


def _get(config: object, path: str) -> object:
    value = config
    for part in path.split("."):
        value = value.get(part, MISSING) if isinstance(value, dict) else getattr(value, part, MISSING)
        if value is MISSING:
            return MISSING
    return tuple(value) if isinstance(value, list) else value


@pytest.fixture(scope="module")
def built():
    return {p: build_internvl_config(model_preset(p), require_image_token=False) for p in PRESETS}


def test_every_internvl3_preset_is_covered():
    from pathlib import Path

    from vlmtune.configs import CONFIG_DIR

    on_disk = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("internvl3_*.yaml"))
    assert on_disk == sorted(PRESETS)
    assert set(UNCONFIRMED) <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_fields_match_the_published_config(built, preset):
    config = built[preset]
    wrong = {}
    for path, value in expected_fields(preset).items():
        got = _get(config, path)
        if not (got == value or (isinstance(value, float) and got == pytest.approx(value, rel=1e-9))):
            wrong[path] = (got, value)
    assert not wrong, f"{preset}: (preset's, published) {wrong}"
