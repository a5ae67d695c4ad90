"""Benchmark the chunked LM head (train/model/lm_head.py) against the full-logits path.

InternVL3-1B's head at its real shape (hidden 896, vocabulary 151,674; random weights) on N fully
supervised tokens: one forward + backward of the SFT-form loss (a weighted sum of -log p, "token"
weights 1/N). Three sides:

  full     the full-logits path (``model.head_chunk_size=0``): ``weighted_nll_sum(F.linear(hidden, W), ...)``,
           i.e. cross-entropy on the [N, V] fp32 logits
  chunked  ``-(chunked_token_logps(hidden, W, targets) * weights).sum()``: a chunk of rows at a time,
           the backward recomputing each chunk's logits (exact for any per-token upstream: MPO's too)
  fused    ``-weighted_logp_sum(hidden, W, targets, weights)``: the SFT form only, its gradients made
           in the forward pass while each chunk's logits are at hand (no recomputation)

Each measurement runs in a fresh process (``run_child``), the sides interleaved and their order
alternating every round. Reported per size: median [min, max] of the step time (forward and backward
apart too) and of the peak RSS growth above the process's RSS just before the step (the step's whole
transient memory, the head's weight gradient included), the per-round ratios chunked / full, and the
loss and gradient norms of the sides. A full side whose estimated peak (3 [N, V] fp32 buffers: the
saved log-softmax, the gradient of the gathered log-probs, the gradient of the logits) exceeds
``--memory-fraction`` of the machine's available memory is not run; its estimate is reported instead.
The issue's target: at 8k tokens, peak growth <= 0.2x the full path's and step time <= 1.15x.

``--body-layers L`` (issue #17) makes a side a real model instead: ``build_model`` on
configs/model/internvl3_1b.yaml's text config (Qwen2.5-0.5B: hidden 896, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151,674, its embeddings and untied head) cut to L decoder layers, in the
yaml's dtype (bf16) with its gradient checkpointing, random weights, ``packed_sdpa`` attention (what
``attn_implementation: auto`` picks on a CPU) and configs/model/tiny.yaml's vision tower (the row is
text-only: the tower sees one blank tile, as in training). The row is one packed row of N tokens in
samples of ``--sample-tokens``, every position supervised ("token" weights 1/N), and the loss is the
training path's, ``forward_weighted_nll`` (train/objectives/logps.py): ``full`` is
``model.head_chunk_size=0``, ``chunked`` the default chunk size (the SFT form: ``weighted_logp_sum``,
gradients made in the forward). Peak growth then also holds the body's activations and every
parameter's gradient; the full side's estimate adds the model-dtype logits and those gradients.

    python scripts/bench/bench_lm_head.py                    # N = 4k, 8k, 16k; 5 rounds
    python scripts/bench/bench_lm_head.py --body-layers 2    # the same through a 2-layer InternVL3-1B
    python scripts/bench/bench_lm_head.py --smoke            # tiny sizes, 2 rounds, seconds
    python scripts/bench/bench_lm_head.py --vocab 37919      # V/4: same ratios (all terms scale with V), 4x faster
    python scripts/bench/bench_lm_head.py --sizes 8192 --dtype float32 --chunk-size 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.bench.common import (  # noqa: E402
    announce,
    peak_rss_mib,
    ratio,
    rss_mib,
    run_child,
    run_rounds,
    summary,
    write_result,
)

SIDES = ("full", "chunked", "fused")
BODY_SIDES = ("full", "chunked")  # the chunked side through forward_weighted_nll is the SFT form ("fused")
MODEL_YAML = REPO / "configs" / "model" / "internvl3_1b.yaml"
VISION_YAML = REPO / "configs" / "model" / "tiny.yaml"  # a text-only row: the tower sees one blank tile
HIDDEN, VOCAB = 896, 151_674  # InternVL3-1B (Qwen2.5-0.5B): hidden size and vocabulary
FULL_BUFFERS = 3  # [N, V] fp32 buffers alive at once in the full path's backward (see the docstring)


def full_peak_estimate_bytes(n: int, vocab: int, hidden: int, elem: int) -> int:
    """What the full side needs above its start: its [N, V] fp32 buffers and the head's weight gradient."""
    return FULL_BUFFERS * n * vocab * 4 + vocab * hidden * elem


def body_text_config(layers: int, vocab: int) -> dict[str, Any]:
    """InternVL3-1B's text config (configs/model/internvl3_1b.yaml) cut to ``layers`` decoder layers."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_container(OmegaConf.load(MODEL_YAML).text, resolve=True)
    return {**text, "num_hidden_layers": layers, "vocab_size": vocab}


def body_full_estimate_bytes(n: int, text: dict[str, Any], elem: int) -> int:
    """The full side through the model: the head's estimate, the model-dtype logits beside their fp32 copy
    (bf16 only) and a gradient for every LLM parameter (the body's activations, under checkpointing a few
    [N, H] per layer, are left out)."""
    h, v, inter, layers = (
        text["hidden_size"],
        text["vocab_size"],
        text["intermediate_size"],
        text["num_hidden_layers"],
    )
    kv = h // text["num_attention_heads"] * text["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    params = 2 * v * h + layers * per_layer
    logits = n * v * elem if elem != 4 else 0
    return FULL_BUFFERS * n * v * 4 + logits + params * elem


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def measure_step(loss_of: Callable[[int], Any], n: int) -> dict[str, float]:
    """The measured forward + backward of ``loss_of(n)`` (after a garbage collection): the step's times, the
    RSS just before it and the peak RSS growth above that, and the loss."""
    gc.collect()
    before = rss_mib()
    t0 = time.perf_counter()
    loss = loss_of(n)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = peak_rss_mib()
    return {
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "step_s": t2 - t0,
        "rss_before_mib": before,
        "peak_growth_mib": peak - before,
        "loss": loss.item(),
    }


def body_child(args: argparse.Namespace) -> dict[str, Any]:
    """One side, one size through a real model (``--body-layers``): built as training builds it, then a
    warm-up step on a short row (chunked with a smaller chunk, below the measured peak) and the measured
    forward + backward of ``forward_weighted_nll`` on the N-token row."""
    import torch
    from omegaconf import OmegaConf

    from vlmtune.train.model.build import ModelConfig, build_model
    from vlmtune.train.model.lm_head import HEAD_CHUNK_ATTR
    from vlmtune.train.objectives.logps import forward_weighted_nll

    yaml = OmegaConf.load(MODEL_YAML)
    image_token = min(int(yaml.image_token_id), args.vocab - 1)  # --smoke's small vocabulary
    cfg = ModelConfig(
        name=f"internvl3_1b_{args.body_layers}_layers",
        vision=OmegaConf.to_container(OmegaConf.load(VISION_YAML).vision),
        text=body_text_config(args.body_layers, args.vocab),
        downsample_ratio=yaml.downsample_ratio,
        tie_word_embeddings=yaml.tie_word_embeddings,
        image_token_id=image_token,
        dtype=args.dtype,
        attn_implementation="packed_sdpa",
        gradient_checkpointing=args.gradient_checkpointing,
        head_chunk_size=0 if args.side == "full" else args.chunk_size,
    )
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    model.train()
    rng = torch.Generator().manual_seed(args.seed)
    n = args.n
    input_ids = torch.randint(0, image_token, (1, n), generator=rng)  # no <IMG_CONTEXT>: text only
    position_ids = (torch.arange(n) % args.sample_tokens).unsqueeze(0)  # samples packed in one row
    targets = torch.randint(0, args.vocab, (1, n), generator=rng)
    weights = torch.full((1, n), 1.0 / n)  # "token" reduction, fully supervised
    size = cfg.vision["image_size"]

    def loss_of(rows: int) -> torch.Tensor:
        batch = {
            "input_ids": input_ids[:, :rows],
            "position_ids": position_ids[:, :rows],
            "pixel_values": torch.zeros(0, 3, size, size, dtype=model.dtype),
        }
        keep = torch.arange(rows)
        return forward_weighted_nll(model, batch, keep, targets[:, :rows], weights[:, :rows])

    rows = min(n, 256)
    if args.side != "full":  # the chunked path on the short row too
        setattr(model, HEAD_CHUNK_ATTR, min(args.chunk_size, rows // 2))
    loss_of(rows).backward()
    setattr(model, HEAD_CHUNK_ATTR, cfg.head_chunk_size)
    model.zero_grad(set_to_none=True)
    measured = measure_step(loss_of, n)
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    return {
        **measured,
        "grad_head_norm": model.lm_head.weight.grad.double().norm().item(),
        "grad_embed_norm": model.get_input_embeddings().weight.grad.double().norm().item(),
        "grad_total_norm": torch.stack([grad.norm() for grad in grads]).norm().item(),
        "threads": torch.get_num_threads(),
    }


def child(args: argparse.Namespace) -> None:
    """One side, one size, in a fresh process: a warm-up step on a few rows (lazy matmul initialisation,
    below the measured step's peak), then the measured forward + backward."""
    import torch
    import torch.nn.functional as F

    from vlmtune.train.model.lm_head import chunked_token_logps, weighted_logp_sum
    from vlmtune.train.objectives.losses import weighted_nll_sum

    try:  # if memory runs out, the kernel kills this child first, not a neighbour's job
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    torch.set_num_threads(args.threads)
    if args.body_layers:
        Path(args.child_out).write_text(json.dumps(body_child(args)))
        return
    dtype = getattr(torch, args.dtype)
    n, vocab, hidden_size = args.n, args.vocab, args.hidden
    rng = torch.Generator().manual_seed(args.seed)
    weight = (torch.randn(vocab, hidden_size, generator=rng) * 0.02).to(dtype).requires_grad_()
    hidden = torch.randn(n, hidden_size, generator=rng).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=rng)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)  # "token" reduction, fully supervised

    def loss_of(rows: int) -> torch.Tensor:
        h, t, w = hidden[:rows], targets[:rows], weights[:rows]
        if args.side == "full":
            return weighted_nll_sum(F.linear(h, weight), t, w)
        if args.side == "fused":
            return -weighted_logp_sum(h, weight, t, w, chunk_size=args.chunk_size)
        return -(chunked_token_logps(h, weight, t, chunk_size=args.chunk_size) * w).sum()

    loss_of(min(n, 2 * args.chunk_size, 256)).backward()
    hidden.grad = weight.grad = None
    result = {
        **measure_step(loss_of, n),
        "grad_hidden_norm": hidden.grad.double().norm().item(),
        "grad_weight_norm": weight.grad.double().norm().item(),
        "threads": torch.get_num_threads(),
    }
    Path(args.child_out).write_text(json.dumps(result))


def side_argv(args: argparse.Namespace, side: str, n: int) -> list[str]:
    return [
        "--side", side, "--n", str(n), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
        "--dtype", args.dtype, "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
        "--seed", str(args.seed), "--body-layers", str(args.body_layers),
        "--sample-tokens", str(args.sample_tokens),
        "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
    ]  # fmt: skip


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def size_report(args: argparse.Namespace, n: int, runs: dict[str, list[dict]], skipped: str | None) -> dict:
    """Summaries of one size's rounds, the per-round ratios to the full side and each side's agreement with it."""
    keys = ("step_s", "forward_s", "backward_s", "peak_growth_mib")
    out: dict[str, Any] = {"n": n, "full_skipped": skipped}
    out["full_estimate_mib"] = full_estimate_bytes(args, n) / 2**20
    for side, rs in runs.items():
        if rs:
            out[side] = {k: {**summary([r[k] for r in rs]), "per_round": [r[k] for r in rs]} for k in keys}
            out[side]["loss"] = rs[0]["loss"]
            out[side]["loss_spread_over_rounds"] = max(r["loss"] for r in rs) - min(r["loss"] for r in rs)
            for k in grad_keys(rs[0]):
                out[side][k] = rs[0][k]
    if runs["full"]:
        full = runs["full"]
        for side in list(runs)[1:]:
            if runs[side]:
                out[f"{side}_over_full"] = {
                    k: ratio([r[k] for r in runs[side]], [r[k] for r in full])
                    for k in ("step_s", "peak_growth_mib")
                }
                out[f"{side}_agreement"] = {
                    k: max(rel_diff(c[k], f[k]) for c, f in zip(runs[side], full))
                    for k in ("loss", *grad_keys(full[0]))
                }
    return out


def grad_keys(result: dict[str, Any]) -> list[str]:
    """The gradient norms a child reported (the head alone: hidden and weight; a model: head, embeddings, all)."""
    return [k for k in result if k.startswith("grad_")]


def full_estimate_bytes(args: argparse.Namespace, n: int) -> int:
    if args.body_layers:
        return body_full_estimate_bytes(n, body_text_config(args.body_layers, args.vocab), args.elem)
    return full_peak_estimate_bytes(n, args.vocab, args.hidden, args.elem)


def print_size(rep: dict, sides: list[str]) -> None:
    n = rep["n"]
    for side in sides:
        if side not in rep:
            print(
                f"  N={n:<6} {side:<8} not run: {rep['full_skipped']} "
                f"(estimated peak growth {rep['full_estimate_mib'] / 1024:.1f} GiB)"
            )
            continue
        s, f, b, m = (rep[side][k] for k in ("step_s", "forward_s", "backward_s", "peak_growth_mib"))
        print(
            f"  N={n:<6} {side:<8} step {s['median']:7.2f} s [{s['min']:.2f}, {s['max']:.2f}] "
            f"(fwd {f['median']:.2f}, bwd {b['median']:.2f})   peak growth {m['median'] / 1024:6.2f} GiB "
            f"[{m['min'] / 1024:.2f}, {m['max'] / 1024:.2f}]   loss {rep[side]['loss']:.6f}"
        )
    for side in sides[1:]:
        if f"{side}_over_full" not in rep:
            continue
        t, m = rep[f"{side}_over_full"]["step_s"], rep[f"{side}_over_full"]["peak_growth_mib"]
        a = rep[f"{side}_agreement"]
        grads = ", ".join(
            f"|{k.removeprefix('grad_').removesuffix('_norm')} grad| {v:.1e}"
            for k, v in a.items()
            if k != "loss"
        )
        print(
            f"  N={n:<6} {side}/full: time {t['median']:.3f}x [{t['min']:.3f}, {t['max']:.3f}], "
            f"peak growth {m['median']:.3f}x [{m['min']:.3f}, {m['max']:.3f}]; rel. diff loss {a['loss']:.1e}, "
            f"{grads}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384], help="tokens N")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (lm_head's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="full is always run")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--body-layers",
        type=int,
        default=0,
        help="0: the head alone; L: through InternVL3-1B cut to L decoder layers (sides full, chunked)",
    )
    parser.add_argument(
        "--sample-tokens", type=int, default=2048, help="with --body-layers: tokens per packed sample"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --body-layers: as configs/model/internvl3_1b.yaml trains",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.8,
        help="skip a full side whose estimated peak exceeds this fraction of MemAvailable",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="N = 512 on a 8192-token vocabulary, 2 rounds: seconds"
    )
    parser.add_argument("--out", type=Path, help="default outputs/bench/lm_head[_body<L>].json")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_size is None:
        from vlmtune.train.model.lm_head import DEFAULT_CHUNK_SIZE

        args.chunk_size = 96 if args.smoke else DEFAULT_CHUNK_SIZE
    if args.side:
        child(args)
        return
    if args.smoke:
        args.sizes, args.vocab, args.repeats = [512], 8192, 2
        args.sample_tokens = min(args.sample_tokens, 256)
    if args.body_layers and args.hidden != HIDDEN:
        parser.error("--hidden: with --body-layers the text config is InternVL3-1B's (hidden 896)")
    if args.out is None:
        body = f"_body{args.body_layers}" if args.body_layers else ""
        args.out = Path(f"outputs/bench/lm_head{body}.json")
    allowed = BODY_SIDES if args.body_layers else SIDES
    args.sides = [s for s in allowed if s == "full" or s in args.sides]
    args.elem = 2 if args.dtype == "bfloat16" else 4

    body = (
        f"{args.body_layers}-layer InternVL3-1B body ({'' if args.gradient_checkpointing else 'no '}checkpointing, "
        f"samples of {args.sample_tokens}), "
        if args.body_layers
        else ""
    )
    at_start = announce(
        f"bench_lm_head: {body}hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, chunk {args.chunk_size} rows, "
        f"N = {', '.join(map(str, args.sizes))}, {args.repeats} rounds of {', '.join(args.sides)}"
    )
    available = mem_available_bytes()
    print(
        f"MemAvailable {available / 2**30:.1f} GiB; a full side estimated above "
        f"{args.memory_fraction:.0%} of it is not run",
        flush=True,
    )
    reports = []
    started = time.perf_counter()
    for n in args.sizes:
        estimate = full_estimate_bytes(args, n)
        skipped = None
        if estimate > args.memory_fraction * available:
            skipped = f"needs ~{estimate / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
        sides = [s for s in args.sides if not (s == "full" and skipped)]

        def run_side(side: str, _round: int, n: int = n) -> dict[str, Any]:
            return run_child(__file__, side_argv(args, side, n), args.threads, f"{side} N={n}")

        runs = {side: [] for side in args.sides} | run_rounds(sides, args.repeats, run_side)
        rep = size_report(args, n, runs, skipped)
        reports.append(rep)
        print_size(rep, args.sides)
        print(f"  ({time.perf_counter() - started:.0f} s so far)", flush=True)

    verdict: dict[str, Any] = {}
    target = next((r for r in reports if r["n"] == 8192), None)
    for side in args.sides[1:]:
        if target is None or f"{side}_over_full" not in target:
            continue
        t = target[f"{side}_over_full"]["step_s"]["median"]
        m = target[f"{side}_over_full"]["peak_growth_mib"]["median"]
        verdict[side] = {"peak_ratio": m, "peak_ok": m <= 0.2, "time_ratio": t, "time_ok": t <= 1.15}
        print(
            f"target at 8k, {side}: peak growth {m:.3f}x (<= 0.2: {'yes' if m <= 0.2 else 'NO'}), "
            f"step time {t:.3f}x (<= 1.15: {'yes' if t <= 1.15 else 'NO'})"
        )
    result = {
        "benchmark": (
            f"forward_weighted_nll through InternVL3-1B cut to {args.body_layers} layers: head_chunk_size=0 vs "
            f"{args.chunk_size}, one forward + backward"
            if args.body_layers
            else "LM head: full-logits cross-entropy vs chunked token_logps and weighted_logp_sum, "
            "one forward + backward"
        ),
        "config": {
            "sizes": args.sizes,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "chunk_size": args.chunk_size,
            "repeats": args.repeats,
            "sides": args.sides,
            "threads": args.threads,
            "seed": args.seed,
            "smoke": args.smoke,
            "memory_fraction": args.memory_fraction,
            "body_layers": args.body_layers,
            **(
                {
                    "text_config": body_text_config(args.body_layers, args.vocab),
                    "sample_tokens": args.sample_tokens,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "attn_implementation": "packed_sdpa",
                }
                if args.body_layers
                else {}
            ),
            "mem_available_mib_at_start": available / 2**20,
        },
        "sizes": reports,
        "target_8k": verdict or None,
        "wall_s": time.perf_counter() - started,
    }
    write_result(args.out, result, at_start)


if __name__ == "__main__":
    main()
