"""Checkpoints that a kill can't corrupt: DeepSpeed's own save/load plus our per-rank state.

DeepSpeed writes its ``latest`` file from rank 0 without waiting for the other ranks' shards, so
a kill mid-save can leave ``latest`` naming a half-written checkpoint. We save with
``save_latest=False`` and, only after every rank has finished (DeepSpeed's closing barrier and
ours), rank 0 atomically replaces ``checkpoints/complete`` with the new tag. Resume reads only
that file: a checkpoint interrupted half-way is never the one resumed from.

Our per-rank state (data position, skips, RNG) is JSON; what stays pickled is DeepSpeed's own
checkpoint format (model, optimizer, and the shared client state it stores with them).

A checkpoint written by another number of ranks is loaded from its DeepSpeed universal conversion
(``step_N/universal``, made by `train.runtime.elastic`), the per-rank states re-dealt by the caller.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlmtune.train.runtime.engine import on_rank0

POINTER = "complete"
UNIVERSAL = "universal"  # step_N/universal: DeepSpeed's universal form of step_N, for another world size


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
    if path not in _SIZES:  # its universal conversion (an elastic resume's) is not part of the next one
        converted = path / UNIVERSAL
        _SIZES[path] = directory_bytes(path) - (directory_bytes(converted) if converted.is_dir() else 0)
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


def saved_world_size(ckpt_dir: Path) -> int:
    """How many ranks wrote ``ckpt_dir``: its per-rank state files, which must be ranks 0..n-1."""
    ranks = sorted(
        int(f.stem.removeprefix("vlmtune_rank")) for f in Path(ckpt_dir).glob("vlmtune_rank*.json")
    )
    if ranks != list(range(len(ranks))) or not ranks:
        missing = sorted(set(range(max(ranks, default=0) + 1)) - set(ranks)) or [0]
        legacy = _rank_file(Path(ckpt_dir), missing[0]).with_suffix(".pt")
        if legacy.exists():
            raise RuntimeError(
                f"{legacy}: per-rank state pickled by an older vlmtune, which is not loaded (unpickling can run "
                "code); resume with that version, or start over"
            )
        raise RuntimeError(
            f"{ckpt_dir}: the per-rank state of rank(s) {missing} is missing (vlmtune_rank*.json); the checkpoint "
            "is incomplete: restore it, or remove checkpoints/complete to start over"
        )
    return len(ranks)


def load_checkpoint(
    engine: Any,
    out_dir: Path,
    tag: str,
    reshard: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore DeepSpeed state and return (shared, per_rank) states; RNG is restored here.

    An engine configured with ``checkpoint.load_universal`` loads ``tag/universal`` (the checkpoint of
    another world size, converted). When the checkpoint's ranks are not this run's, rank 0 reads every
    old rank's state and ``reshard`` maps them to one state per new rank (broadcast)."""
    ckpt_root = Path(out_dir) / "checkpoints"
    universal = engine.load_universal_checkpoint()
    load_path, client = engine.load_checkpoint(
        str(ckpt_root / tag) if universal else str(ckpt_root),
        tag=UNIVERSAL if universal else tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=not _adapters_only(engine),
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    if universal and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine, ckpt_root / tag / UNIVERSAL)
    per_rank = _rank_state(ckpt_root / tag, reshard)
    set_rng_state(per_rank.pop("rng"))
    return client["vlmtune"], per_rank


def _repair_zero3_universal_load(engine: Any, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3; its ZeRO-1/2 load has neither) when the optimizer
    has more than one parameter group (decay / no decay): every group gets the first group's
    hyperparameters, which would decay biases and norms, and every group's state the same ``step`` tensor,
    which Adam then advances once per group each step (the later groups' bias correction runs ahead).
    Each group's hyperparameters come back from the checkpoint, each state gets its own step."""
    saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    optimizer = engine.optimizer.optimizer
    if len(optimizer.param_groups) != len(saved["param_groups"]):
        raise RuntimeError(
            f"{universal_dir}: {len(saved['param_groups'])} optimizer parameter groups saved, "
            f"{len(optimizer.param_groups)} now: the trained parameters differ from the checkpoint's"
        )
    for group, loaded in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in loaded.items() if k != "params"})
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _rank_state(
    ckpt_dir: Path, reshard: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None
) -> dict[str, Any]:
    """This rank's saved state: its own file, or (another world size) its share of the re-dealt states."""
    world, rank = dist.get_world_size(), dist.get_rank()

    def decide() -> tuple[str, Any]:
        try:
            saved = saved_world_size(ckpt_dir)
        except RuntimeError as e:
            return "error", str(e)
        if saved == world:
            return "own", None
        if reshard is None:
            return "error", f"{ckpt_dir} was written by {saved} ranks, this run has {world}"
        try:  # an error here must reach every rank, not leave them waiting for rank 0's broadcast
            return "new", reshard([json.loads(_rank_file(ckpt_dir, r).read_text()) for r in range(saved)])
        except (ValueError, KeyError, OSError) as e:
            return "error", f"{ckpt_dir}: its {saved} ranks' states could not be re-dealt over {world}: {e}"

    status, value = on_rank0(decide)
    if status == "error":
        raise RuntimeError(value)
    if status == "new":
        return value[rank]
    return json.loads(_rank_file(ckpt_dir, rank).read_text())


#: The settings a resumed run must share with the run that wrote the checkpoint for the resume to be exact
#: (the data order and what the optimizer state covers depend on them); ``model.config`` is the model
#: itself (`_model_identity`), whatever directory it is read from.
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
    "model.config",
    "model.freeze_vision",
    "model.freeze_projector",
    "model.freeze_llm",
    "lora.enabled",
    "deepspeed.zero_stage",
    "train.sequence_parallel_size",
)
RUN_FILE = "vlmtune_run.json"
#: Differences that are warned about, not refused: a longer run (the schedule stretches from here) and
#: paths that may have moved (a remounted dataset or model directory).
WARN_ONLY = {"train.max_steps", "data.meta_path", "model.pretrained"}
#: Differences handled, not refused, as long as their product, the global batch in micro-batches, stays:
#: the optimizer state is re-partitioned (DeepSpeed's universal checkpoint) and the data re-dealt.
ELASTIC = ("world_size", "train.gradient_accumulation_steps")


def _model_identity(model: Any) -> str:
    """A digest of what the model is, not where it lies: the pretrained directory's config.json (a moved
    copy matches, another model does not) or, for random init, the shapes in the config."""
    if model.pretrained:
        config = Path(model.pretrained) / "config.json"
        text = config.read_text() if config.is_file() else ""
    else:
        fields = ("vision", "text", "downsample_ratio", "projector_hidden_act", "vision_feature_layer")
        text = json.dumps({f: getattr(model, f) for f in fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_fingerprint(cfg: Any, world_size: int) -> dict[str, Any]:
    """The resume-critical settings of ``cfg`` (saved with every checkpoint, compared at resume)."""
    values: dict[str, Any] = {"world_size": world_size, "model.config": _model_identity(cfg.model)}
    for name in RESUME_CRITICAL:
        if name in values:
            continue
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
    the learning-rate schedule from the resumed step on), and so are ``ELASTIC`` ones that keep the
    global batch (another world size: `train.runtime.elastic`)."""
    import logging

    def decide() -> tuple[str, str | None, list[str], list[str]]:
        try:
            tag = latest_complete(out_dir)
        except RuntimeError as e:
            return "error", str(e), [], []
        return "ok", tag, *(_compare(out_dir, tag, fingerprint) if tag else ([], []))

    status, value, notes, refusals = on_rank0(decide)
    if status == "error":
        raise RuntimeError(value)
    if refusals:
        raise ValueError(
            f"{Path(out_dir) / 'checkpoints' / value}: cannot resume exactly with other settings than the run "
            "that wrote it: " + "; ".join(refusals) + " (restore them, or use another train.output_dir)"
        )
    if notes and dist.get_rank() == 0:
        logging.getLogger("vlmtune").warning("resuming %s with other settings: %s", value, "; ".join(notes))
    return value


def _compare(out_dir: Path, tag: str, fingerprint: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(every difference from the checkpoint's settings, those refused)."""
    path = Path(out_dir) / "checkpoints" / tag / RUN_FILE
    if not path.exists():  # written by an older vlmtune: nothing to compare against
        return [], []
    saved = json.loads(path.read_text())
    notes, refusals = [], []
    for name in [*RESUME_CRITICAL, "train.max_steps"]:
        if name in saved and saved[name] != fingerprint.get(name):
            notes.append(f"{name} was {saved[name]!r}, now {fingerprint.get(name)!r}")
            if name not in WARN_ONLY and name not in ELASTIC:
                refusals.append(notes[-1])
    if changed := _global_batch_change(saved, fingerprint):
        refusals.append(changed)
    sp = saved.get("train.sequence_parallel_size", 1)
    if sp > 1 and saved.get("world_size") != fingerprint.get("world_size"):  # one stream per SP group
        refusals.append(
            f"world_size was {saved['world_size']!r}, now {fingerprint.get('world_size')!r} with "
            f"train.sequence_parallel_size={sp}: a sequence-parallel run resumes on its own number of ranks only"
        )
    return notes, refusals


def _global_batch_change(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why ``now`` would train with another global batch than the checkpoint's run, and what keeps it."""
    if any(name not in saved for name in ELASTIC):
        return None
    world, gas = saved["world_size"], saved["train.gradient_accumulation_steps"]
    new_world, new_gas = now["world_size"], now["train.gradient_accumulation_steps"]
    if world * gas == new_world * new_gas:
        return None
    fix = (
        f"set train.gradient_accumulation_steps={world * gas // new_world} to keep it"
        if world * gas % new_world == 0
        else f"no gradient_accumulation_steps keeps it on {new_world} ranks: resume on a number of ranks that "
        f"divides {world * gas}"
    )
    return (
        f"the global batch (world_size x train.gradient_accumulation_steps micro-batches) was {world} x {gas} = "
        f"{world * gas}, now {new_world} x {new_gas} = {new_world * new_gas}: {fix}"
    )
