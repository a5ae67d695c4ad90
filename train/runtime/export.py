"""The final output: an HF-format model directory (full fine-tunes) or a peft adapter directory (LoRA).

`InternVLForConditionalGeneration.from_pretrained(dir)` (or `PeftModel.from_pretrained(base, dir)`)
and `AutoProcessor.from_pretrained(dir)` load it with no vlmtune installed; ``vlmtune.json`` records
the data settings training used (system prompt, tiling) so that `vlmtune eval` prompts the model the
way it was trained.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from vlmtune.train.model.unwrap import unwrap

log = logging.getLogger("vlmtune")

PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def export_hf(
    engine: Any, tokenizer: Any, out: Path, *, source_dir: str | None = None, extra: dict | None = None
) -> Path | None:
    """Write the model to ``out`` (rank 0); every rank must call it (ZeRO-3 gathers layer by layer)."""
    out = Path(out)
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = unwrap(engine)
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = model.state_dict() if rank == 0 else None
    if rank == 0:
        from vlmtune.data.serving import stop_at_im_end

        out.mkdir(parents=True, exist_ok=True)
        stop_at_im_end(model.generation_config, tokenizer)
        save_in_published_layout(model, out, state_dict)
        write_companions(out, tokenizer, source_dir, extra, model.config)
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None


def save_in_published_layout(model: Any, out: Path, state_dict: dict | None) -> None:
    """``save_pretrained`` with the key layout of the published -hf checkpoints whatever loaded the model.

    transformers renames keys back on save with the conversions it recorded at load time. Its ZeRO-3
    loading path records every candidate conversion, used or not (the ordinary path keeps the used
    ones), so a ZeRO-3 run's export came out as ``language_model.model.model.layers.*``, which vLLM
    refuses. Saving as for a model built in memory (the default conversions) gives the published
    layout on every path; tests compare the ZeRO-3 export's keys with transformers' ordinary save.
    """
    recorded = model.__dict__.pop("_weight_conversions", None)
    try:
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    finally:
        if recorded is not None:
            model._weight_conversions = recorded


def export_adapter(
    engine: Any, tokenizer: Any, out: Path, *, source_dir: str | None = None, extra: dict | None = None
) -> Path | None:
    """Write the peft adapter directory (adapters + fully trained parts) to ``out``; every rank calls it."""
    from vlmtune.train.model.lora import peft_model_of, trainable_state_dict

    out = Path(out)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = trainable_state_dict(engine)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        peft_model_of(engine).save_pretrained(out, state_dict=state, safe_serialization=True)
        delta = getattr(unwrap(engine).config, "v2pe_delta", None)  # V2PE: no model config.json here
        extra = {**(extra or {}), **({} if delta is None else {"v2pe_delta": float(delta)})}
        write_companions(out, tokenizer, source_dir, extra, unwrap(engine).config)
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None


def write_companions(
    out: Path, tokenizer: Any, source_dir: str | None, extra: dict | None, model_config: Any
) -> None:
    """Tokenizer, processor files and chat template describing the run (data/serving.py), and
    vlmtune.json; warns where a serving stack will still not do what training did."""
    from vlmtune.data.serving import write_serving_files
    from vlmtune.train.model.build import num_image_tokens_per_tile

    settings = (extra or {}).get("data")
    if settings is not None:  # settings left out are DataConfig's defaults at the model's tile size
        from vlmtune.data.dataset import DataConfig, sample_settings
        from vlmtune.train.model.build import tile_size

        default = DataConfig(meta_path="-", image_size=tile_size(model_config.vision_config))
        settings = {**sample_settings(default), **settings}
    if settings is None and source_dir is not None:  # no run settings known: the source's files as they are
        for name in PROCESSOR_FILES:
            if (Path(source_dir) / name).exists():
                shutil.copy(Path(source_dir) / name, out / name)
    gaps = write_serving_files(
        out,
        tokenizer,
        source_dir,
        settings,
        num_image_tokens_per_tile(model_config),
        (extra or {}).get("per_dataset_tiling"),
    )
    delta = getattr(model_config, "v2pe_delta", None)
    if delta is not None and float(delta) != 1.0:
        gaps.append(
            f"V2PE (v2pe_delta={delta}): transformers and vLLM ignore it and use standard positions; "
            "`vlmtune eval --engine all` shows what a plain client then gets"
        )
    for gap in gaps:
        log.warning("export %s: %s", out, gap)
    (out / "vlmtune.json").write_text(json.dumps(extra or {}, indent=2, default=str))


def trained_settings(model_dir: str | Path | None) -> dict[str, Any]:
    """The data settings (``sample_settings``) a vlmtune export was trained with, from its vlmtune.json;
    ``{}`` for a directory vlmtune did not write."""
    settings_file = Path(model_dir) / "vlmtune.json" if model_dir is not None else None
    if settings_file is None or not settings_file.exists():
        return {}
    settings = json.loads(settings_file.read_text()).get("data", {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}  # JSON lists -> tuples


def load_trained(path: str | Path, base: str | None = None) -> Any:
    """An exported model for inference: an HF directory, or a peft adapter directory over its base
    (``base`` or the adapter config's ``base_model_name_or_path``)."""
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        return load_model_dir(path)
    from peft import PeftConfig, PeftModel

    base = base or PeftConfig.from_pretrained(path).base_model_name_or_path
    if not base or not Path(base).exists():
        raise ValueError(f"{path}: base model {base!r} not found; pass the base model directory")
    settings = path / "vlmtune.json"
    saved = json.loads(settings.read_text()) if settings.exists() else {}
    # the δ the adapters were trained with (train/model/v2pe.py)
    model = load_model_dir(Path(base), v2pe_delta=saved.get("v2pe_delta"))
    return PeftModel.from_pretrained(model, path)


def load_model_dir(path: Path, v2pe_delta: float | None = None) -> Any:
    """A full model directory in the -hf layout, or in the original one converted in memory."""
    from transformers import InternVLForConditionalGeneration

    from vlmtune.train.model.build import load_internvl_config
    from vlmtune.train.model.original_format import is_original_format, load_original

    if is_original_format(path):
        model = load_original(path)
        if v2pe_delta is not None:
            model.config.v2pe_delta = v2pe_delta
        return model
    config = load_internvl_config(str(path))
    if v2pe_delta is not None:
        config.v2pe_delta = v2pe_delta
    return InternVLForConditionalGeneration.from_pretrained(path, config=config)
