"""LoRA / DoRA adapters (peft) on the language model and the vision tower, as InternVL's
`use_llm_lora` / `use_backbone_lora` do, with the projector and any other part full or frozen.

One peft adapter covers both parts: the target modules are a regex over module paths, and the
vision tower gets its own rank and alpha through peft's rank/alpha patterns. A part that is not
LoRA'd and not frozen (`model.freeze_*`) is trained in full as a peft `modules_to_save` module, so
that the adapter directory holds everything training changed and `PeftModel.from_pretrained`
restores it over the base weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

# Module names in transformers' InternVL implementation (Qwen2 / Llama decoder, InternViT encoder).
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_TARGETS = ["q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"]
PART_MODULES = {
    "llm": r"model\.language_model",
    "vision": r"model\.vision_tower",
}
FULL_PART_MODULES = {  # what `modules_to_save` names for a part trained in full beside adapters
    "llm": ["language_model", "lm_head"],
    "vision": ["vision_tower"],
    "projector": ["multi_modal_projector"],
}


@dataclass
class LoRAPartConfig:
    """Adapters on one part of the model."""

    enabled: bool = False
    r: int = 16  # rank
    alpha: int | None = None  # scaling numerator; None = 2 * r (InternVL's setting)
    target_modules: list[str] = field(default_factory=list)  # module names (last path component)


@dataclass
class LoRAConfig:
    """Hydra group `lora/`. Parts without adapters follow `model.freeze_*` (frozen, or trained in full)."""

    llm: LoRAPartConfig = field(default_factory=lambda: LoRAPartConfig(target_modules=list(LLM_TARGETS)))
    vision: LoRAPartConfig = field(
        default_factory=lambda: LoRAPartConfig(target_modules=list(VISION_TARGETS))
    )
    dropout: float = 0.05  # on the adapters' input (one value for both parts: peft has no per-module dropout)
    use_dora: bool = False  # weight-decomposed LoRA (DoRA)
    quantize: str | None = None  # "4bit": QLoRA (bitsandbytes NF4 base weights; CUDA only)

    @property
    def enabled(self) -> bool:
        return self.llm.enabled or self.vision.enabled


def check_lora_config(lora: LoRAConfig, *, zero_stage: int) -> None:
    """Refuse at start what would fail later (or silently train nothing)."""
    for part in ("llm", "vision"):
        p = getattr(lora, part)
        if p.enabled and (p.r < 1 or not p.target_modules):
            raise ValueError(f"lora.{part}: r must be >= 1 and target_modules non-empty (got r={p.r})")
    if lora.quantize is not None:
        if lora.quantize != "4bit":
            raise ValueError(f"lora.quantize: only '4bit' (QLoRA) is supported, got {lora.quantize!r}")
        if not lora.enabled:
            raise ValueError("lora.quantize=4bit needs adapters: enable lora.llm and/or lora.vision")
        if zero_stage == 3:  # first: a config error, whatever machine it is checked on
            raise ValueError("lora.quantize=4bit cannot be sharded with ZeRO-3; use deepspeed=zero2 or zero0")
        if not torch.cuda.is_available():
            raise ValueError(
                "lora.quantize=4bit (QLoRA) needs a CUDA GPU and bitsandbytes (pip install 'vlmtune[qlora]'); "
                "on CPU train LoRA on unquantised weights (lora.quantize=null)"
            )


def target_regex(lora: LoRAConfig) -> str:
    """One regex (peft full-matches it against module paths) selecting the adapted linear layers."""
    alternatives = [
        rf"{PART_MODULES[part]}\..*\.({'|'.join(map(re.escape, getattr(lora, part).target_modules))})"
        for part in ("llm", "vision")
        if getattr(lora, part).enabled
    ]
    return "|".join(f"(?:{a})" for a in alternatives)


def peft_config(lora: LoRAConfig, model_cfg: Any) -> Any:
    """The `peft.LoraConfig`: base rank/alpha from the first enabled part, the vision tower's via patterns."""
    from peft import LoraConfig

    def alpha(p: LoRAPartConfig) -> int:
        return p.alpha if p.alpha is not None else 2 * p.r

    main = lora.llm if lora.llm.enabled else lora.vision
    vision_key = rf"{PART_MODULES['vision']}\..*"
    patterns = {} if not (lora.llm.enabled and lora.vision.enabled) else {vision_key: lora.vision}
    frozen = {
        "llm": model_cfg.freeze_llm or lora.llm.enabled,
        "vision": model_cfg.freeze_vision or lora.vision.enabled,
        "projector": model_cfg.freeze_projector,
    }
    full = [name for part, names in FULL_PART_MODULES.items() if not frozen[part] for name in names]
    return LoraConfig(
        r=main.r,
        lora_alpha=alpha(main),
        lora_dropout=lora.dropout,
        target_modules=target_regex(lora),
        rank_pattern={k: p.r for k, p in patterns.items()},
        alpha_pattern={k: alpha(p) for k, p in patterns.items()},
        use_dora=lora.use_dora,
        modules_to_save=full or None,
        bias="none",
    )


def apply_lora(model: torch.nn.Module, lora: LoRAConfig, model_cfg: Any) -> torch.nn.Module:
    """Wrap ``model`` in a peft model: base weights frozen, adapters (and full parts) trainable."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(lora, model_cfg))
    if model_cfg.gradient_checkpointing:  # frozen embeddings: the checkpointed blocks still need grads
        peft_model.enable_input_require_grads()
    return peft_model


def peft_model_of(model: torch.nn.Module) -> Any | None:
    """The peft model under a DeepSpeed engine, or None when training without adapters."""
    from peft import PeftModel

    while not isinstance(model, PeftModel):
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return model


def trainable_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The trainable tensors (adapters, full parts) on CPU, gathered from ZeRO-3 shards; every rank calls it."""
    params = {n: p for n, p in peft_model_of(engine).named_parameters() if p.requires_grad}
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in params.items()}
    return {n: p.detach().cpu().clone() for n, p in params.items()}
