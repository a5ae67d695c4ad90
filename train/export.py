"""The final HF-format directory: weights gathered from ZeRO-3 shards, config, tokenizer, processor files.

`InternVLForConditionalGeneration.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)`
load it with no vlmtune installed; ``vlmtune.json`` records the data settings training used
(system prompt, tiling) so that `vlmtune eval` prompts the model the way it was trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from train.modeling import unwrap

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
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if source_dir is not None:  # carry the processor so AutoProcessor works on the export
            for name in PROCESSOR_FILES:
                if (Path(source_dir) / name).exists():
                    shutil.copy(Path(source_dir) / name, out / name)
        (out / "vlmtune.json").write_text(json.dumps(extra or {}, indent=2, default=str))
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None
