"""Benchmark ZeRO: peak memory per rank, ZeRO-3 on two CPU ranks vs one rank without ZeRO (issue #6).

A model big enough that weights, gradients and Adam states dominate memory: the tiny InternVL3's vision
tower and projector with a wider, deeper random-init Qwen2 LLM (``--hidden``, ``--layers``: ~70M
parameters by default, ~1.1 GB of fp32 model states at 16 bytes/param), the tiny checkpoint's
tokenizer (``model.pretrained=null model.tokenizer=<tiny dir>``). Each layout trains the real
`vlmtune sft` (``python -m vlmtune.train.commands.sft``, ``DS_ACCELERATOR=cpu``, fp32) for ``--steps`` steps on
short packs of synthetic data, so activations stay small beside the model states:

- **zero0**: one process, ZeRO-0 (each rank would hold everything);
- **zero3**: two processes (``torch.distributed.run``), ZeRO-3 with
  ``stage3_param_persistence_threshold=0`` (every parameter partitioned, as at real sizes);
- **zero2** (``--zero2``): two processes, ZeRO-2.

Each rank runs ``vlmtune.train.commands.sft`` inside this script (``--rank-child``), which writes the process's own
peak RSS (``VmHWM``, see ``common.peak_rss_mib``; not ``ru_maxrss``, which a child inherits from its
parent) to a file per rank on exit: the whole process's peak, imports, model build and
DeepSpeed's partitioning included. ``idle`` is a process that imports the same modules (torch,
deepspeed, transformers, vlmtune.train.commands.sft) and exits: its peak is subtracted to give the training part
("growth"). Beside the measurements, the model-state bytes per rank that ``vlmtune plan``
(``train.plan.make_plan``) predicts for the same config, fp32, on ``nproc`` "GPUs". Under ZeRO-3
vlmtune builds the model already partitioned (``deepspeed.zero.Init``, train/runtime/engine.py).

What it found (72M parameters): with DeepSpeed's default buffers a ZeRO-3 rank peaks ABOVE the ZeRO-0
rank (1.20x), because those buffers are sized for billions of parameters (50M-element reduce and
prefetch buckets, up to 1e9 parameters left gathered: more than this whole model) and glibc keeps
freed gather buffers in its heap. ``--bounded-buffers`` sizes them to the model and
``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return big frees: then 0.90x peak, 0.84x growth.
At real sizes the buffers are a small fraction of a rank's partition.

Layouts run interleaved (zero0, zero3, idle, then reversed ...) over ``--repeats`` rounds, each in
fresh processes; per-rank figures are median [min, max] over rounds, ratios zero3 / zero0 per round.
A round of the default sizes takes about 3 minutes on 2 shared CPU cores (mostly process start-up and
DeepSpeed initialisation); peak RSS varies little between rounds, so ``--repeats 2`` is a usable check.

    OMP_NUM_THREADS=1 python scripts/bench/bench_zero.py [--smoke] [--out outputs/bench/zero.json]
    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python scripts/bench/bench_zero.py --bounded-buffers
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.bench.common import announce, peak_rss_mib, ratio, round_order, summary, write_result  # noqa: E402
from tests.train.e2e import free_port, sft_env  # noqa: E402

MIB = 2**20
LAYOUTS = {  # name -> (processes, Hydra overrides)
    "zero0": (1, {"deepspeed": "zero0"}),
    "zero3": (2, {"deepspeed": "zero3", "deepspeed.stage3_param_persistence_threshold": 0}),
    "zero2": (2, {"deepspeed": "zero2"}),
}
# DeepSpeed's ZeRO buffers sized for billions of parameters (50M-element reduce and prefetch buckets,
# up to 1e9 parameters left gathered) hold more than this whole 72M model: sized down to the model here
BOUNDED_BUFFERS = {
    "deepspeed.reduce_bucket_size": 1_000_000,
    "deepspeed.stage3_prefetch_bucket_size": 1_000_000,
    "+deepspeed.extra.zero_optimization.stage3_max_live_parameters": 1_000_000,
    "+deepspeed.extra.zero_optimization.stage3_max_reuse_distance": 0,
}
IDLE_IMPORTS = (
    "import torch, deepspeed, transformers, vlmtune.train.commands.sft, vlmtune.train.runtime.loop, "
    "vlmtune.train.runtime.engine"
)


def prepare(workdir: Path, num_train: int) -> tuple[Path, Path]:
    """The tiny checkpoint (for its tokenizer) and a synthetic SFT dataset under ``workdir``."""
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    ckpt = workdir / "tiny"
    if not (ckpt / "config.json").exists():
        build_tiny_checkpoint(ckpt)
    data = workdir / f"sft_{num_train}"
    meta = data / "meta_train.json"
    if not meta.exists():
        meta = Path(generate_sft_dataset(data, num_train=num_train, num_eval=0, seed=0))
    return ckpt, meta


def model_overrides(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    """The wide random-init LLM on the tiny vision tower, fp32 (what DeepSpeed's CPU path trains in)."""
    heads = args.hidden // 64
    return {
        "model.pretrained": "null",
        "model.tokenizer": ckpt,
        "model.text.hidden_size": args.hidden,
        "model.text.num_hidden_layers": args.layers,
        "model.text.num_attention_heads": heads,
        "model.text.num_key_value_heads": max(1, heads // 4),
        "model.text.intermediate_size": args.intermediate,
        "model.gradient_checkpointing": False,
        "train.precision": "fp32",
    }


def run_overrides(args: argparse.Namespace, layout: str, ckpt: Path, meta: Path, out: Path) -> list[str]:
    values = {
        **model_overrides(args, ckpt),
        **LAYOUTS[layout][1],
        **(BOUNDED_BUFFERS if args.bounded_buffers and layout != "zero0" else {}),
        "data.meta_path": meta,
        "train.output_dir": out,
        "train.max_steps": args.steps,
        "train.save_every": 0,
        "train.export": False,
        "train.log_every": 1,
        "data.max_length": args.tokens,
        "packing.max_tokens": args.tokens,
        "packing.buffer_size": 8,
        "optim.warmup_ratio": 0.0,
    }
    return [f"{k}={v}" for k, v in values.items()]


def planned(args: argparse.Namespace, layout: str, ckpt: Path) -> dict[str, Any]:
    """``vlmtune plan``'s model-state bytes per rank for the same model and layout (fp32, nproc ranks)."""
    from vlmtune.train.commands.plan import Hardware, make_plan
    from vlmtune.train.runtime.config import compose_config

    nproc, ds = LAYOUTS[layout]
    overrides = [f"{k}={v}" for k, v in {**model_overrides(args, ckpt), **ds}.items()]
    plan = make_plan(compose_config("sft", overrides), "sft", Hardware(1, nproc, 80.0, None))
    gpu = plan["model_states"]["gpu"]
    return {
        "parameters": plan["parameters"]["total"],
        "trainable": plan["parameters"]["trainable"],
        "model_states_per_rank_mib": {k: v / MIB for k, v in gpu.items()},
        "fp32_weights_mib": 4 * plan["parameters"]["total"] / MIB,
    }


def run_layout(args: argparse.Namespace, layout: str, ckpt: Path, meta: Path) -> list[float]:
    """Peak RSS (MiB) of each rank of one `vlmtune sft` run, in rank order."""
    nproc = LAYOUTS[layout][0]
    with tempfile.TemporaryDirectory() as tmp:
        peaks = Path(tmp) / "peaks"
        peaks.mkdir()
        child = [__file__, "--rank-child", str(peaks), "--"]
        child += run_overrides(args, layout, ckpt, meta, Path(tmp) / "run")
        if nproc == 1:
            cmd = [sys.executable, *child]
        else:
            launch = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
            cmd = [sys.executable, *launch, f"--master_port={free_port()}", *child]
        env = {**sft_env(), "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{layout} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        files = sorted(peaks.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        if len(files) != nproc:
            raise RuntimeError(f"{layout}: {len(files)} rank peak files, expected {nproc}")
        return [json.loads(f.read_text())["maxrss_mib"] for f in files]


def run_idle(args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a process that only imports what a training rank imports."""
    code = f"{IDLE_IMPORTS}; from scripts.bench.common import peak_rss_mib; print(peak_rss_mib())"
    env = {**sft_env(), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"idle import failed:\n{proc.stderr[-4000:]}")
    return float(proc.stdout.split()[-1])


def rank_child(peaks: Path, overrides: list[str]) -> None:
    """Run ``vlmtune.train.commands.sft`` in this process and record its peak RSS on the way out (exit or exception)."""
    rank = os.environ.get("RANK", "0")

    def write() -> None:
        (peaks / f"rank{rank}.json").write_text(json.dumps({"rank": int(rank), "maxrss_mib": peak_rss_mib()}))

    atexit.register(write)
    sys.argv = ["vlmtune.train.commands.sft", *overrides]
    runpy.run_module("vlmtune.train.commands.sft", run_name="__main__", alter_sys=True)


def summarise(
    runs: dict[str, list[list[float]]], idle: list[float], plans: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Per layout: each rank's peak and growth over the idle process; ratios to zero0 per round."""
    base = statistics.median(idle)
    layouts: dict[str, Any] = {}
    for name, rounds in runs.items():
        nproc = LAYOUTS[name][0]
        worst = [max(r) for r in rounds]
        layouts[name] = {
            "processes": nproc,
            "peak_rss_mib_per_rank": [summary([r[k] for r in rounds]) for k in range(nproc)],
            "growth_mib_per_rank": [summary([r[k] - i for r, i in zip(rounds, idle)]) for k in range(nproc)],
            "max_rank_peak_rss_mib": summary(worst),
            "max_rank_growth_mib": summary([w - i for w, i in zip(worst, idle)]),
            "plan": plans[name],
        }
    ratios = {}
    for name in runs:
        if name == "zero0":
            continue
        pairs = list(zip(runs[name], runs["zero0"], idle))
        ratios[f"{name}_over_zero0"] = {
            "peak_rss": ratio([max(a) for a, _, _ in pairs], [b[0] for _, b, _ in pairs]),
            "growth": ratio([max(a) - i for a, _, i in pairs], [b[0] - i for _, b, i in pairs]),
            "planned_model_states": plans[name]["model_states_per_rank_mib"]["total"]
            / plans["zero0"]["model_states_per_rank_mib"]["total"],
        }
    return {
        "idle_peak_rss_mib": summary(idle),
        "idle_imports": IDLE_IMPORTS,
        "idle_baseline_mib": base,
        "layouts": layouts,
        "ratios": ratios,
        "settings": {
            k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "tokens", "steps", "repeats")
        }
        | {"threads": args.threads, "precision": "fp32", "zero2": args.zero2}
        | {
            "bounded_buffers": args.bounded_buffers,
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        },
        "runs": {"idle": idle, **runs},
    }


def report(result: dict[str, Any]) -> None:
    def fmt(v: dict[str, float]) -> str:
        return f"{v['median']:8.0f} [{v['min']:.0f}, {v['max']:.0f}]"

    print(f"idle process (same imports): peak RSS {fmt(result['idle_peak_rss_mib'])} MiB")
    for name, lay in result["layouts"].items():
        p = lay["plan"]
        ms = p["model_states_per_rank_mib"]
        print(
            f"{name} ({lay['processes']} proc), {p['parameters'] / 1e6:.1f}M params; plan per rank: "
            f"model states {ms['total']:.0f} MiB (weights {ms['weights']:.0f}, gathered layer "
            f"{ms['gathered_layer']:.0f}, grads {ms['grads']:.0f}, optimizer {ms['optimizer']:.0f})"
        )
        for k, (peak, growth) in enumerate(zip(lay["peak_rss_mib_per_rank"], lay["growth_mib_per_rank"])):
            print(f"  rank {k}: peak RSS {fmt(peak)} MiB, growth over idle {fmt(growth)} MiB")
    for name, r in result["ratios"].items():
        print(
            f"{name}: peak RSS {r['peak_rss']['median']:.2f}x [{r['peak_rss']['min']:.2f}, "
            f"{r['peak_rss']['max']:.2f}], growth {r['growth']['median']:.2f}x [{r['growth']['min']:.2f}, "
            f"{r['growth']['max']:.2f}], planned model states {r['planned_model_states']:.2f}x"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="small model, 1 step, 1 round")
    parser.add_argument("--hidden", type=int, default=1024, help="LLM hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=6, help="LLM decoder layers")
    parser.add_argument("--intermediate", type=int, default=2816, help="LLM MLP width")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per pack (small: states dominate)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, each layout in fresh processes")
    parser.add_argument("--zero2", action="store_true", help="also run ZeRO-2 on two ranks")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument(
        "--bounded-buffers",
        action="store_true",
        help="ZeRO buckets and live-parameter limits sized to this small model (BOUNDED_BUFFERS)",
    )
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "bench" / "zero_work"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "zero.json"))
    parser.add_argument("--rank-child", help=argparse.SUPPRESS)  # child: run vlmtune sft, write its peak
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.intermediate, args.steps, args.repeats = 512, 4, 1408, 1, 1
    return args


def main() -> None:
    args = parse_args()
    if args.rank_child:
        rank_child(Path(args.rank_child), args.overrides)
        return

    at_start = announce("bench_zero")
    ckpt, meta = prepare(Path(args.workdir), 64)
    names = ["zero0", "zero3"] + (["zero2"] if args.zero2 else [])
    plans = {name: planned(args, name, ckpt) for name in names}
    runs: dict[str, list[list[float]]] = {name: [] for name in names}
    idle: list[float] = []
    for r in range(args.repeats):
        for name in round_order([*names, "idle"], r):
            if name == "idle":
                idle.append(run_idle(args))
            else:
                runs[name].append(run_layout(args, name, ckpt, meta))
    result = summarise(runs, idle, plans, args)
    report(result)
    write_result(args.out, result, at_start)


if __name__ == "__main__":
    main()
