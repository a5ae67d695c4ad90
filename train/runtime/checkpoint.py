"""Checkpoints that a kill can't corrupt: DeepSpeed's own save/load plus our per-rank state.

DeepSpeed writes its ``latest`` file from rank 0 without waiting for the other ranks' shards, so
a kill mid-save can leave ``latest`` naming a half-written checkpoint. We save with
``save_latest=False`` and, only after every rank has finished (DeepSpeed's closing barrier and
ours), rank 0 atomically replaces ``checkpoints/complete`` with the new tag. Resume reads only
that file: a checkpoint interrupted half-way is never the one resumed from.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

POINTER = "complete"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    engine: Any, out_dir: Path, step: int, shared: dict[str, Any], per_rank: dict[str, Any], keep_last: int
) -> Path:
    """Save model/optimizer/scheduler (DeepSpeed), ``shared`` (rank 0) and ``per_rank`` (each rank)."""
    ckpt_root = Path(out_dir) / "checkpoints"
    tag = _tag(step)
    rank = dist.get_rank()
    (ckpt_root / tag).mkdir(parents=True, exist_ok=True)
    torch.save({**per_rank, "rng": rng_state()}, ckpt_root / tag / f"vlmtune_rank{rank:05d}.pt")
    if _adapters_only(engine):  # each checkpoint is also a standard peft adapter directory
        from vlmtune.train.model.lora import peft_model_of, trainable_state_dict

        state = trainable_state_dict(engine)
        if rank == 0:
            peft_model_of(engine).save_pretrained(ckpt_root / tag / "adapter", state_dict=state)
    engine.save_checkpoint(
        str(ckpt_root),
        tag=tag,
        client_state={"vlmtune": shared},
        save_latest=False,
        exclude_frozen_parameters=_adapters_only(engine),
    )
    dist.barrier()
    if rank == 0:
        _atomic_write(ckpt_root / POINTER, tag)
        _prune(ckpt_root, keep_last, keep=tag)
    dist.barrier()
    return ckpt_root / tag


def _prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for name in tags[: max(0, len(tags) - keep_last)]:
        if name != keep:
            shutil.rmtree(ckpt_root / name, ignore_errors=True)


def latest_complete(out_dir: Path) -> str | None:
    pointer = Path(out_dir) / "checkpoints" / POINTER
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (pointer.parent / tag).is_dir():
        raise RuntimeError(
            f"{pointer} names {tag}, which is missing: restore it, or remove the pointer to start over"
        )
    return tag


def _adapters_only(engine: Any) -> bool:
    """LoRA runs checkpoint only what trains: the frozen base comes from the pretrained directory."""
    from vlmtune.train.model.lora import peft_model_of

    return peft_model_of(engine) is not None


def load_checkpoint(engine: Any, out_dir: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore DeepSpeed state and return (shared, per_rank) states; RNG is restored here."""
    ckpt_root = Path(out_dir) / "checkpoints"
    load_path, client = engine.load_checkpoint(
        str(ckpt_root),
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=not _adapters_only(engine),
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    rank_file = ckpt_root / tag / f"vlmtune_rank{dist.get_rank():05d}.pt"
    if not rank_file.exists():
        raise RuntimeError(
            f"{rank_file} is missing: was the world size changed since the checkpoint was written?"
        )
    per_rank = torch.load(rank_file, weights_only=False)
    set_rng_state(per_rank.pop("rng"))
    return client["vlmtune"], per_rank
