"""What every benchmark script repeats: summaries of repeated measurements, per-round ratios, memory
readings, fresh child processes, and the JSON result stamped with the command and the machine.

The machine is shared (other jobs come and go), so a figure is only as good as its spread and the load
it ran under: ``announce`` prints the load average before anything is measured and ``write_result``
stores it, with the load at the end, beside the figures.

Scripts import it as ``scripts.bench.common`` (the repository root on ``sys.path``; ``REPO`` below).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and spread ((max - min) / median) of repeated measurements of one quantity."""
    median = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": median, "min": lo, "max": hi, "spread": (hi - lo) / median if median else 0.0}


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """``summary`` of the per-round ratios a_i / b_i: the two sides of a round ran back to back under the
    same load, so their ratio is steadier than the ratio of the two medians."""
    if len(numerators) != len(denominators):
        raise ValueError(f"ratio of series of {len(numerators)} and {len(denominators)} rounds")
    return summary([a / b for a, b in zip(numerators, denominators)])


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The sides of round ``round_index``: as given on even rounds, reversed on odd ones (A B, B A, ...),
    so neither side always runs first (a cold cache, or a neighbour's job starting, hits both alike)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def rss_mib() -> float:
    """This process's resident set now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's own peak resident set since it started (MiB): ``VmHWM``, the high-water mark of its
    address space.

    Not ``ru_maxrss``: Linux carries that across ``execve`` from the address space being replaced, so a
    child started by ``subprocess`` (vfork or fork, then exec) begins with its parent's peak and a light
    child of a heavy parent reports the parent's figure (measured: a child of an 800 MiB parent reads
    813 MiB of ``ru_maxrss`` and 14 MiB of ``VmHWM`` at start).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def machine() -> dict[str, Any]:
    """Cores, load average and library versions: what a reader needs to weigh the figures."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_average": list(os.getloadavg()),  # 1, 5, 15 minutes
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def announce(name: str) -> dict[str, Any]:
    """Print the machine line at the start of a benchmark and return it (for ``write_result``)."""
    m = machine()
    load = " ".join(f"{x:.2f}" for x in m["load_average"])
    print(
        f"{name}: {m['usable_cores']} usable cores of {m['cpu_count']}, load average {load} (1/5/15 min), "
        f"torch {m['torch']} ({m['torch_threads']} threads), OMP_NUM_THREADS={m['OMP_NUM_THREADS']}",
        flush=True,
    )
    return m


def command_line() -> str:
    """The command that produced a result, as one would type it (repository-relative script path)."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + shlex.join(["python", str(shown), *sys.argv[1:]])


def write_result(path: str | Path, result: dict[str, Any], at_start: dict[str, Any]) -> Path:
    """Write ``result`` as JSON with the command, the machine at the start (``announce``), the load
    average at the end and a UTC timestamp; print where it went."""
    path = Path(path)
    stamped = {
        **result,
        "command": command_line(),
        "machine": {**at_start, "load_average_end": list(os.getloadavg())},
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    print(f"-> {path}")
    return path


def child_env(threads: int) -> dict[str, str]:
    """Environment of a measured child: its thread count, the repository importable, nothing online."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
    }


def run_child(script: str | Path, argv: list[str], threads: int, what: str) -> dict[str, Any]:
    """Run ``script argv --child-out F --tmp D`` in a fresh interpreter and return the JSON it wrote to F.

    A fresh process per measurement gives each side its own peak memory and no warm caches from the
    other side. ``D`` is a scratch directory removed afterwards; ``what`` names the side in errors.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *argv, "--child-out", str(out), "--tmp", tmp]
        proc = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def add_child_args(parser: argparse.ArgumentParser, sides: Sequence[str]) -> None:
    """The hidden arguments of a measured child: which side, the tiny checkpoint and meta file it
    trains on, and the two that ``run_child`` appends (``--child-out``, ``--tmp``)."""
    parser.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--meta", help=argparse.SUPPRESS)


def child_main(args: argparse.Namespace, runners: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """In a child: run side ``args.side`` on ``args.threads`` torch threads, seed 0, and write its figures
    where ``run_child`` reads them."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = runners[args.side](args, Path(args.ckpt), Path(args.meta))
    Path(args.child_out).write_text(json.dumps(result))


def run_rounds(
    sides: Sequence[str], repeats: int, run_side: Callable[[str, int], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """``repeats`` rounds of ``run_side(side, round)`` over ``sides`` in ``round_order``: side -> results."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(repeats):
        for side in round_order(sides, r):
            runs[side].append(run_side(side, r))
    return runs
