"""Convert between the original InternVL checkpoint layout and transformers' native ``-hf`` layout.

The original layout is what OpenGVLab publishes (OpenGVLab/InternVL3-38B) and what the official trainer
writes: an ``InternVLChatModel`` (remote code) with tensors ``vision_model.*`` (InternViT, fused ``attn.qkv``),
``mlp1.*`` (LayerNorm -> Linear -> GELU -> Linear) and ``language_model.*`` (Qwen2ForCausalLM), and a
config.json with ``llm_config`` / ``vision_config`` plus chat and tiling settings. The ``-hf`` layout is
``InternVLForConditionalGeneration`` (transformers 5): separate ``q_proj/k_proj/v_proj`` in the vision tower,
a ``multi_modal_projector`` and the LLM under ``model.language_model`` / ``lm_head`` in memory, saved on disk
as ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``.

Both directions read config.json and the safetensors as data (no remote code, no pickle: JSON headers and
the byte ranges they give) and go tensor by tensor: a converted tensor is the source tensor's bytes
(renamed, or a third of / three fused into the vision qkv), so a round trip is bit-identical, and at most
one output tensor is in memory at a time. Only Qwen2 LLMs convert (InternVL3 1B/2B/8B/14B/38B/78B):
InternLM2/InternLM3/Llama LLMs have other key and config maps, and are refused rather than half converted.

An original-layout output serves in vLLM through vLLM's own `InternVLChatModel`: config.json carries the
run's tiling (from the -hf processor files), the default system prompt of the chat template
(``system_message``) and an ``auto_map`` to a small `InternVLChatConfig` class written next to it
(`CONFIG_CLASS_SOURCE`: config only, loaded with trust_remote_code=True), and the chat template's image
part emits ``<image>``, the placeholder vLLM's InternVL processor expands (the -hf ``<IMG_CONTEXT>`` is
rewritten back on the way to -hf).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
ORIGINAL_MODEL_TYPE = "internvl_chat"
HF_ARCHITECTURE = "InternVLForConditionalGeneration"
HF_MODEL_TYPE = "internvl"

#: InternVL3's <IMG_CONTEXT> id in its Qwen2.5 vocabulary of 151674 (what transformers' own conversion uses).
QWEN2_IMAGE_TOKEN_ID = 151667
QWEN2_INTERNVL_VOCAB = 151674

#: Files copied as they are: the tokenizer, chat template and generation settings (not the processor:
#: the caller writes it from the serving settings the conversion returns).
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vlmtune.json",  # the data settings a vlmtune run trained with: `vlmtune eval` prompts as training did
)

#: The original layout's config class, written next to its config.json (config.json's ``auto_map`` names
#: it): engines with an `InternVLChatModel` of their own (vLLM) read the config through it with
#: trust_remote_code=True. Config only, no modeling code; Qwen2 LLMs only, as this module converts.
CONFIG_CLASS_FILE = "configuration_internvl_chat.py"
AUTO_MAP = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}
CONFIG_CLASS_SOURCE = '''\
"""InternVLChatConfig of an InternVL checkpoint in the original layout with a Qwen2 LLM, written by
vlmtune's converter (vlmtune convert --to original). As OpenGVLab's configuration_internvl_chat.py:
`vision_config` an InternVisionConfig, `llm_config` a Qwen2Config. The config only: engines with an
InternVLChatModel of their own (vLLM) read it with trust_remote_code=True."""

from transformers import PretrainedConfig, Qwen2Config


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels=3,
        patch_size=14,
        image_size=224,
        qkv_bias=False,
        hidden_size=3200,
        num_attention_heads=25,
        intermediate_size=12800,
        qk_normalization=True,
        num_hidden_layers=48,
        use_flash_attn=True,
        hidden_act="gelu",
        norm_type="rms_norm",
        layer_norm_eps=1e-6,
        dropout=0.0,
        drop_path_rate=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        use_backbone_lora=0,
        use_llm_lora=0,
        select_layer=-1,
        force_image_size=None,
        downsample_ratio=0.5,
        template=None,
        dynamic_image_size=False,
        use_thumbnail=False,
        ps_version="v1",
        min_dynamic_patch=1,
        max_dynamic_patch=6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(vision_config, InternVisionConfig):
            vision_config = InternVisionConfig(**(vision_config or {}))
        if not isinstance(llm_config, Qwen2Config):
            llm_config = dict(llm_config or {"architectures": ["Qwen2ForCausalLM"]})
            architecture = (llm_config.get("architectures") or ["Qwen2ForCausalLM"])[0]
            if architecture != "Qwen2ForCausalLM":
                raise ValueError(f"llm_config is {architecture}: this config class takes Qwen2ForCausalLM only")
            llm_config = Qwen2Config(**llm_config)
        self.vision_config = vision_config
        self.llm_config = llm_config
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def to_dict(self):
        output = super().to_dict()
        for key in ("vision_config", "llm_config"):
            if isinstance(output.get(key), PretrainedConfig):
                output[key] = output[key].to_dict()
        return output
'''

#: The image part of an -hf chat template (transformers' InternVL3-hf template, vlmtune's exports): an
#: image content part rendered as ``<IMG_CONTEXT>`` and a newline (a real one or Jinja's ``\\n``), the
#: token transformers' InternVLProcessor expands. vLLM's InternVL processor expands ``<image>`` instead
#: (to ``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>``), as the original model's chat() does; given
#: ``<IMG_CONTEXT>`` it fails with "Failed to apply prompt replacement".
_IMAGE_PART = (
    r"(?P<head>\{%-?\s*(?:el)?if\s+content\[(?P<q1>['\"])type(?P=q1)\]\s*==\s*(?P<q2>['\"])image(?P=q2)\s*-?%\}"
    r"\s*\{\{-?\s*(?P<q3>['\"]))TOKEN(?P<newline>\n|\\n)(?P=q3)"
)
HF_IMAGE_TOKEN = "<IMG_CONTEXT>"
ORIGINAL_IMAGE_TOKEN = "<image>"
# ---------------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------------

_QWEN2_SUFFIX = (
    r"embed_tokens\.weight|norm\.weight"
    r"|layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(?:weight|bias)"
    r"|layers\.\d+\.(?:input|post_attention)_layernorm\.weight"
)
_PLACEHOLDERS = {
    "i": r"\d+",
    "p": r"weight|bias",
    "fc": r"fc1|fc2",
    "qk": r"q|k",
    "x": r"q|k|v",
    "llm": _QWEN2_SUFFIX,
}

_V, _H = "vision_model.encoder.layers.{i}.", "model.vision_tower.encoder.layer.{i}."

#: (original name, in-memory -hf name) templates, one tensor each; `{i}` a layer, `{p}` weight|bias.
_RULES: tuple[tuple[str, str], ...] = (
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (
        "vision_model.embeddings.patch_embedding.{p}",
        "model.vision_tower.embeddings.patch_embeddings.projection.{p}",
    ),
    (_V + "ls1", _H + "lambda_1"),
    (_V + "ls2", _H + "lambda_2"),
    (_V + "norm1.{p}", _H + "layernorm_before.{p}"),
    (_V + "norm2.{p}", _H + "layernorm_after.{p}"),
    (_V + "attn.proj.{p}", _H + "attention.projection_layer.{p}"),
    (_V + "attn.{qk}_norm.weight", _H + "attention.{qk}_norm.weight"),
    (_V + "mlp.{fc}.{p}", _H + "mlp.{fc}.{p}"),
    ("mlp1.0.{p}", "model.multi_modal_projector.layer_norm.{p}"),
    ("mlp1.1.{p}", "model.multi_modal_projector.linear_1.{p}"),
    ("mlp1.3.{p}", "model.multi_modal_projector.linear_2.{p}"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("language_model.model.{llm}", "model.language_model.{llm}"),
)
#: The fused vision qkv: one original tensor, three -hf ones (`{x}` q, k, v: thirds along dim 0, in order).
_QKV_RULE = (_V + "attn.qkv.{p}", _H + "attention.{x}_proj.{p}")
_QKV_ORDER = ("q", "k", "v")

#: In-memory -hf prefix -> on-disk prefix (transformers 5 renames on save; the published -hf files use these).
_DISK_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile(
        "".join(
            re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})"
            for k, part in enumerate(parts)
        )
    )


_FORWARD = [(_compile(o), h) for o, h in _RULES]
_BACKWARD = [(_compile(h), o) for o, h in _RULES]
_QKV_FORWARD = _compile(_QKV_RULE[0])
_QKV_BACKWARD = _compile(_QKV_RULE[1])


def to_memory_key(hf_key: str) -> str:
    """The in-memory name (``model.vision_tower.*`` ...) of an -hf tensor named either way."""
    for memory, disk in _DISK_PREFIXES:
        if hf_key.startswith(disk):
            return memory + hf_key[len(disk) :]
    return hf_key


def to_disk_key(hf_key: str) -> str:
    """The on-disk name (``vision_tower.*``, ``language_model.model.*`` ...) of an -hf tensor named either way."""
    key = to_memory_key(hf_key)
    for memory, disk in _DISK_PREFIXES:
        if key.startswith(memory):
            return disk + key[len(memory) :]
    return key


def hf_keys(original_key: str) -> list[tuple[str, int | None]]:
    """The in-memory -hf name(s) of an original tensor: ``[(name, None)]``, or for the fused vision qkv
    ``[(q, 0), (k, 1), (v, 2)]`` (which third along dim 0). Unknown names raise: nothing is passed through
    unmapped, so a checkpoint of another architecture cannot come out half converted."""
    m = _QKV_FORWARD.fullmatch(original_key)
    if m:
        return [(_QKV_RULE[1].format(x=x, **m.groupdict()), n) for n, x in enumerate(_QKV_ORDER)]
    for pattern, target in _FORWARD:
        m = pattern.fullmatch(original_key)
        if m:
            return [(target.format(**m.groupdict()), None)]
    raise ValueError(
        f"tensor {original_key!r} has no -hf counterpart (InternVL3 layout: InternViT vision_model.*, "
        "mlp1.{0,1,3}.*, Qwen2 language_model.*)"
    )


def original_key(hf_key: str) -> tuple[str, int | None]:
    """(original name, which third of the fused vision qkv or None) of an -hf tensor, either spelling."""
    key = to_memory_key(hf_key)
    m = _QKV_BACKWARD.fullmatch(key)
    if m:
        groups = m.groupdict()
        third = _QKV_ORDER.index(groups.pop("x"))
        return _QKV_RULE[0].format(**groups), third
    for pattern, target in _BACKWARD:
        m = pattern.fullmatch(key)
        if m:
            return target.format(**m.groupdict()), None
    raise ValueError(
        f"tensor {hf_key!r} has no counterpart in the original InternVL layout (e.g. a mask token, a "
        "vision post-layernorm, peft/LoRA wrappers, or a non-Qwen2 LLM)"
    )


def original_to_hf(
    tensors: Iterable[tuple[str, torch.Tensor]], *, on_disk: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream original tensors as -hf ones, one source tensor at a time (the vision qkv split in three).

    Works on meta tensors too (names and shapes only). ``on_disk``: the published on-disk names
    (``vision_tower.*``, ``language_model.model.*``), else transformers' in-memory ones.
    """
    for key, tensor in tensors:
        targets = hf_keys(key)
        if len(targets) == 1:
            name, _ = targets[0]
            yield (to_disk_key(name) if on_disk else name), tensor
            continue
        if tensor.shape[0] % 3:
            raise ValueError(f"tensor {key!r}: dim 0 is {tensor.shape[0]}, not divisible into q, k, v thirds")
        third = tensor.shape[0] // 3
        for name, n in targets:
            piece = tensor[n * third : (n + 1) * third]
            yield (to_disk_key(name) if on_disk else name), (piece if tensor.is_meta else piece.clone())


class _QKVFuser:
    """Streams -hf tensors as original ones, buffering only the q/k/v pieces of the vision layer(s) whose
    pieces have not all arrived yet (they may sit in different shards)."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}

    def push(self, hf_key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The original tensors that ``(hf_key, tensor)`` completes: one, none (a buffered piece) or a fused qkv."""
        name, third = original_key(hf_key)
        if third is None:
            return [(name, tensor)]
        pieces = self.pending.setdefault(name, {})
        if third in pieces:
            raise ValueError(f"tensor {hf_key!r} appears twice")
        pieces[third] = (hf_key, tensor)
        if len(pieces) < 3:
            return []
        del self.pending[name]
        parts = [pieces[n][1] for n in range(3)]
        if len({(p.shape, p.dtype) for p in parts}) != 1:
            shapes = {pieces[n][0]: (tuple(p.shape), str(p.dtype)) for n, p in enumerate(parts)}
            raise ValueError(f"q/k/v of {name!r} differ in shape or dtype: {shapes}")
        return [(name, torch.cat(parts, dim=0))]

    def finish(self) -> None:
        """Raise if a layer's q, k or v never came (a truncated checkpoint)."""
        if self.pending:
            name, pieces = next(iter(self.pending.items()))
            missing = [_QKV_ORDER[n] for n in range(3) if n not in pieces]
            raise ValueError(f"{name!r}: the -hf checkpoint lacks the {'/'.join(missing)}_proj piece(s)")


def hf_to_original(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream -hf tensors (either spelling) as original ones, fusing each vision layer's q/k/v into
    ``attn.qkv`` (only that layer's three pieces are buffered). Works on meta tensors too."""
    fuser = _QKVFuser()
    for key, tensor in tensors:
        yield from fuser.push(key, tensor)
    fuser.finish()


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

#: Qwen2Config's own fields (transformers 5), carried between `llm_config` and `text_config`.
_QWEN2_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
#: Bookkeeping every transformers config writes (4.x `PretrainedConfig.to_dict` included generation
#: defaults); not model settings, so not reported when left behind.
_GENERIC_KEYS = frozenset(
    "_name_or_path _attn_implementation_autoset _commit_hash add_cross_attention architectures attn_implementation "
    "auto_map bad_words_ids begin_suppress_tokens chunk_size_feed_forward cross_attention_hidden_size "
    "decoder_start_token_id diversity_penalty do_sample dtype early_stopping encoder_no_repeat_ngram_size "
    "exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id id2label "
    "is_decoder is_encoder_decoder label2id length_penalty max_length min_length model_type "
    "no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions "
    "output_hidden_states output_scores prefix problem_type pruned_heads remove_invalid_values "
    "repetition_penalty return_dict return_dict_in_generate sep_token_id suppress_tokens "
    "task_specific_params temperature tf_legacy_loss tie_encoder_decoder tokenizer_class top_k top_p "
    "torch_dtype torchscript transformers_version typical_p use_bfloat16".split()
)
#: original vision_config name -> InternVLVisionConfig name, with InternVisionConfig's defaults (an
#: absent key means the original default, which is not always transformers' one: qk_normalization=True,
#: norm_type=rms_norm).
_VISION_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("hidden_size", "hidden_size", 3200),
    ("num_hidden_layers", "num_hidden_layers", 48),
    ("num_attention_heads", "num_attention_heads", 25),
    ("intermediate_size", "intermediate_size", 12800),
    ("hidden_act", "hidden_act", "gelu"),
    ("norm_type", "norm_type", "rms_norm"),
    ("layer_norm_eps", "layer_norm_eps", 1e-6),
    ("num_channels", "num_channels", 3),
    ("initializer_range", "initializer_range", 0.02),
    ("qkv_bias", "attention_bias", False),
    ("qk_normalization", "use_qk_norm", True),
    ("initializer_factor", "layer_scale_init_value", 0.1),  # ls1/ls2 init (layer scale)
    ("attention_dropout", "attention_dropout", 0.0),
    ("dropout", "projection_dropout", 0.0),  # InternAttention.proj_drop
)
#: Original vision settings without an -hf meaning (training-only), carried in the serving settings.
_VISION_ORIGINAL_ONLY = ("drop_path_rate", "use_flash_attn")
#: The top-level original settings that `serving_settings` carries (tiling, chat template).
_SERVING_KEYS = (
    "template",
    "system_message",
    "force_image_size",
    "max_dynamic_patch",
    "min_dynamic_patch",
    "use_thumbnail",
    "dynamic_image_size",
    "pad2square",
)
_SERVING_DEFAULTS = {  # InternVL3's (the -hf processor's defaults: 12 tiles + thumbnail, template internvl2_5)
    "template": "internvl2_5",
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "use_thumbnail": True,
    "dynamic_image_size": True,
    "pad2square": False,
}


def _side(value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"{what}={value!r}: the original InternViT takes one square size")


def _llm_kind(llm: dict[str, Any]) -> tuple[str, str]:
    architectures = llm.get("architectures") or ["?"]
    return str(architectures[0]), str(llm.get("model_type", "?"))


def _require_qwen2(llm: dict[str, Any], where: str) -> None:
    architecture, model_type = _llm_kind(llm)
    if architecture != "Qwen2ForCausalLM" or model_type not in ("qwen2", "?"):
        name = architecture.removesuffix("ForCausalLM") if architecture != "?" else model_type
        raise ValueError(
            f"{where} is {name} ({architecture}, model_type {model_type}): only Qwen2 LLMs convert "
            "(InternVL3 1B/2B/8B/14B/38B/78B); InternLM2/InternLM3/Llama LLMs have other tensor names and "
            "configs, so they are refused rather than half converted"
        )


def _rope_parameters(llm: dict[str, Any]) -> dict[str, Any] | None:
    """transformers 5's `rope_parameters` from a 4.x config's `rope_theta` + `rope_scaling`."""
    if llm.get("rope_parameters") is not None:
        return dict(llm["rope_parameters"])
    if "rope_theta" not in llm and llm.get("rope_scaling") is None:
        return None
    params = {k: v for k, v in dict(llm.get("rope_scaling") or {}).items() if k != "type"}
    params.setdefault("rope_type", (llm.get("rope_scaling") or {}).get("type", "default"))
    if "rope_theta" in llm:
        params["rope_theta"] = llm["rope_theta"]
    return params


def _legacy_rope(text: dict[str, Any]) -> dict[str, Any]:
    """4.x's `rope_theta` + `rope_scaling` (with both `type` and `rope_type`, as InternVL3-1B's llm_config)."""
    if text.get("rope_parameters") is None:
        return {k: text[k] for k in ("rope_theta", "rope_scaling") if k in text}
    params = dict(text["rope_parameters"])
    out: dict[str, Any] = {}
    if "rope_theta" in params:
        out["rope_theta"] = params.pop("rope_theta")
    rope_type = params.get("rope_type", "default")
    out["rope_scaling"] = None if rope_type == "default" else {**params, "type": rope_type}
    return out


def _dropped(section: dict[str, Any], kept: Iterable[str], prefix: str) -> list[str]:
    kept = set(kept)
    return [f"{prefix}{k}" for k in sorted(section) if k not in kept and k not in _GENERIC_KEYS]


def _dtype_name(config: dict[str, Any]) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def check_original_config(original: dict[str, Any]) -> None:
    """Raise unless the original config is one this module converts exactly (Qwen2 LLM, pixel shuffle
    v2, no LoRA wrappers in the weights)."""
    if "llm_config" not in original or "vision_config" not in original:
        raise ValueError("config has no llm_config/vision_config: not an original InternVLChatModel config")
    _require_qwen2(original["llm_config"], "llm_config")
    if original.get("ps_version", "v1") != "v2":
        raise ValueError(
            f"ps_version={original.get('ps_version', 'v1')!r}: transformers' InternVL pixel shuffle is v2 "
            "(v1 leaves the feature map transposed), so the -hf model would see different image features"
        )
    for key in ("use_backbone_lora", "use_llm_lora"):
        if original.get(key):
            raise ValueError(f"{key}={original[key]}: the weights are peft-wrapped; merge the LoRA first")


def hf_config_from_original(original: dict[str, Any], *, image_token_id: int | None = None) -> dict[str, Any]:
    """An `InternVLConfig`-compatible dict from an original config.json dict.

    ``downsample_ratio`` and ``select_layer`` (-> ``vision_feature_layer``) are carried; tiling and chat
    settings are not model config in -hf: `serving_settings` returns them. ``image_token_id``: the
    tokenizer's ``<IMG_CONTEXT>`` (the original model reads it from the tokenizer at run time); None takes
    InternVL3's 151667 when the vocabulary is InternVL3's, else raises.
    """
    check_original_config(original)
    llm, vision = original["llm_config"], original["vision_config"]
    text = {k: llm[k] for k in _QWEN2_FIELDS if k in llm}
    rope = _rope_parameters(llm)
    if rope is not None:
        text["rope_parameters"] = rope
    tie = bool(llm.get("tie_word_embeddings", False))  # the LLM's own flag: InternVL3 never ties
    text["tie_word_embeddings"] = tie
    text["model_type"] = "qwen2"
    vis = {hf: vision.get(orig, default) for orig, hf, default in _VISION_FIELDS}
    if "attention_probs_dropout_prob" in vision:  # older InternViT configs
        vis["attention_dropout"] = vis["projection_dropout"] = vision["attention_probs_dropout_prob"]
    image_size = _side(vision.get("image_size", 224), "vision_config.image_size")
    patch_size = _side(vision.get("patch_size", 14), "vision_config.patch_size")
    vis.update(
        image_size=[image_size, image_size],
        patch_size=[patch_size, patch_size],
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        use_mean_pooling=True,  # no post-layernorm: InternViT has none
        hidden_dropout_prob=0.0,
        model_type="internvl_vision",
    )
    if image_token_id is None:
        if text.get("vocab_size") != QWEN2_INTERNVL_VOCAB:
            raise ValueError(
                f"llm_config.vocab_size={text.get('vocab_size')} is not InternVL3's {QWEN2_INTERNVL_VOCAB} "
                "and no tokenizer says which id <IMG_CONTEXT> has"
            )
        image_token_id = QWEN2_IMAGE_TOKEN_ID
    ratio = float(original.get("downsample_ratio", 0.5))
    select_layer = original.get("select_layer", -1)
    tile = original.get("force_image_size") or image_size
    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "text_config": text,
        "vision_config": vis,
        "downsample_ratio": ratio,
        "vision_feature_layer": select_layer,
        "vision_feature_select_strategy": "default",  # drop the CLS token, as extract_feature does
        "projector_hidden_act": "gelu",  # mlp1.2 is nn.GELU()
        "image_token_id": image_token_id,
        "image_seq_length": int(tile // patch_size * ratio) ** 2,
        "tie_word_embeddings": tie,
    }
    dtype = _dtype_name(original) or _dtype_name(llm)
    if dtype is not None:
        config["dtype"] = text["dtype"] = vis["dtype"] = dtype
    return config


def serving_settings(original: dict[str, Any]) -> dict[str, Any]:
    """The original config's processor/chat settings (and training-only vision knobs) that have no place in
    an -hf config.json, for the caller to write the processor from (keys as vlmtune's data settings:
    ``image_size``, ``max_dynamic_patch``, ``min_dynamic_patch``, ``use_thumbnail``) and for
    `original_config_from_hf` to restore. Absent keys take InternVLChatConfig's defaults."""
    vision = original.get("vision_config", {})
    image_size = _side(vision.get("image_size", 224), "vision_config.image_size")
    return {
        "template": original.get("template"),
        "system_message": original.get("system_message"),
        "image_size": int(original.get("force_image_size") or image_size),
        "force_image_size": original.get("force_image_size"),
        "max_dynamic_patch": original.get("max_dynamic_patch", 6),
        "min_dynamic_patch": original.get("min_dynamic_patch", 1),
        "use_thumbnail": original.get("use_thumbnail", False),
        "dynamic_image_size": original.get("dynamic_image_size", False),
        "pad2square": original.get("pad2square", False),
        "vision_config": {k: vision[k] for k in _VISION_ORIGINAL_ONLY if k in vision},
    }


def dropped_original_settings(original: dict[str, Any]) -> list[str]:
    """Model settings of an original config that neither the -hf config nor the serving settings carry
    (e.g. the MoE knobs of other InternVL variants), named so a conversion can say so."""
    llm, vision = original.get("llm_config", {}), original.get("vision_config", {})
    top_kept = {"llm_config", "vision_config", "downsample_ratio", "select_layer", "ps_version"}
    top_kept |= {*_SERVING_KEYS, "use_backbone_lora", "use_llm_lora", "tie_word_embeddings"}
    vision_kept = {o for o, _, _ in _VISION_FIELDS} | set(_VISION_ORIGINAL_ONLY)
    vision_kept |= {"image_size", "patch_size", "attention_probs_dropout_prob"}
    return (
        _dropped(original, top_kept, "")
        + _dropped(llm, (*_QWEN2_FIELDS, *_ROPE_KEYS), "llm_config.")
        + _dropped(vision, vision_kept, "vision_config.")
    )


def check_hf_config(hf: dict[str, Any]) -> None:
    """Raise unless the -hf config has an exact original counterpart."""
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    if text.get("model_type", "qwen2") != "qwen2":
        raise ValueError(
            f"text_config is {text.get('model_type')} (model_type {text.get('model_type')!r}): only Qwen2 LLMs "
            "convert (InternVL3-9B's InternLM3/Llama LLM has another original layout)"
        )
    checks = (
        (hf.get("projector_hidden_act", "gelu") == "gelu", "projector_hidden_act (mlp1 uses nn.GELU)"),
        (hf.get("vision_feature_select_strategy", "default") == "default", "vision_feature_select_strategy"),
        (
            isinstance(hf.get("vision_feature_layer", -1), int),
            "vision_feature_layer (select_layer is one int)",
        ),
        (vision.get("use_absolute_position_embeddings", True), "use_absolute_position_embeddings"),
        (not vision.get("use_mask_token", False), "use_mask_token"),
        (vision.get("use_mean_pooling", True), "use_mean_pooling (InternViT has no post-layernorm)"),
        (not vision.get("hidden_dropout_prob", 0.0), "hidden_dropout_prob (InternViT has no such dropout)"),
    )
    for ok, what in checks:
        if not ok:
            raise ValueError(f"this -hf config's {what} has no counterpart in the original InternVL model")


def original_config_from_hf(hf: dict[str, Any], serving: dict[str, Any] | None = None) -> dict[str, Any]:
    """An original (InternVLChatModel) config.json dict from an -hf config dict plus the serving settings
    (`serving_settings`' keys; absent ones take InternVL3's: template internvl2_5, 12 tiles + thumbnail)."""
    check_hf_config(hf)
    serving = {**_SERVING_DEFAULTS, **{k: v for k, v in (serving or {}).items() if v is not None}}
    text, vision = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
    tie = bool(text.get("tie_word_embeddings", hf.get("tie_word_embeddings", False)))
    dtype = _dtype_name(hf) or _dtype_name(text)
    llm = {k: text[k] for k in _QWEN2_FIELDS if k in text}
    llm.update(_legacy_rope(text))
    llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=tie)
    hf_defaults = {"attention_bias": False, "use_qk_norm": False, "norm_type": "layer_norm"}
    hf_defaults.update(layer_scale_init_value=0.1, hidden_act="gelu", layer_norm_eps=1e-6)
    hf_defaults.update(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    hf_defaults.update(num_channels=3, initializer_range=0.02, attention_dropout=0.0, projection_dropout=0.0)
    vis: dict[str, Any] = {orig: vision.get(name, hf_defaults[name]) for orig, name, _ in _VISION_FIELDS}
    image_size = _side(vision.get("image_size", 448), "vision_config.image_size")
    patch_size = _side(vision.get("patch_size", 14), "vision_config.patch_size")
    vis.update(image_size=image_size, patch_size=patch_size, drop_path_rate=0.0, use_flash_attn=True)
    vis.update(serving.get("vision_config") or {})
    vis.update(architectures=["InternVisionModel"], model_type="intern_vit_6b")
    ratio = float(hf.get("downsample_ratio", 0.5))
    force_image_size = serving.get("force_image_size") or serving.get("image_size") or image_size
    seq = hf.get("image_seq_length")
    if seq is not None and seq != int(force_image_size // patch_size * ratio) ** 2:
        raise ValueError(
            f"image_seq_length={seq} but a {force_image_size}px tile gives "
            f"{int(force_image_size // patch_size * ratio) ** 2} tokens: the processor and the model disagree"
        )
    original: dict[str, Any] = {
        "architectures": [ORIGINAL_ARCHITECTURE],
        "model_type": ORIGINAL_MODEL_TYPE,
        "llm_config": llm,
        "vision_config": vis,
        "template": serving["template"],
        "downsample_ratio": ratio,
        "ps_version": "v2",
        "select_layer": hf.get("vision_feature_layer", -1),
        "force_image_size": int(force_image_size),
        "max_dynamic_patch": serving["max_dynamic_patch"],
        "min_dynamic_patch": serving["min_dynamic_patch"],
        "use_thumbnail": serving["use_thumbnail"],
        "dynamic_image_size": serving["dynamic_image_size"],
        "pad2square": serving["pad2square"],
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": tie,
    }
    if serving.get("system_message") is not None:
        original["system_message"] = serving["system_message"]
    if dtype is not None:
        original["torch_dtype"] = llm["torch_dtype"] = vis["torch_dtype"] = dtype
    return original


# ---------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------


def _swap_image_part(template: str, old: str, new: str) -> tuple[str, int]:
    pattern = re.compile(_IMAGE_PART.replace("TOKEN", re.escape(old)))
    return pattern.subn(lambda m: m["head"] + new + m["newline"] + m["q3"], template)


def original_chat_template(template: str) -> str:
    """An -hf chat template with its image part emitting ``<image>`` instead of ``<IMG_CONTEXT>``
    (everything else, the video part's ``<video>`` and a system-prompt prefix included, unchanged): the
    placeholder vLLM's InternVLChatModel (and the original chat()) expand. Raises unless the template
    has exactly one image part ``{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}`` and
    no other ``<IMG_CONTEXT>``."""
    out, n = _swap_image_part(template, HF_IMAGE_TOKEN, ORIGINAL_IMAGE_TOKEN)
    if n != 1:
        raise ValueError(
            f"the chat template has {n} image parts {{% if content['type'] == 'image' %}}"
            f"{{{{ '{HF_IMAGE_TOKEN}\\n' }}}} (one expected): its image placeholder cannot be rewritten to "
            f"{ORIGINAL_IMAGE_TOKEN}, which the original model's servers (vLLM's InternVLChatModel) expand"
        )
    if HF_IMAGE_TOKEN in out:
        raise ValueError(
            f"the chat template emits {HF_IMAGE_TOKEN} outside its image part: the original model's servers "
            f"expand {ORIGINAL_IMAGE_TOKEN} into image tokens and cannot take a literal {HF_IMAGE_TOKEN}"
        )
    return out


def hf_chat_template(template: str) -> str:
    """The inverse of `original_chat_template` for a template it wrote (one ``<image>`` image part, no
    ``<IMG_CONTEXT>``); any other template (OpenGVLab's own) unchanged."""
    out, n = _swap_image_part(template, ORIGINAL_IMAGE_TOKEN, HF_IMAGE_TOKEN)
    return out if n == 1 and HF_IMAGE_TOKEN not in template else template


def template_system_prompt(template: str | None) -> str | None:
    """The default system prompt a template opens with (`vlmtune.data.serving.chat_template_with_system`'s
    prefix), or None."""
    from vlmtune.data.serving import split_system_default

    return split_system_default(template or "")[0]


def _template_files(model_dir: Path) -> dict[str, Any]:
    """Every chat template in ``model_dir``'s companion files, by file: chat_template.jinja (text),
    chat_template.json / tokenizer_config.json (their ``chat_template``: a string, or a list of named
    ones)."""
    found: dict[str, Any] = {}
    if (model_dir / "chat_template.jinja").is_file():
        found["chat_template.jinja"] = (model_dir / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            value = _read_json(model_dir / name).get("chat_template")
            if value is not None:
                found[name] = value
    return found


def _map_templates(value: Any, fn: Any) -> Any:
    """``fn`` on a template, or on each of a named list ([{"name": ..., "template": ...}], as
    tokenizer_config.json may hold): the default one always, the others (tool use...) where they have
    an image placeholder at all."""
    if isinstance(value, str):
        return fn(value)
    if not isinstance(value, list):
        return value
    out = []
    for t in value:
        if isinstance(t, dict) and isinstance(t.get("template"), str):
            text = t["template"]
            if t.get("name") == "default" or HF_IMAGE_TOKEN in text or ORIGINAL_IMAGE_TOKEN in text:
                t = {**t, "template": fn(text)}
        out.append(t)
    return out


def _default_template(templates: dict[str, Any]) -> str | None:
    """The template a tokenizer/processor would use: chat_template.jinja's, else the json files' (the
    default of a named list)."""
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        value = templates.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
    return None


def _rewritten_templates(src: Path, to: str) -> dict[str, str]:
    """The companion files whose chat template the conversion rewrites, as their new text: to the
    original layout every template's image part becomes ``<image>`` (raising where it cannot), back to
    -hf a template this module wrote gets its ``<IMG_CONTEXT>`` again."""
    fn = original_chat_template if to == "original" else hf_chat_template
    out: dict[str, str] = {}
    for name, value in _template_files(src).items():
        try:
            new = _map_templates(value, fn)
        except ValueError as e:
            raise ValueError(f"{src / name}: {e}") from None
        if new == value:
            continue
        if name == "chat_template.jinja":
            out[name] = new
        else:
            data = _read_json(src / name)
            data["chat_template"] = new
            out[name] = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return out


# ---------------------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def is_original_format(model_dir: str | Path) -> bool:
    """Whether config.json describes an original InternVLChatModel (else, e.g., an -hf one)."""
    config = _read_json(Path(model_dir) / "config.json")
    return ORIGINAL_ARCHITECTURE in (config.get("architectures") or []) or (
        config.get("model_type") == ORIGINAL_MODEL_TYPE
    )


def _is_hf_format(config: dict[str, Any]) -> bool:
    return HF_ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == HF_MODEL_TYPE


def image_token_id_of(model_dir: str | Path) -> int | None:
    """``<IMG_CONTEXT>``'s id in the tokenizer files of ``model_dir`` (read as JSON), or None."""
    model_dir = Path(model_dir)
    token = "<IMG_CONTEXT>"
    if (model_dir / "tokenizer.json").exists():
        for added in _read_json(model_dir / "tokenizer.json").get("added_tokens", []):
            if added.get("content") == token:
                return int(added["id"])
    if (model_dir / "tokenizer_config.json").exists():
        for token_id, added in (
            _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        ).items():
            if added.get("content") == token:
                return int(token_id)
    if (model_dir / "added_tokens.json").exists():
        value = _read_json(model_dir / "added_tokens.json").get(token)
        return None if value is None else int(value)
    return None


def hf_serving_settings(model_dir: str | Path, hf: dict[str, Any]) -> dict[str, Any]:
    """Serving settings of an -hf directory: the tiling from its processor files (processor_config.json,
    else preprocessor_config.json), else InternVL3's defaults; the tile from the vision config; the
    system prompt its chat template inserts by default (``system_message``; None when it inserts none)."""
    model_dir = Path(model_dir)
    image: dict[str, Any] = {}
    if (model_dir / "processor_config.json").exists():
        image = _read_json(model_dir / "processor_config.json").get("image_processor") or {}
    if not image and (model_dir / "preprocessor_config.json").exists():
        image = _read_json(model_dir / "preprocessor_config.json")
    tile = _side((hf.get("vision_config") or {}).get("image_size", 448), "vision_config.image_size")
    size = image.get("size") or {}
    if "height" in size:
        tile = _side([size["height"], size.get("width", size["height"])], "processor size")
    dynamic = bool(image.get("crop_to_patches", True))
    return {
        **_SERVING_DEFAULTS,
        "image_size": tile,
        "force_image_size": tile,
        "max_dynamic_patch": int(image.get("max_patches", 12)),
        "min_dynamic_patch": int(image.get("min_patches", 1)),
        "use_thumbnail": True,  # transformers' GotOcr2 processor always adds one to a multi-tile image
        "dynamic_image_size": dynamic,
        "system_message": template_system_prompt(_default_template(_template_files(model_dir))),
    }


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of a safetensors file: names, dtypes, shapes and byte ranges, no data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    return header, 8 + length


def _source_shards(model_dir: Path) -> tuple[list[Path], bool]:
    """The checkpoint's safetensors shards in order, and whether it has an index file."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise ValueError(f"{index}: lists {missing[0]}, which is not in {model_dir}")
        return [model_dir / n for n in names], True
    shards = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not shards:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {pickles[0]}: pickle checkpoints are not read)" if pickles else ""
        raise ValueError(f"{model_dir}: no *.safetensors weights{hint}")
    return shards, False


def _meta_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A shard's tensors as meta tensors (names, dtypes, shapes from the header; no data read)."""
    header, _ = read_safetensors_header(path)
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which is not converted")
        yield name, torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]], device="meta")


#: How to make one output tensor: its name, its meta tensor (dtype, shape) and its sources, each
#: (shard, source name); one source: the tensor itself (``third`` None) or a third of it; three: q, k, v fused.
_Entry = tuple[str, torch.Tensor, list[tuple[Path, str]], int | None]


def _plan(shards: list[Path], to: str) -> list[list[_Entry]]:
    """Every output tensor, per output shard (one per source shard), from the shard headers alone.

    A fused qkv goes to a shard holding one of its pieces: one that would otherwise be left empty if
    there is one (so the shard count stays the source's), else its q's."""
    plans: list[list[_Entry]] = [[] for _ in shards]
    groups: dict[str, dict[int, tuple[int, Path, str, torch.Tensor]]] = {}
    seen: dict[str, Path] = {}
    for s, shard in enumerate(shards):
        for key, meta in _meta_tensors(shard):
            try:
                if to == "hf":
                    targets = hf_keys(key)
                    outputs = list(original_to_hf([(key, meta)], on_disk=True))
                    for (_, third), (name, out) in zip(targets, outputs):
                        plans[s].append((name, out, [(shard, key)], third))
                    continue
                name, third = original_key(key)
            except ValueError as e:
                raise ValueError(f"{shard}: {e}") from None
            if third is None:
                plans[s].append((name, meta, [(shard, key)], None))
                continue
            pieces = groups.setdefault(name, {})
            if third in pieces:
                raise ValueError(f"{shard}: {key!r} is also in {pieces[third][1].name}")
            pieces[third] = (s, shard, key, meta)
    for name, pieces in groups.items():
        if len(pieces) < 3:
            missing = "/".join(_QKV_ORDER[n] for n in range(3) if n not in pieces)
            raise ValueError(f"{shards[0].parent}: {name!r} lacks its {missing}_proj piece(s)")
        metas = [pieces[n][3] for n in range(3)]
        if len({(tuple(m.shape), m.dtype) for m in metas}) != 1:
            raise ValueError(f"{shards[0].parent}: the q/k/v pieces of {name!r} differ in shape or dtype")
        homes = [pieces[n][0] for n in range(3)]
        home = next((h for h in homes if not plans[h]), homes[0])
        plans[home].append(
            (name, torch.cat(metas, dim=0), [(pieces[n][1], pieces[n][2]) for n in range(3)], None)
        )
    for s, plan in enumerate(plans):
        # Wider dtypes first (as safetensors' own writer does), so every tensor starts aligned to its type.
        plan.sort(key=lambda entry: -entry[1].element_size())
        for name, *_ in plan:
            if name in seen:
                raise ValueError(f"{shards[s]}: tensor {name!r} is also produced from {seen[name].name}")
            seen[name] = shards[s]
    return plans


class _Reader:
    """Source tensors by (shard, name), read from the byte ranges the header gives (plain reads, not
    `safe_open`'s memory map, whose touched pages stay resident: mapping a whole checkpoint shows as
    resident memory the size of the checkpoint)."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[Any, dict[str, Any], int]] = {}

    def get(self, shard: Path, name: str) -> torch.Tensor:
        if shard not in self.files:
            header, start = read_safetensors_header(shard)
            self.files[shard] = (open(shard, "rb"), header, start)  # closed in close()
        f, header, start = self.files[shard]
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype = _ST_DTYPES[entry["dtype"]]
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        if end - begin != numel * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"{shard}: tensor {name!r} has {end - begin} bytes for shape {entry['shape']}")
        if numel == 0:
            return torch.empty(entry["shape"], dtype=dtype)
        buffer = bytearray(end - begin)
        f.seek(start + begin)
        if f.readinto(buffer) != len(buffer):
            raise ValueError(f"{shard}: truncated (tensor {name!r} runs past the end of the file)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    def make(self, sources: list[tuple[Path, str]], third: int | None) -> torch.Tensor:
        if len(sources) == 3:
            return torch.cat([self.get(*source) for source in sources], dim=0)
        tensor = self.get(*sources[0])
        if third is None:
            return tensor
        size = tensor.shape[0] // 3
        return tensor[third * size : (third + 1) * size]

    def close(self) -> None:
        for f, _, _ in self.files.values():
            f.close()
        self.files.clear()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _write_shard(path: Path, plan: list[_Entry], reader: _Reader, metadata: dict[str, str]) -> None:
    """Write one safetensors file tensor by tensor: the header from the plan, then each tensor's bytes as
    it is made, so at most one output tensor (and its sources) is held at a time."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, meta, _, _ in plan:
        size = _nbytes(meta)
        header[name] = {
            "dtype": _TORCH_TO_ST[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, meta, sources, third in plan:
            tensor = reader.make(sources, third)
            if tensor.shape != meta.shape or tensor.dtype != meta.dtype:
                raise ValueError(f"{sources[0][0]}: tensor {sources[0][1]!r} does not match its header")
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor


def _check_hf_shapes(hf_shapes: dict[str, tuple[int, ...]], hf_config: dict[str, Any], where: str) -> None:
    """The -hf tensors must be exactly the model's (no missing, unexpected or mis-shaped one), checked
    against `InternVLForConditionalGeneration` built from the config on the meta device."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig.from_dict(hf_config)
    text_tie = (hf_config.get("text_config") or {}).get("tie_word_embeddings")
    if text_tie is not None:  # as build.load_internvl_config: the LLM's own flag is the truth
        config.tie_word_embeddings = bool(text_tie)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        hf_shapes = {k: v for k, v in hf_shapes.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(hf_shapes))
    unexpected = sorted(set(hf_shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(hf_shapes) if expected[k] != hf_shapes[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {to_disk_key(missing[0])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {to_disk_key(unexpected[0])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} mis-shaped (e.g. {to_disk_key(k)}: {hf_shapes[k]} vs {expected[k]})")
        raise ValueError(f"{where}: the tensors do not fit the config: {'; '.join(parts)}")


def _dominant_dtype(specs: Iterable[torch.Tensor]) -> str | None:
    totals: dict[torch.dtype, int] = {}
    for t in specs:
        if t.is_floating_point():
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel()
    return str(max(totals, key=totals.get)).removeprefix("torch.") if totals else None


def convert(src: str | Path, dst: str | Path, to: Literal["hf", "original"]) -> dict[str, Any]:
    """Convert the checkpoint at ``src`` into ``dst`` (which must not exist or be empty), ``to`` "hf" or
    "original". Writes config.json, the safetensors (as many shards as the source, same file names, an
    index when the source has one or is sharded) and copies the tokenizer/chat-template/generation files;
    to "original" also configuration_internvl_chat.py (config.json's ``auto_map``), with every chat
    template's image part rewritten to ``<image>`` (`original_chat_template`; a template without the -hf
    image part is refused), and back to "hf" such a template gets its ``<IMG_CONTEXT>`` again.

    Every tensor is checked against the model the config describes before anything is written; the
    output is staged in ``<dst>.partial`` and renamed, so a failure leaves no half-converted ``dst``.
    Returns a summary with the serving settings (tiling, template) for the caller's processor.
    """
    if to not in ("hf", "original"):
        raise ValueError(f"to={to!r}: use 'hf' or 'original'")
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    config = _read_json(config_path)
    original_src = is_original_format(src)
    if to == "hf" and not original_src:
        raise ValueError(f"{config_path}: not an original InternVLChatModel config (already -hf?)")
    if to == "original" and not _is_hf_format(config):
        raise ValueError(f"{config_path}: not an -hf InternVLForConditionalGeneration config")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst}: exists and is not empty")
    try:
        if to == "hf":
            token_id = image_token_id_of(src)
            hf_config = hf_config_from_original(config, image_token_id=token_id)
            serving = serving_settings(config)
            dropped = dropped_original_settings(config)
        else:
            serving = hf_serving_settings(src, config)
            out_config = original_config_from_hf(config, serving)
            token_id = image_token_id_of(src)
            if token_id is not None and config.get("image_token_id") not in (None, token_id):
                raise ValueError(
                    f"image_token_id={config['image_token_id']} but the tokenizer's <IMG_CONTEXT> is {token_id}: "
                    "the original model takes the tokenizer's"
                )
            dropped = []
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    templates = _rewritten_templates(src, to)

    shards, has_index = _source_shards(src)
    plans = _plan(shards, to)
    metas = [meta for plan in plans for _, meta, _, _ in plan]
    dtype = _dominant_dtype(metas)
    if to == "hf":
        hf_shapes = {to_memory_key(name): tuple(meta.shape) for plan in plans for name, meta, _, _ in plan}
        if dtype is not None:
            hf_config["dtype"] = hf_config["text_config"]["dtype"] = hf_config["vision_config"]["dtype"] = (
                dtype
            )
        _check_hf_shapes(hf_shapes, hf_config, str(src))
    else:
        hf_shapes = {
            to_memory_key(name): tuple(meta.shape) for shard in shards for name, meta in _meta_tensors(shard)
        }
        _check_hf_shapes(hf_shapes, config, str(src))
        if dtype is not None:
            out_config["torch_dtype"] = out_config["llm_config"]["torch_dtype"] = dtype
            out_config["vision_config"]["torch_dtype"] = dtype

    staging = dst.with_name(dst.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    reader = _Reader()
    try:
        weight_map: dict[str, str] = {}
        for shard, plan in zip(shards, plans):
            header, _ = read_safetensors_header(shard)
            metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
            metadata["format"] = "pt"
            _write_shard(staging / shard.name, plan, reader, metadata)
            weight_map.update((name, shard.name) for name, *_ in plan)
        total = sum(_nbytes(meta) for meta in metas)
        if has_index or len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if to == "hf":
            _write_hf_config(staging, hf_config)
        else:
            _write_original_config(staging, out_config)
        copied = []
        for name in COMPANION_FILES:
            if name in templates:
                (staging / name).write_text(templates[name])
                copied.append(name)
            elif (src / name).is_file():
                shutil.copy2(src / name, staging / name)
                copied.append(name)
        if dst.exists():
            dst.rmdir()
        staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        reader.close()
    return {
        "src": str(src),
        "dst": str(dst),
        "to": to,
        "shards": len(shards),
        "tensors": len(weight_map),
        "bytes": total,
        "copied": copied,
        "chat_template_rewritten": sorted(templates),
        "serving": serving,
        "dropped_settings": dropped,
    }


def _write_original_config(model_dir: Path, config: dict[str, Any]) -> None:
    """config.json with the ``auto_map`` to the config class written next to it."""
    (model_dir / "config.json").write_text(
        json.dumps({**config, "auto_map": AUTO_MAP}, indent=2, sort_keys=True) + "\n"
    )
    (model_dir / CONFIG_CLASS_FILE).write_text(CONFIG_CLASS_SOURCE)


def _internvl_config_object(hf_config: dict[str, Any]) -> Any:
    """transformers' `InternVLConfig` built (and validated) from an -hf config dict; ``architectures`` and
    ``model_type`` are class facts, not arguments."""
    from transformers import InternVLConfig

    return InternVLConfig(**{k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")})


def _write_hf_config(model_dir: Path, hf_config: dict[str, Any]) -> None:
    """config.json as transformers writes it (the dict validated by `InternVLConfig` on the way)."""
    config = _internvl_config_object(hf_config)
    config.architectures = [HF_ARCHITECTURE]
    config.save_pretrained(model_dir)


def internvl_config(model_dir: str | Path) -> Any:
    """The transformers `InternVLConfig` of a checkpoint in either layout (the original one mapped from
    its config.json as data), with `tie_word_embeddings` taken from the LLM's config."""
    model_dir = Path(model_dir)
    if not is_original_format(model_dir):
        from vlmtune.train.model.build import load_internvl_config

        return load_internvl_config(str(model_dir))
    config_path = model_dir / "config.json"
    try:
        hf_config = hf_config_from_original(
            _read_json(config_path), image_token_id=image_token_id_of(model_dir)
        )
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    config = _internvl_config_object(hf_config)
    config.tie_word_embeddings = bool(config.text_config.tie_word_embeddings)
    return config


def load_original(model_dir: str | Path, dtype: torch.dtype | None = None) -> Any:
    """An original-format checkpoint as transformers' `InternVLForConditionalGeneration`, converted in
    memory (no disk copy, no remote code): for inference (`vlmtune eval`, a LoRA base). Tensors are read
    one at a time into a model built without random init; every key must be filled and every tensor used,
    or the error lists what is missing or left over."""
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    model_dir = Path(model_dir)
    if not is_original_format(model_dir):
        raise ValueError(f"{model_dir / 'config.json'}: not an original InternVLChatModel config")
    config = internvl_config(model_dir)
    shards, _ = _source_shards(model_dir)
    metas = [meta for shard in shards for _, meta in _meta_tensors(shard)]
    dtype = dtype or getattr(torch, _dominant_dtype(metas) or "float32")
    with no_init_weights():  # built in ``dtype`` (not cast after: that would round the fp32 rotary buffers)
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    wanted = model.state_dict()
    filled: set[str] = set()
    reader = _Reader()
    try:
        for shard in shards:
            names = [name for name, _ in _meta_tensors(shard)]
            tensors = ((name, reader.get(shard, name)) for name in names)
            try:
                for key, tensor in original_to_hf(tensors, on_disk=False):
                    if key not in wanted:
                        raise ValueError(f"tensor {key!r} has no place in the model the config describes")
                    if tuple(wanted[key].shape) != tuple(tensor.shape):
                        raise ValueError(
                            f"tensor {key!r} has shape {tuple(tensor.shape)}, the config implies "
                            f"{tuple(wanted[key].shape)}"
                        )
                    wanted[key].copy_(tensor)
                    filled.add(key)
            except ValueError as e:
                raise ValueError(f"{shard}: {e}") from None
    finally:
        reader.close()
    missing = sorted(set(wanted) - filled - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise ValueError(
            f"{model_dir}: the checkpoint has no tensor for {len(missing)} key(s): {missing[:5]}"
        )
    model.tie_weights()
    generation = model_dir / "generation_config.json"
    if generation.exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()
