"""Distributed set-up and the DeepSpeed engine: one code path from a laptop CPU to many GPU nodes."""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from vlmtune.train.runtime.config import DeepSpeedConfig, OptimConfig, TrainConfig


def use_cpu() -> bool:
    return not torch.cuda.is_available()


def init_distributed() -> tuple[int, int]:
    """Start the process group (gloo on CPU, nccl on GPU) whether launched by torchrun, deepspeed or not at all."""
    if use_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python`/`vlmtune` run: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        deepspeed.init_distributed(
            dist_backend="gloo" if use_cpu() else "nccl", timeout=datetime.timedelta(minutes=30)
        )
    if not use_cpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Release the finished run's engines now; tear the process group down at interpreter exit.

    With a DeepSpeed engine still alive when the process group is destroyed at exit, gloo runs
    abort (SIGABRT) in a third to a half of runs; the caller has dropped its engines, and the
    collection here frees them. The group itself is kept until exit because DeepSpeed caches its
    groups: a second run in the same process (a Hydra multirun sweep) must reuse it.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        global _EXIT_HOOK
        if not _EXIT_HOOK:
            atexit.register(_destroy_process_group)
            _EXIT_HOOK = True


_EXIT_HOOK = False


def on_rank0(decide: Callable[[], Any]) -> Any:
    """``decide()`` run by global rank 0 alone, its result broadcast to every rank: a decision every rank
    must share, taken from one view of the filesystem (ranks looking for themselves could disagree and hang)."""
    value = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def _destroy_process_group() -> None:
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "fp32" if use_cpu() else "bf16"
    if precision not in {"bf16", "fp32"}:
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    return precision


def build_ds_config(ds: DeepSpeedConfig, train: TrainConfig, optim: OptimConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for this run, generated from the structured config.

    Sequence parallelism needs nothing here: each rank's loss is its share of the group's, so DeepSpeed's
    ordinary average over all ranks is right (train/model/sequence_parallel.py); the world must divide.
    """
    from vlmtune.train.model.sequence_parallel import check_world

    check_world(train.sequence_parallel_size, world_size)
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {ds.zero_stage}")
    if ds.offload_param and ds.zero_stage != 3:
        raise ValueError("deepspeed.offload_param needs zero_stage 3")
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm and not use_cpu(),
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not use_cpu()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not use_cpu()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": resolve_precision(train.precision) == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:  # ZeRO-Offload steps on CPU with DeepSpeed's CPU Adam
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        }
    return _deep_merge(config, dict(ds.extra))


@contextmanager
def partitioned_construction(ds_config: dict) -> Iterator[bool]:
    """Under ZeRO-3, build (and load) the model already partitioned; yields whether it does.

    transformers creates each parameter inside ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig``
    is alive: a rank never holds more than its 1/world share of the weights, and only global rank 0
    reads the checkpoint's values. Without it every rank of a node would first build the whole
    model in CPU memory (38B in bf16: 76 GB per rank) before DeepSpeed partitions it. The config
    stays alive for the whole run, as transformers' Trainer keeps it, so that transformers code
    asking "is ZeRO-3 on?" (generation's rank sync, embedding resizes) answers right.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield False
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)
    try:
        yield True
    finally:
        del alive
        unset_hf_deepspeed_config()


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(dict(base[key]), value)
        else:
            base[key] = value
    return base


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, scales).

    By the parameter's full shape: a ZeRO-3 parameter built partitioned (zero.Init) holds a flat 1-D
    shard, so its own ``ndim`` would put every matrix among the biases (weight decay silently off);
    DeepSpeed keeps the full shape in ``ds_shape``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to ``min_ratio``."""
    import math

    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def create_engine(model: torch.nn.Module, ds_config: dict, optim: OptimConfig, max_steps: int):
    """deepspeed.initialize with our optimizer and schedule (saved and restored by DeepSpeed's checkpoints)."""
    import deepspeed

    groups = param_groups(model, optim.weight_decay)
    warmup = int(round(optim.warmup_ratio * max_steps))

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_with_warmup(s, max_steps, warmup, optim.min_lr_ratio)
        )

    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=not use_cpu() or None
        )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=ds_config,
    )
    return engine, optimizer, scheduler
