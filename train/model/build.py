"""Build transformers' native `InternVLForConditionalGeneration` from a model config.

One schema (`ModelConfig`) describes every size, from the tiny test model to InternVL3-78B: either a
local `-hf` checkpoint directory to load, or the vision/text shapes to initialise at random. Module
names follow transformers' InternVL implementation (models/internvl/modeling_internvl.py):
`model.vision_tower` (InternViT), `model.multi_modal_projector` (LayerNorm -> Linear -> GELU -> Linear
after the pixel shuffle), `model.language_model` (Qwen2 / Llama decoder) and `lm_head`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

from vlmtune.train.model.liger_head import require_liger_head
from vlmtune.train.model.lm_head import HEAD_CHUNK_ATTR, HEAD_KERNEL_ATTR, HEAD_KERNELS

VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."
LLM_PREFIXES = ("model.language_model.", "lm_head.")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which InternVL model to build and how to train it (Hydra group `model/`)."""

    name: str = "tiny"
    """Human-readable name, used in logs and output directories."""

    pretrained: str | None = None
    """Local directory of an `-hf` checkpoint (config.json + safetensors). None: random init from the shapes below."""

    tokenizer: str | None = None
    """Local directory holding the tokenizer (and processor). None: the `pretrained` directory."""

    vision: dict[str, Any] = field(default_factory=dict)
    """`InternVLVisionConfig` kwargs (hidden_size, num_hidden_layers, use_qk_norm, norm_type, ...). Random init only."""

    text: dict[str, Any] = field(default_factory=dict)
    """LLM config kwargs; `model_type` picks the class (default "qwen2"; "llama" for InternVL3-9B). Random init only."""

    downsample_ratio: float = 0.5
    """Pixel-shuffle ratio: each tile's (S/patch)^2 patches become (S/patch * ratio)^2 LLM tokens."""

    projector_hidden_act: str = "gelu"
    """Activation between the projector's two linear layers."""

    vision_feature_layer: int = -1
    """Which vision-tower layer's output feeds the projector (-1: the last)."""

    tie_word_embeddings: bool = False
    """Share lm_head with the input embeddings. Set on the top-level config, which is what transformers 5 reads."""

    image_token_id: int | None = None
    """Id of `<IMG_CONTEXT>`. None: take it from the tokenizer (`tokenizer.context_image_token_id`)."""

    freeze_vision: bool = False
    """Keep the vision tower's weights fixed."""

    freeze_projector: bool = False
    """Keep the MLP projector's weights fixed."""

    freeze_llm: bool = False
    """Keep the language model (embeddings, decoder, lm_head) fixed."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant), trading compute for memory."""

    attn_implementation: str = "auto"
    """"auto" (flash_attention_2 when flash_attn is importable and CUDA is available, else sdpa), "sdpa", "eager", ..."""

    dtype: str = "auto"
    """"float32", "bfloat16", "float16" or "auto" (the checkpoint's dtype when loading, float32 for random init)."""

    liger_kernels: bool = False
    """Liger's fused Triton kernels (RMSNorm, LayerNorm, SwiGLU, RoPE) in the vision tower and the Qwen2 LLM;
    CUDA only (`pip install 'vlmtune[liger]'`). The loss keeps vlmtune's own token weighting."""

    head_chunk_size: int = 1024
    """Rows of LM-head logits computed at a time (train/model/lm_head.py): with a 151k vocabulary a long
    supervised pack's full logits outgrow the model's own memory. Inputs with fewer rows take the full
    logits anyway (one chunk's memory); 0 always takes the full logits."""

    head_kernel: str = "chunked"
    """What computes the LM head's log-probs in place of the full logits: "chunked" (train/model/lm_head.py,
    any device, ``head_chunk_size`` rows at a time) or "liger" (Liger's fused linear cross-entropy on every
    call, train/model/liger_head.py: CUDA and liger-kernel >= 0.8.2, the first with a correct per-token
    backward; it sizes its own chunks, so ``head_chunk_size`` must not be 0). Independent of
    ``liger_kernels``."""


def resolve_attn_implementation(name: str) -> str:
    """Pick the attention kernel; "auto" prefers FlashAttention-2 (varlen: packs cost what their
    samples cost), then torch's own varlen flash kernel on a GPU (``packed_varlen``,
    train/model/attention_varlen.py), else ``packed_sdpa`` (train/model/attention.py: sdpa per packed sample)."""
    import vlmtune.train.model.attention  # noqa: F401  (registers packed_sdpa with transformers)
    from vlmtune.train.model.attention_varlen import varlen_available  # (registers packed_varlen)

    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "packed_varlen" if varlen_available() else "packed_sdpa"


def resolve_dtype(name: str, *, loading: bool) -> torch.dtype | str:
    if name == "auto":
        return "auto" if loading else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def num_image_tokens_per_tile(config: InternVLConfig) -> int:
    """LLM tokens per image tile: (S/patch)^2 patches, pixel-shuffled by `downsample_ratio` (256 at 448/14/0.5)."""
    vision = config.vision_config
    size = _pair(vision.image_size)
    patch = _pair(vision.patch_size)
    ratio = config.downsample_ratio
    return int(size[0] // patch[0] * ratio) * int(size[1] // patch[1] * ratio)


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """HF configs spell a size as an int or as [h, w]; always (h, w)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def tile_size(vision_config: Any) -> int:
    """The side in pixels of the square tiles the vision tower takes (``image_size``, int or [h, w])."""
    height, width = _pair(vision_config.image_size)
    if height != width:
        raise ValueError(f"vision_config.image_size={vision_config.image_size}: InternVL tiles are square")
    return height


def _plain(mapping: Any) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf node (nested values such as rope_scaling included)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(mapping, resolve=True) if isinstance(mapping, DictConfig) else dict(mapping)


def build_internvl_config(
    cfg: ModelConfig, tokenizer: Any = None, *, require_image_token: bool = True
) -> InternVLConfig:
    """The `InternVLConfig` for random init; checks the tokenizer agrees with it (vocab size, image token).

    `require_image_token=False` lets a shapes-only build (meta device) go without knowing `<IMG_CONTEXT>`'s id.
    """
    text = _plain(cfg.text)
    model_type = text.pop("model_type", "qwen2")
    text.setdefault("tie_word_embeddings", cfg.tie_word_embeddings)
    if text["tie_word_embeddings"] != cfg.tie_word_embeddings:
        raise ValueError(
            f"model {cfg.name}: text.tie_word_embeddings={text['tie_word_embeddings']} contradicts "
            f"tie_word_embeddings={cfg.tie_word_embeddings}; set only the top-level field"
        )
    if tokenizer is not None:
        text.setdefault("eos_token_id", tokenizer.eos_token_id)
        text.setdefault("pad_token_id", tokenizer.pad_token_id)
        vocab = text.get("vocab_size")
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"model {cfg.name}: text.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)"
            )
    text_config = AutoConfig.for_model(model_type, **text)
    vision_config = InternVLVisionConfig(**_plain(cfg.vision))
    image_token_id = _image_token_id(cfg, tokenizer, required=require_image_token)
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        **({} if image_token_id is None else {"image_token_id": image_token_id}),
        downsample_ratio=cfg.downsample_ratio,
        projector_hidden_act=cfg.projector_hidden_act,
        vision_feature_layer=cfg.vision_feature_layer,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    config.image_seq_length = num_image_tokens_per_tile(config)
    return config


def _image_token_id(cfg: ModelConfig, tokenizer: Any, *, required: bool = True) -> int | None:
    from_tokenizer = None if tokenizer is None else tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if cfg.image_token_id is None and from_tokenizer is None and required:
        raise ValueError(
            f"model {cfg.name}: image_token_id is null and no tokenizer was given to read it from"
        )
    if cfg.image_token_id is not None and from_tokenizer is not None and cfg.image_token_id != from_tokenizer:
        raise ValueError(
            f"model {cfg.name}: image_token_id={cfg.image_token_id} but the tokenizer's <IMG_CONTEXT> is {from_tokenizer}"
        )
    return cfg.image_token_id if cfg.image_token_id is not None else from_tokenizer


def load_internvl_config(path: str) -> InternVLConfig:
    """A checkpoint's config, with the top-level `tie_word_embeddings` made to agree with its text config.

    Configs converted under transformers 4 may carry the untied setting only in `text_config` (4.x read it
    there); transformers 5 reads the top-level flag, whose default is True. It then keeps the two checkpoint
    tensors apart on load (they differ) but `save_pretrained` drops lm_head as "tied", so an exported model
    loses its output layer. The text config is the LLM's truth.
    """
    config = InternVLConfig.from_pretrained(path)
    config.tie_word_embeddings = bool(config.text_config.tie_word_embeddings)
    return config


def _check_image_token(where: str, image_token_id: int, tokenizer: Any) -> None:
    expected = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if image_token_id != expected:
        raise ValueError(
            f"{where}: config image_token_id={image_token_id} but the tokenizer's <IMG_CONTEXT> is {expected}"
        )


def build_model(cfg: ModelConfig, tokenizer: Any = None, lora: Any = None) -> torch.nn.Module:
    """Load `cfg.pretrained` (never remote code) or initialise from the shapes; then freezing, checkpointing
    and, when ``lora`` (train/model/lora.py's LoRAConfig) enables a part, the peft adapters.

    Random init draws from torch's global RNG: seed it first for reproducible weights.
    """
    _check_head_kernel(cfg)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    quantize = lora is not None and lora.enabled and lora.quantize == "4bit"
    if cfg.pretrained is not None:
        dtype = resolve_dtype(cfg.dtype, loading=True)
        model = InternVLForConditionalGeneration.from_pretrained(
            cfg.pretrained,
            config=load_internvl_config(cfg.pretrained),
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=False,
            **({"quantization_config": _qlora_quantization()} if quantize else {}),
        )
        if tokenizer is not None:
            _check_image_token(cfg.pretrained, model.config.image_token_id, tokenizer)
    else:
        config = build_internvl_config(cfg, tokenizer)
        model = InternVLForConditionalGeneration._from_config(
            config, dtype=resolve_dtype(cfg.dtype, loading=False), attn_implementation=attn
        )
    if cfg.head_chunk_size < 0:
        raise ValueError(f"model.head_chunk_size must be >= 0 (0: full logits), got {cfg.head_chunk_size}")
    setattr(model, HEAD_CHUNK_ATTR, cfg.head_chunk_size)  # read by the objectives (objectives/logps.py)
    setattr(model, HEAD_KERNEL_ATTR, cfg.head_kernel)
    if cfg.liger_kernels:
        apply_liger_kernels(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    apply_freezing(model, cfg)
    if lora is not None and lora.enabled:
        from vlmtune.train.model.lora import apply_lora

        if quantize:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing
            )
        model = apply_lora(model, lora, cfg)
    return model


def _check_head_kernel(cfg: ModelConfig) -> None:
    """``model.head_kernel``, checked before any weight is loaded."""
    if cfg.head_kernel not in HEAD_KERNELS:
        raise ValueError(f"model.head_kernel must be one of {HEAD_KERNELS}, got {cfg.head_kernel!r}")
    if cfg.head_kernel == "liger":
        if cfg.head_chunk_size == 0:
            raise ValueError(
                "model.head_kernel=liger replaces the full logits that model.head_chunk_size=0 asks for: "
                "set head_kernel=chunked for the full logits, or head_chunk_size > 0"
            )
        require_liger_head()


def apply_liger_kernels(model: torch.nn.Module) -> None:
    """Swap the norms, SwiGLU MLPs and RoPE of this model instance for Liger's Triton kernels.

    Liger's fused linear + cross-entropy stays off: it would compute its own token-mean loss, while the
    objectives need per-token log-probs for square averaging and the preference terms; the LM head
    already runs only on supervised positions (train/model/forward.py).
    """
    if not torch.cuda.is_available():
        raise ValueError("model.liger_kernels=true needs a CUDA GPU (Liger's kernels are Triton)")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_internvl
    except ImportError as e:
        raise ValueError("model.liger_kernels=true needs liger-kernel: pip install 'vlmtune[liger]'") from e
    apply_liger_kernel_to_internvl(
        model=model,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        rms_norm=True,
        layer_norm=True,
        rope=True,
        swiglu=True,
    )


def _qlora_quantization() -> Any:
    """QLoRA's base weights: NF4 with double quantisation, bf16 compute; the vision tower stays unquantised."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    )


def build_model_on_meta(cfg: ModelConfig, tokenizer: Any = None, lora: Any = None) -> torch.nn.Module:
    """The model's structure without memory for weights: parameter counts and memory plans for any size."""
    if cfg.pretrained is not None:
        config = load_internvl_config(cfg.pretrained)
    else:
        config = build_internvl_config(cfg, tokenizer, require_image_token=False)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
        apply_freezing(model, cfg)
        if lora is not None and lora.enabled:
            from vlmtune.train.model.lora import apply_lora

            model = apply_lora(model, lora, cfg)
    return model


PEFT_PREFIX = "base_model.model."


def part_of(param_name: str) -> str:
    """Which of "vision", "projector", "llm" a parameter belongs to (by its module path, peft's included)."""
    param_name = param_name.removeprefix(PEFT_PREFIX)
    if param_name.startswith(VISION_PREFIX):
        return "vision"
    if param_name.startswith(PROJECTOR_PREFIX):
        return "projector"
    if param_name.startswith(LLM_PREFIXES):
        return "llm"
    raise ValueError(f"parameter {param_name!r} is in none of the vision tower, projector or language model")


def apply_freezing(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Set `requires_grad` per part from the `freeze_*` flags (unfrozen parts are made trainable again)."""
    frozen = {"vision": cfg.freeze_vision, "projector": cfg.freeze_projector, "llm": cfg.freeze_llm}
    for name, param in model.named_parameters():  # (quantised QLoRA weights are integers: never trained)
        param.requires_grad_(not frozen[part_of(name)] and param.is_floating_point())


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts per part of the base model, plus adapters, total and trainable.

    A tied lm_head is counted once (with the LLM). Under peft, "vision"/"projector"/"llm" count the base
    weights; "adapter" counts the LoRA/DoRA weights and the trained copies of full parts
    (`modules_to_save`); "total" is everything held.
    """
    counts = {"vision": 0, "projector": 0, "llm": 0, "adapter": 0, "total": 0, "trainable": 0}
    for name, param in model.named_parameters():  # yields each shared tensor once
        n = getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitioned: the full size, not this rank's
        is_adapter = ".lora_" in name or ".modules_to_save." in name
        counts["adapter" if is_adapter else part_of(name)] += n
        counts["total"] += n
        if param.requires_grad:
            counts["trainable"] += n
    return counts
