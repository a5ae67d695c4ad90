"""Checkpoints that a kill can't corrupt: DeepSpeed's own save/load plus our per-rank state.

DeepSpeed writes its ``latest`` file from rank 0 without waiting for the other ranks' shards, so
a kill mid-save can leave ``latest`` naming a half-written checkpoint. We save with
``save_latest=False`` and, only after every rank has finished (DeepSpeed's closing barrier and
ours), rank 0 atomically replaces ``checkpoints/complete`` with the new tag. Resume reads only
that file: a checkpoint interrupted half-way is never the one resumed from.

Our per-rank state (data position, skips, RNG) is JSON; what stays pickled is DeepSpeed's own
checkpoint format (model, optimizer, and the shared client state it stores with them).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlmtune.train.runtime.engine import on_rank0

POINTER = "complete"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _bytes_of(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _tensor_of(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's generator states as JSON values (saved without pickle)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _bytes_of(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _bytes_of(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor_of(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor_of(state["cuda"]))


def _rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"vlmtune_rank{rank:05d}.json"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DiskFullError(OSError):
    """Not enough free space for the next checkpoint (checked before writing, or the write failed)."""


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def estimated_checkpoint_bytes(engine: Any) -> int:
    """What the first checkpoint will take on disk, all ranks together: the weights in their dtype plus,
    for each trained parameter, Adam's two fp32 moments and an fp32 master copy (ZeRO-3 partitions
    counted whole)."""
    total = 0
    for p in engine.module.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        total += numel * p.element_size() + (12 * numel if p.requires_grad else 0)
    return total


def check_free_space(ckpt_root: Path, needed: int, margin: float = 1.1) -> None:
    """Rank 0 looks (the output dir is one shared filesystem), every rank hears the verdict: a full disk
    stops all ranks before anything is written, the complete checkpoint left alone."""

    def verdict() -> str | None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(ckpt_root).free
        if free >= needed * margin:
            return None
        return (
            f"{ckpt_root}: {free / 2**30:.2f} GiB free, the next checkpoint needs about "
            f"{needed * margin / 2**30:.2f} GiB (the last one's size + 10%); free space or lower "
            "train.keep_last, then rerun to resume from the last complete checkpoint"
        )

    message = on_rank0(verdict)
    if message is not None:
        raise DiskFullError(message)


def save_checkpoint(
    engine: Any, out_dir: Path, step: int, shared: dict[str, Any], per_rank: dict[str, Any], keep_last: int
) -> Path:
    """Save model/optimizer/scheduler (DeepSpeed), ``shared`` (rank 0) and ``per_rank`` (each rank), after
    checking there is room for it; a save that fails anyway removes its torn directory."""
    ckpt_root = Path(out_dir) / "checkpoints"
    tag = _tag(step)
    last = latest_complete(out_dir)
    check_free_space(ckpt_root, _last_size(ckpt_root, last) or estimated_checkpoint_bytes(engine))
    shared = dict(shared)
    fingerprint = shared.pop("run", None)  # the resume-critical settings: JSON beside the checkpoint
    try:
        _write_checkpoint(engine, ckpt_root, tag, shared, per_rank)
        if fingerprint is not None and dist.get_rank() == 0:
            write_run_fingerprint(ckpt_root / tag, fingerprint)
    except (OSError, RuntimeError) as e:
        if dist.get_rank() == 0 and tag != last:
            shutil.rmtree(ckpt_root / tag, ignore_errors=True)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "unexpected pos" in str(e)
        if full:
            raise DiskFullError(
                f"{ckpt_root / tag}: the disk filled up while saving ({e}); the torn checkpoint was removed, "
                f"{last or 'no checkpoint'} is the last complete one"
            ) from e
        raise
    dist.barrier()
    rank = dist.get_rank()
    if rank == 0:
        atomic_write(ckpt_root / POINTER, tag)
        _prune(ckpt_root, keep_last, keep=tag)
    dist.barrier()
    return ckpt_root / tag


_SIZES: dict[Path, int] = {}


def _last_size(ckpt_root: Path, tag: str | None) -> int:
    """The size of the last complete checkpoint (rank 0 measures; cached per directory)."""
    if tag is None or dist.get_rank() != 0:
        return 0
    path = ckpt_root / tag
    if path not in _SIZES:
        _SIZES[path] = directory_bytes(path)
    return _SIZES[path]


def _write_checkpoint(
    engine: Any, ckpt_root: Path, tag: str, shared: dict[str, Any], per_rank: dict[str, Any]
) -> None:
    rank = dist.get_rank()
    (ckpt_root / tag).mkdir(parents=True, exist_ok=True)
    # JSON, not a pickle: reading it back at resume must not be able to run code (a shared output dir)
    atomic_write(_rank_file(ckpt_root / tag, rank), json.dumps({**per_rank, "rng": rng_state()}))
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
    rank_file = _rank_file(ckpt_root / tag, dist.get_rank())
    if not rank_file.exists():
        if rank_file.with_suffix(".pt").exists():
            raise RuntimeError(
                f"{rank_file.with_suffix('.pt')}: per-rank state pickled by an older vlmtune, which is not "
                "loaded (unpickling can run code); resume with that version, or start over"
            )
        raise RuntimeError(
            f"{rank_file} is missing: was the world size changed since the checkpoint was written?"
        )
    per_rank = json.loads(rank_file.read_text())
    set_rng_state(per_rank.pop("rng"))
    return client["vlmtune"], per_rank


#: The settings a resumed run must share with the run that wrote the checkpoint for the resume to be exact
#: (the data order and the partition of the optimizer state depend on them).
RESUME_CRITICAL = (
    "world_size",
    "train.micro_batch_size",
    "train.gradient_accumulation_steps",
    "packing.enabled",
    "packing.max_tokens",
    "packing.max_tiles",
    "packing.buffer_size",
    "data.meta_path",
    "data.seed",
    "model.pretrained",
    "lora.enabled",
    "deepspeed.zero_stage",
)
RUN_FILE = "vlmtune_run.json"
#: Differences that are warned about, not refused: a longer run (the schedule stretches from here) and
#: paths that may have moved (a remounted dataset or model directory).
WARN_ONLY = {"train.max_steps", "data.meta_path", "model.pretrained"}


def run_fingerprint(cfg: Any, world_size: int) -> dict[str, Any]:
    """The resume-critical settings of ``cfg`` (saved with every checkpoint, compared at resume)."""
    values: dict[str, Any] = {"world_size": world_size}
    for name in RESUME_CRITICAL[1:]:
        node: Any = cfg
        for part in name.split("."):
            node = getattr(node, part)
        values[name] = (
            str(Path(node).resolve()) if name.endswith(("meta_path", "pretrained")) and node else node
        )
    values["train.max_steps"] = cfg.train.max_steps
    return values


def write_run_fingerprint(ckpt_dir: Path, fingerprint: dict[str, Any]) -> None:
    atomic_write(ckpt_dir / RUN_FILE, json.dumps(fingerprint, indent=2, sort_keys=True))


def resume_tag(out_dir: Path, fingerprint: dict[str, Any]) -> str | None:
    """The checkpoint to resume from, decided by rank 0 and broadcast (ranks reading a shared filesystem
    each for themselves could see different checkpoints and hang), after checking that this run's
    resume-critical settings match the checkpoint's: a mismatch is refused here, before any model is
    built, naming each setting. ``WARN_ONLY`` differences are logged (a different ``max_steps`` stretches
    the learning-rate schedule from the resumed step on)."""
    import logging

    def decide() -> tuple[str, str | None, list[str]]:
        try:
            tag = latest_complete(out_dir)
        except RuntimeError as e:
            return "error", str(e), []
        return "ok", tag, _compare(out_dir, tag, fingerprint) if tag else []

    status, value, notes = on_rank0(decide)
    if status == "error":
        raise RuntimeError(value)
    refusals = [n for n in notes if n.split(" ", 1)[0] not in WARN_ONLY]
    if refusals:
        raise ValueError(
            f"{Path(out_dir) / 'checkpoints' / value}: cannot resume exactly with other settings than the run "
            "that wrote it: " + "; ".join(refusals) + " (restore them, or use another train.output_dir)"
        )
    if notes and dist.get_rank() == 0:
        logging.getLogger("vlmtune").warning("resuming %s with other settings: %s", value, "; ".join(notes))
    return value


def _compare(out_dir: Path, tag: str, fingerprint: dict[str, Any]) -> list[str]:
    path = Path(out_dir) / "checkpoints" / tag / RUN_FILE
    if not path.exists():  # written by an older vlmtune: nothing to compare against
        return []
    saved = json.loads(path.read_text())
    notes = []
    for name in [*RESUME_CRITICAL, "train.max_steps"]:
        if name in saved and saved[name] != fingerprint.get(name):
            notes.append(f"{name} was {saved[name]!r}, now {fingerprint.get(name)!r}")
    return notes
