"""Resuming on another number of data-parallel ranks (a SLURM job resubmitted on fewer or more nodes).

What "exact" means here: the global batch is kept (world_size x gradient_accumulation_steps
micro-batches; another one is refused at start, `checkpoint.resume_tag`), the weights and the optimizer
state continue whole, and the samples not consumed at the checkpoint are read first: over the whole run
no sample is skipped or seen twice. Without packing, every step then draws the samples a run on the new
world size from the start draws, and its losses and weights are that run's
(tests/train/commands/test_elastic_resume.py). With packing each rank packs its own share, so the packs
differ from the old world size's: exact in samples and optimizer state, not step for step.

What is partitioned by the world size, and how each part crosses to another one:
- *Weights and optimizer* (ZeRO 1-3: each rank holds 1/world of the fp32 master weights and Adam's
  moments): rank 0 converts the checkpoint once with DeepSpeed's own ``ds_to_universal`` into
  ``step_N/universal`` (one file per parameter and state, whole), and every rank loads that with
  ``checkpoint.load_universal``, taking its new partition. Checked on DeepSpeed 0.19.8 with the CPU
  accelerator and gloo for ZeRO 1, 2 and 3, fp32 and bf16, frozen parameters left out of the checkpoint
  (LoRA); ZeRO-3 with more than one optimizer parameter group needs `checkpoint._repair_zero3_universal_load`.
  ZeRO-0 needs nothing: every rank holds, and DeepSpeed's ``mp_rank_00`` file stores, the whole
  optimizer state, and its plain load does not depend on the world size. CPU offload is not exercised
  here (DeepSpeed's CPU Adam); NVMe offload is refused (DeepSpeed restores its swap files per rank).
- *Data position* (each rank's shard of the epoch, its packing buffer): rank 0 reads every old rank's
  state and re-deals what was not consumed (`data.stream.reshard`).
- *Skips counted so far*: old rank r's go to new rank r mod world (the totals are sums over ranks).
- *RNG*: new rank r gets old rank r mod old-world's generators. Every rank seeds them alike at start
  (`build_starting_model`: torch.manual_seed(train.seed)), the augmentation draws are seeded per sample
  key and the DataLoader has its own generator: the data and the loss do not read them, dropout aside.
  Dropout's masks (LoRA's ``lora.dropout``) follow each rank's generator, which no other world size
  draws alike: such a run resumes the same way each time, but not as a run on the new world size would.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch.distributed as dist

from vlmtune.data.stream import reshard
from vlmtune.train.runtime.checkpoint import (
    UNIVERSAL,
    DiskFullError,
    atomic_write,
    directory_bytes,
    saved_world_size,
)
from vlmtune.train.runtime.engine import on_rank0

log = logging.getLogger("vlmtune")
FAILED = f"{UNIVERSAL}.failed"  # beside universal/: why rank 0's conversion failed, for the waiting ranks


def prepare_resume(out_dir: Path, tag: str | None, ds_config: dict, world_size: int) -> dict:
    """The DeepSpeed config to build the engine with for resuming ``tag``. For a checkpoint written by
    another number of ranks under ZeRO 1-3 the checkpoint is converted first (before any model is built)
    and the config asks DeepSpeed to load the conversion; otherwise ``ds_config`` itself."""
    if tag is None:
        return ds_config
    ckpt_dir = Path(out_dir) / "checkpoints" / tag

    def count() -> tuple[int | None, str | None]:
        try:
            return saved_world_size(ckpt_dir), None
        except RuntimeError as e:
            return None, str(e)

    saved, error = on_rank0(count)
    if error is not None:
        raise RuntimeError(error)
    zero = ds_config["zero_optimization"]
    if saved == world_size:
        return ds_config
    if zero["stage"] == 0:
        if dist.get_rank() == 0:
            log.info(
                "resuming %s (written by %d ranks) on %d ranks: ZeRO-0 checkpoints hold the whole optimizer "
                "state, loaded as saved",
                tag,
                saved,
                world_size,
            )
        return ds_config
    if "nvme" in (
        zero.get("offload_optimizer", {}).get("device"),
        zero.get("offload_param", {}).get("device"),
    ):
        raise ValueError(
            f"{ckpt_dir}: written by {saved} ranks, this run has {world_size}, with NVMe offload "
            "(deepspeed.extra): DeepSpeed restores NVMe-swapped optimizer state per rank, not from its universal "
            f"checkpoint; resume on {saved} ranks, or without NVMe offload"
        )
    ensure_universal(ckpt_dir)
    if dist.get_rank() == 0:
        log.info("resuming %s (written by %d ranks) on %d ranks from %s", tag, saved, world_size, UNIVERSAL)
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def ensure_universal(ckpt_dir: Path, poll_s: float = 1.0) -> None:
    """``ckpt_dir/universal``, converted by rank 0 unless already there (a previous attempt's: it is
    renamed into place only once complete). The other ranks poll the filesystem rather than wait in a
    collective: converting a large checkpoint can outlast the process group's timeout."""
    rank = dist.get_rank()
    target, failed = ckpt_dir / UNIVERSAL, ckpt_dir / FAILED
    if rank == 0:
        failed.unlink(missing_ok=True)  # a previous attempt's
    dist.barrier()
    if rank == 0:
        if target.is_dir():
            log.info("%s: reusing its universal conversion", ckpt_dir)
        else:
            try:
                seconds = convert_to_universal(ckpt_dir)
            except BaseException as e:
                atomic_write(failed, f"{type(e).__name__}: {e}")
                raise
            log.info("%s: converted to DeepSpeed's universal checkpoint in %.1f s", ckpt_dir, seconds)
    else:
        while not target.is_dir():
            if failed.exists():
                raise RuntimeError(
                    f"{ckpt_dir}: rank 0 could not convert it to {UNIVERSAL}: {failed.read_text()}"
                )
            time.sleep(poll_s)
    dist.barrier()


def convert_to_universal(ckpt_dir: Path) -> float:
    """DeepSpeed's ``ds_to_universal`` of ``ckpt_dir`` into ``ckpt_dir/universal``, built aside and renamed
    into place (a conversion killed half-way is never taken for a complete one); returns the seconds it took.

    In-process and serial (its worker pools would fork a process that holds the process group's
    threads). ``inject_missing_state``: DeepSpeed wants a version tag that only Megatron-style clients
    save; this model has no tensor or pipeline parallel layout to describe."""
    from deepspeed.checkpoint.ds_to_universal import main

    needed = directory_bytes(ckpt_dir)
    free = shutil.disk_usage(ckpt_dir).free
    if free < needed * 1.1:
        raise DiskFullError(
            f"{ckpt_dir}: {free / 2**30:.2f} GiB free, its universal conversion needs about "
            f"{needed * 1.1 / 2**30:.2f} GiB; free space, or resume on the number of ranks that wrote it"
        )
    work = ckpt_dir / f".{UNIVERSAL}.partial"
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    main(
        SimpleNamespace(
            input_folder=str(ckpt_dir),
            output_folder=str(work / UNIVERSAL),  # its `latest_universal` goes beside it, in work/
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
    )
    os.replace(work / UNIVERSAL, ckpt_dir / UNIVERSAL)
    shutil.rmtree(work, ignore_errors=True)
    return time.perf_counter() - start


def rank_states(old: list[dict[str, Any]], world_size: int, epoch_size: Callable[[int], int]) -> list[dict]:
    """The per-rank states of ``world_size`` new ranks from the old ranks' (rank order): the stream
    re-dealt (`data.stream.reshard`), old rank r's skips to new rank r mod ``world_size``, and new rank
    r the RNG (and any other entry) of old rank r mod len(old)."""
    streams = reshard([s["stream"] for s in old], epoch_size, world_size)
    new = []
    for rank, stream in enumerate(streams):
        skipped = [e for r, s in enumerate(old) if r % world_size == rank for e in s.get("skipped", [])]
        new.append({**old[rank % len(old)], "stream": stream, "skipped": skipped})
    if dist.is_initialized() and dist.get_rank() == 0:
        log.info(
            "data re-dealt from %d ranks to %d: %d samples not consumed at the checkpoint are read first",
            len(old),
            world_size,
            sum(len(range(*run[1:])) for s in streams for run in s["pending"]),
        )
    return new
