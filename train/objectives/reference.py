"""The reference policy of preference training: the starting model's log-probs, three ways.

- ``frozen_copy_reference``: a frozen copy of the starting model. Under ZeRO-3 the copy is sharded
  like the policy (its own DeepSpeed engine, no optimizer state): 1/world of the weights per rank.
- ``adapter_disabled_reference``: LoRA's policy with its adapters (and fully trained parts) switched
  off is exactly the starting model, so no copy is held at all.
- ``precomputed``: log-probs computed once before training and cached on disk (``cached_reference``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from vlmtune.train.objectives.mpo import response_logps


def frozen_copy_reference(
    model: torch.nn.Module,
    ds_config: dict,
    rebuild: Callable[[], torch.nn.Module] | None = None,
) -> Callable[[dict, Any], torch.Tensor]:
    """Copy ``model`` now (before the policy trains) and return ``(batch, shared_images) -> logps [B, 2]``.

    Under ZeRO-3 the policy was built partitioned (zero.Init), which a deep copy cannot reproduce:
    ``rebuild()`` builds the starting model again, partitioned the same way.
    """
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    if zero3 and rebuild is None:
        raise ValueError("a ZeRO-3 frozen reference needs rebuild(): a partitioned model cannot be copied")
    reference = (rebuild() if zero3 else copy.deepcopy(model)).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    module: Any = reference
    if zero3:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
            "zero_optimization": {
                k: v
                for k, v in ds_config["zero_optimization"].items()
                if not k.startswith("offload_optimizer")
            },
            "bf16": ds_config["bf16"],
        }
        module, *_ = deepspeed.initialize(model=reference, config=config)
        module.eval()
    elif torch.cuda.is_available():
        module = reference.to(torch.device("cuda", torch.cuda.current_device()))

    @torch.no_grad()
    def logps(batch: dict, shared_images: Any) -> torch.Tensor:
        return response_logps(module, batch, shared_images)[0]

    return logps


def adapter_disabled_reference(peft_model: Any) -> Callable[[dict, Any], torch.Tensor]:
    """The peft policy with adapters disabled, called under no_grad. ZeRO-3 gathers the module's
    partitions through the hooks DeepSpeed puts on the modules, so calling it outside the engine works."""

    @torch.no_grad()
    def logps(batch: dict, shared_images: Any) -> torch.Tensor:
        with peft_model.disable_adapter():
            return response_logps(peft_model, batch, shared_images)[0]

    return logps


def cache_key(meta_path: str, model_dir: str | None, data_settings: dict) -> str:
    """What the cached log-probs depend on: the meta file and its annotation files, the starting
    weights and the data settings. A cache whose key differs is refused, never silently used."""
    import hashlib
    import json
    from pathlib import Path

    from vlmtune.data.meta import load_meta

    h = hashlib.sha256()
    h.update(Path(meta_path).read_bytes())
    for spec in load_meta(meta_path):
        # a jsonl file, or a Hugging Face dataset: a parquet file or a directory (save_to_disk, parquet shards)
        files = [spec.annotation] if spec.annotation.is_file() else sorted(spec.annotation.rglob("*"))
        for f in (f for f in files if f.is_file()):
            h.update(f.read_bytes())
        if spec.annotation_format != "jsonl":
            h.update(json.dumps([spec.split, spec.columns], sort_keys=True, default=str).encode())
    if model_dir is not None:
        for weights in sorted(Path(model_dir).glob("*.safetensors")):
            h.update(weights.read_bytes())
    h.update(json.dumps(data_settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def precompute_reference(
    module: torch.nn.Module,
    pairs: list[dict],
    collate: Callable[[list[dict]], dict],
    batch_pairs: int = 8,
    num_batches: int | None = None,
) -> dict[str, list[float]]:
    """Reference log-probs of ``pairs`` (this rank's share): source ("file:line") -> [chosen, rejected].

    ``num_batches`` (the largest count over ranks) keeps every rank calling the model equally often,
    as ZeRO-3 needs: a rank with fewer pairs repeats its first batch and drops the result.
    """
    from vlmtune.train.model.forward import batch_to_device

    out: dict[str, list[float]] = {}
    total = num_batches if num_batches is not None else -(-len(pairs) // batch_pairs)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for b in range(total):
            chunk = pairs[b * batch_pairs : (b + 1) * batch_pairs]
            batch = collate(chunk or pairs[:1])
            logps = response_logps(module, batch_to_device(batch, module))[0].double().cpu()
            if chunk:
                out.update({src: row.tolist() for src, row in zip(batch["sources"], logps)})
    module.train(was_training)
    return out


def cached_reference(cache: dict[str, list[float]]) -> Callable[[dict, Any], torch.Tensor]:
    """``(batch, _) -> logps [B, 2]`` read from a precomputed cache: no reference model in memory."""

    def logps(batch: dict, shared_images: Any) -> torch.Tensor:
        missing = [s for s in batch["sources"] if s not in cache]
        if missing:
            raise KeyError(
                f"no cached reference log-probs for {missing[:3]}: the cache does not match this data"
            )
        device = batch["input_ids"].device
        return torch.tensor([cache[s] for s in batch["sources"]], dtype=torch.float32, device=device)

    return logps
