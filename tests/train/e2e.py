"""Helpers for end-to-end tests: a small dataset + tiny checkpoint, and `vlmtune sft` in subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# ZeRO-3 with every parameter partitioned, as at real sizes: the tiny model's parameters would all
# fall under the default persistence threshold and never be gathered, hiding gather-order mismatches
ZERO3 = {"deepspeed": "zero3", "deepspeed.stage3_param_persistence_threshold": 0}
LORA = {"lora": "both", "model.freeze_vision": True}  # LLM + vision adapters, projector trained in full


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def sft_command(
    overrides: list[str], nproc: int = 1, module: str = "vlmtune.train.commands.sft"
) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *overrides]
    return torchrun("-m", module, *overrides, nproc=nproc)


def torchrun(*args: object, nproc: int = 2) -> list[str]:
    """``args`` (a script and its arguments, or -m module ...) under torchrun on this machine
    (``nproc`` ranks, a free rendezvous port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *map(str, args),
    ]


def run_sft(
    overrides: list[str], nproc: int = 1, timeout: int = 600, module: str = "vlmtune.train.commands.sft"
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        sft_command(overrides, nproc, module),
        cwd=REPO,
        env=sft_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"vlmtune sft failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def base_overrides(ckpt: Path, meta: Path, out: Path, **extra: object) -> list[str]:
    values = {
        "model.pretrained": ckpt,
        "data.meta_path": meta,
        "train.output_dir": out,
        "data.max_length": 1024,
        "packing.max_tokens": 1024,
        "packing.buffer_size": 16,
        "train.log_every": 1,
        "optim.lr": 1e-3,
        "optim.warmup_ratio": 0.0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    """Until a running job's metrics.jsonl has ``n`` lines (it must still be running), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before it was signalled"
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps logged within {timeout} s")
