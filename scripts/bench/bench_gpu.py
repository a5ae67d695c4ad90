"""GPU benchmark: packed SFT steps of a random-weight InternVL3-1B in bf16 on one GPU, through our engine.

Each pack holds ``--pack-tokens`` tokens of samples with 1-6 image tiles (448 px, 256 tokens each) plus
a text prompt and a supervised answer (a text-only sample fills the rest). A step is exactly what
``train/runtime/loop.py`` does for one micro-batch: ``SFTObjective`` (logits only where a target exists),
``engine.backward``, ``engine.step`` (DeepSpeed, bf16, AdamW). Variants: attention ``packed_varlen``
(torch's varlen FlashAttention, CUDA only) vs ``sdpa`` (transformers' dense [L, L] block mask) vs
``packed_sdpa`` (sdpa per sample), each with gradient checkpointing off and on; then, if time is left,
one MPO policy step (response log-probs, no reference) with the pair ``tree`` layout vs ``separate``.
Variants are interleaved (order reversed every round); a round is one step on each of ``--packs``
packs; ``--warmup`` rounds each first, then ``--reps`` rounds; median, min and max over rounds reported.

Model FLOPs per step (MFU counts these; the recompute of gradient checkpointing is not counted):
  6 * N_llm * T                      LLM matmuls (N_llm: decoder parameters, no embeddings, no lm_head)
  + 6 * d_model * V * K              lm_head on the K positions that carry a target
  + 6 * N_proj * 256 * tiles         projector on the pixel-shuffled tokens
  + 6 * N_vit * 1025 * tiles         vision tower (N_vit: no position/cls embeddings; 1024 patches + CLS)
  + 6 * n_layers * H*D * sum_s L_s^2 LLM attention, causal (half of 4 L^2 H D forward, x3 for backward)
  + 12 * n_layers_vit * H*D * 1025^2 * tiles   vision attention, bidirectional
Peak: 989 TFLOP/s, the H100/H200 SXM dense bf16 datasheet figure (756 for H100 PCIe); an 8192^3 bf16
matmul is also timed here and MFU is given against it too (KINDS.md saw ~790 TFLOP/s on an H200).

    python scripts/bench/bench_gpu.py --out DIR            # GPU, ~3 min on an H200
    python scripts/bench/bench_gpu.py --smoke --out DIR    # CPU, tiny model, fp32, checks the script
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import vlmtune.train.model.attention_varlen  # noqa: E402, F401  (registers packed_varlen)
from scripts.bench.common import announce, ratio, round_order, summary, write_result  # noqa: E402
from vlmtune.data.collate import collate_packed, collate_pairs  # noqa: E402
from vlmtune.data.conversation import IGNORE_INDEX  # noqa: E402
from vlmtune.train.model.build import ModelConfig, build_model, count_parameters, num_image_tokens_per_tile  # noqa: E402
from vlmtune.train.model.forward import batch_to_device  # noqa: E402
from vlmtune.train.model.unwrap import unwrap  # noqa: E402

SPEC_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # dense bf16, vendor datasheets


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_model_config(name: str, **overrides: Any) -> ModelConfig:
    from vlmtune.train.runtime.config import model_preset

    return model_preset(name, [f"model.{k}={v}" for k, v in overrides.items()])


@dataclass
class Shapes:
    """What the FLOP count needs to know about the model."""

    n_llm: int
    n_lm_head: int
    n_proj: int
    n_vit: int
    llm_layers: int
    llm_attn_width: int  # heads * head_dim of the queries
    vit_layers: int
    vit_width: int
    vit_tokens: int  # per tile, with CLS
    tokens_per_tile: int
    tile: int


def model_shapes(model: torch.nn.Module) -> Shapes:
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    counts = count_parameters(model)
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    vit_embed = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".vision_tower.embeddings." in n and "patch_embeddings" not in n
    )
    tile = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Shapes(
        n_llm=counts["llm"] - emb - head,
        n_lm_head=head,
        n_proj=counts["projector"],
        n_vit=counts["vision"] - vit_embed,
        llm_layers=text.num_hidden_layers,
        llm_attn_width=text.num_attention_heads * head_dim,
        vit_layers=vision.num_hidden_layers,
        vit_width=vision.hidden_size,
        vit_tokens=(tile // patch) ** 2 + 1,
        tokens_per_tile=num_image_tokens_per_tile(cfg),
        tile=tile,
    )


def step_flops(s: Shapes, lengths: list[int], tiles: int, kept: int) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward) on one packed row: the formula above."""
    tokens = sum(lengths)
    parts = {
        "llm": 6.0 * s.n_llm * tokens,
        "lm_head": 6.0 * s.n_lm_head * kept,
        "projector": 6.0 * s.n_proj * s.tokens_per_tile * tiles,
        "vision": 6.0 * s.n_vit * s.vit_tokens * tiles,
        "llm_attention": 6.0 * s.llm_layers * s.llm_attn_width * sum(n * n for n in lengths),
        "vision_attention": 12.0 * s.vit_layers * s.vit_width * s.vit_tokens**2 * tiles,
    }
    parts["total"] = sum(parts.values())
    return parts


def make_sample(
    g: torch.Generator, s: Shapes, image_id: int, vocab: int, tiles: int, prompt: int, answer: int
) -> dict:
    """A sample shaped like the pipeline's; text ids random (never the image token), <img>/</img> = id-2/id-1."""

    def text(n: int) -> list[int]:
        return [t if t != image_id else 0 for t in torch.randint(0, vocab, (n,), generator=g).tolist()]

    ids = ([image_id - 2] + [image_id] * (tiles * s.tokens_per_tile) + [image_id - 1]) if tiles else []
    ids += text(prompt)
    ans = text(answer)
    return {
        "input_ids": torch.tensor(ids + ans),
        "labels": torch.tensor([IGNORE_INDEX] * len(ids) + ans),
        "pixel_values": torch.randn(tiles, 3, s.tile, s.tile, generator=g),
        "num_tiles": tiles,
    }


def make_pack(rng: random.Random, g: torch.Generator, s: Shapes, image_id: int, vocab: int, pack_tokens: int):
    """Samples of 1-6 tiles + 16-200 prompt + 16-400 answer tokens until full; a text sample fills the rest."""
    samples, used = [], 0
    while True:
        tiles, prompt, answer = rng.randint(1, 6), rng.randint(16, 200), rng.randint(16, 400)
        n = tiles * s.tokens_per_tile + 2 + prompt + answer
        if used + n > pack_tokens:
            break
        samples.append(make_sample(g, s, image_id, vocab, tiles, prompt, answer))
        used += n
    rest = pack_tokens - used
    if rest >= 2:
        samples.append(make_sample(g, s, image_id, vocab, 0, rest // 2, rest - rest // 2))
    return samples


def make_pairs(
    rng: random.Random, g: torch.Generator, s: Shapes, image_id: int, vocab: int, n: int
) -> list[dict]:
    """Preference pairs: a prompt with 1-6 tiles + text, two answers of 64-512 tokens."""
    pairs = []
    for _ in range(n):
        base = make_sample(g, s, image_id, vocab, rng.randint(1, 6), rng.randint(16, 200), 0)
        c, r = (make_sample(g, s, image_id, vocab, 0, 0, rng.randint(64, 512))["input_ids"] for _ in range(2))
        pairs.append(
            {
                "prompt_ids": base["input_ids"],
                "chosen_ids": c,
                "chosen_labels": c.clone(),
                "rejected_ids": r,
                "rejected_labels": r.clone(),
                "pixel_values": base["pixel_values"],
                "num_tiles": base["num_tiles"],
            }
        )
    return pairs


def matmul_peak(dtype: torch.dtype) -> float | None:
    """Achieved FLOP/s of an 8192^3 matmul on random data (median of 10 after 3 warm-ups); None on CPU."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / statistics.median(times)


def set_variant(engine: Any, attn: str, gc: bool) -> None:
    inner = unwrap(engine)
    inner.set_attn_implementation(attn)
    if gc:
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.activation_checkpointing_disable()
    engine.train()


def sft_step(engine: Any, objective: Any, batch: dict) -> tuple[float, float]:
    """One optimizer step; returns (forward+backward seconds, whole step seconds)."""
    sync()
    t0 = time.perf_counter()
    loss, _ = objective(engine, batch, objective.weight_totals(batch))
    engine.backward(loss)
    sync()
    t1 = time.perf_counter()
    engine.step()
    sync()
    return t1 - t0, time.perf_counter() - t0


def mpo_step(engine: Any, batch: dict) -> float:
    """Policy forward + backward of the summed response log-probs (what the layout changes) and the step."""
    from vlmtune.train.objectives.mpo import response_logps

    sync()
    t0 = time.perf_counter()
    seq, _, _ = response_logps(engine, batch)
    engine.backward(-seq.sum() / seq.numel())
    engine.step()
    sync()
    return time.perf_counter() - t0


def run_rounds(
    variants: dict[str, Any], reps: int, warmup: int, deadline: float
) -> tuple[dict[str, list[float]], int, dict[str, str]]:
    """Interleaved rounds over ``variants`` (name -> callable returning the seconds of one round).

    A variant that fails (out of memory, say) is dropped with its error, so the others still report.
    """
    errors: dict[str, str] = {}
    live = dict(variants)

    def attempt(name: str) -> float | None:
        try:
            return live[name]()
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            del live[name]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    for name in list(live):
        for _ in range(warmup):
            if name in live:
                attempt(name)
    times: dict[str, list[float]] = {k: [] for k in live}
    done = 0
    for r in range(reps):
        if done >= 2 and time.monotonic() > deadline:
            break
        for name in round_order(list(live), r):
            seconds = attempt(name)
            if seconds is not None:
                times[name].append(seconds)
        done += 1
    return {k: v for k, v in times.items() if k in live}, done, errors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory; bench_gpu.json is written there")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny model, fp32: checks the script end to end"
    )
    parser.add_argument("--model", default="internvl3_1b")
    parser.add_argument("--pack-tokens", type=int, default=8192)
    parser.add_argument("--packs", type=int, default=3, help="distinct packs; a round is one step on each")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=6, help="MPO pairs per step")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument(
        "--liger",
        action="store_true",
        help="add packed_varlen+liger: a second engine on a copy with model.liger_kernels (CUDA)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=170.0, help="stop adding rounds after this (>= 2 rounds)"
    )
    args = parser.parse_args()
    t_start = time.monotonic()
    at_start = announce("bench_gpu")
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.model, args.pack_tokens, args.packs, args.reps, args.warmup = "tiny", 512, 2, 2, 1
        args.pairs = 3
    elif not cuda:
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --smoke)")
    dtype = "bfloat16" if cuda else "float32"
    precision = "bf16" if cuda else "fp32"

    from vlmtune.train.objectives.sft import SFTObjective
    from vlmtune.train.runtime.config import DeepSpeedConfig, OptimConfig, TrainConfig
    from vlmtune.train.runtime.engine import build_ds_config, create_engine, init_distributed

    init_distributed()
    torch.manual_seed(0)
    cfg = load_model_config(args.model, dtype=dtype, attn_implementation="sdpa", gradient_checkpointing=False)
    tokenizer = None
    if cfg.image_token_id is None:
        from vlmtune.train.model.tiny import build_tokenizer

        tokenizer = build_tokenizer()
    t0 = time.monotonic()
    try:  # initialise straight on the GPU: a 1B random init on the CPU takes longer than the benchmark
        with torch.device(device()):
            model = build_model(cfg, tokenizer)
    except Exception as e:  # noqa: BLE001
        print(f"building under torch.device({device()}) failed ({type(e).__name__}: {e}); building on CPU")
        model = build_model(cfg, tokenizer)
    model = model.to(device())
    build_s = time.monotonic() - t0
    shapes = model_shapes(model)
    image_id = model.config.image_token_id
    vocab = model.config.text_config.vocab_size

    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    packs = [make_pack(rng, g, shapes, image_id, vocab, args.pack_tokens) for _ in range(args.packs)]
    batches = [batch_to_device(collate_packed(p, "square"), model) for p in packs]
    flops = []
    for p, b in zip(packs, batches):
        kept = int((b["targets"] != IGNORE_INDEX).any(0).sum())
        flops.append(
            step_flops(shapes, [len(s["input_ids"]) for s in p], sum(s["num_tiles"] for s in p), kept)
        )

    optim = OptimConfig(lr=1e-5, warmup_ratio=0.0)
    train_cfg = TrainConfig(precision=precision, max_steps=10**6)
    ds_config = build_ds_config(DeepSpeedConfig(zero_stage=args.zero_stage), train_cfg, optim, world_size=1)
    liger_engine = None
    if args.liger and cuda:  # a copy with Liger's kernels, its own engine, stepped interleaved with the rest
        import copy

        from vlmtune.train.model.build import apply_liger_kernels

        liger_model = copy.deepcopy(model)
        apply_liger_kernels(liger_model)  # (Liger's RoPE is a module-level patch: every variant gets it)
        liger_engine, _, _ = create_engine(liger_model, ds_config, optim, 10**6)
    engine, _, _ = create_engine(model, ds_config, optim, 10**6)
    objective = SFTObjective("square")
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    spec_peak = next((v for k, v in SPEC_PEAK.items() if k in gpu), None) if cuda else None
    measured_peak = matmul_peak(torch.bfloat16)

    attns = (["packed_varlen"] if cuda else []) + ["packed_sdpa", "sdpa"]  # the first is the base
    fwd_bwd: dict[str, list[float]] = {}
    peak_mem: dict[str, float] = {}

    def variant(attn: str, gc: bool, which: Any = None, suffix: str = ""):
        name = f"{attn}{'+gc' if gc else ''}{suffix}"
        fwd_bwd[name] = []
        eng = engine if which is None else which

        def run() -> float:
            set_variant(eng, attn, gc)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            total = 0.0
            for batch in batches:
                fb, step_s = sft_step(eng, objective, batch)
                fwd_bwd[name].append(fb)
                total += step_s
            if cuda:
                peak_mem[name] = max(peak_mem.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            return total

        return name, run

    variants = dict(variant(a, gc) for gc in (False, True) for a in attns)
    if liger_engine is not None:
        variants.update([variant(attns[0], False, liger_engine, "+liger")])
    deadline = t_start + args.budget_s
    times, rounds, errors = run_rounds(variants, args.reps, args.warmup, deadline)

    results: dict[str, Any] = {}
    steps = len(batches)
    mean_flops = statistics.mean(f["total"] for f in flops)
    for name, t in times.items():
        per_step = [x / steps for x in t]
        res = {
            "step_s": summary(per_step),
            "tokens_per_s": summary([args.pack_tokens / x for x in per_step]),
            "tflops_per_s": summary([mean_flops / x / 1e12 for x in per_step]),
            "fwd_bwd_s_median": statistics.median(fwd_bwd[name][args.warmup * steps :] or [0.0]),
            "peak_mem_gib": peak_mem.get(name),
        }
        if spec_peak:
            res["mfu_spec"] = mean_flops / res["step_s"]["median"] / spec_peak
        if measured_peak:
            res["mfu_measured_matmul"] = mean_flops / res["step_s"]["median"] / measured_peak
        results[name] = res
    base = next((a for a in attns if a in times), None)  # the first attention that ran, no checkpointing
    ratios = {  # per round: time of the other variant / time of the base (> 1: the base is faster)
        f"{base}_speedup_over_{name}": ratio(times[name], times[base])
        for name in times
        if base and name != base
    }

    mpo: dict[str, Any] = {"skipped": "out of time"}
    if time.monotonic() < deadline + 20:
        pairs = make_pairs(rng, g, shapes, image_id, vocab, args.pairs)
        layouts = {  # the tree needs a mask: packed attentions hand it to sdpa; separate runs packed
            "tree": ("sdpa", batch_to_device(collate_pairs(pairs, "tree", "token"), model)),
            "separate": (attns[0], batch_to_device(collate_pairs(pairs, "separate", "token"), model)),
        }

        def mpo_variant(layout: str):
            attn, batch = layouts[layout]

            def run() -> float:
                set_variant(engine, attn, False)
                return mpo_step(engine, batch)

            return layout, run

        mpo_times, mpo_rounds, mpo_errors = run_rounds(
            dict(mpo_variant(k) for k in layouts), args.reps, args.warmup, deadline + 45
        )
        mpo = {
            layout: {
                "attn": layouts[layout][0],
                "tokens": layouts[layout][1]["num_tokens"],
                "step_s": summary(t),
                "pairs_per_s": summary([args.pairs / x for x in t]),
            }
            for layout, t in mpo_times.items()
        }
        if len(mpo_times) == 2:
            mpo["tree_speedup_over_separate"] = ratio(mpo_times["separate"], mpo_times["tree"])
        mpo.update(rounds=mpo_rounds, pairs=args.pairs, errors=mpo_errors)
        mpo["note"] = (
            "policy forward+backward of response log-probs and the optimizer step; no reference model"
        )

    import deepspeed
    import transformers

    out = {
        "device": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "model": args.model,
        "dtype": dtype,
        "zero_stage": args.zero_stage,
        "parameters": count_parameters(model),
        "shapes": shapes.__dict__,
        "pack_tokens": args.pack_tokens,
        "packs": [
            {
                "samples": len(p),
                "tiles": sum(s["num_tiles"] for s in p),
                "lengths": [len(s["input_ids"]) for s in p],
                "model_tflops": {k: v / 1e12 for k, v in f.items()},
            }
            for p, f in zip(packs, flops)
        ],
        "peak_flops_spec": spec_peak,
        "peak_flops_measured_matmul_8192": measured_peak,
        "sft": results,
        "sft_ratios": ratios,
        "sft_errors": errors,
        "rounds": rounds,
        "steps_per_round": steps,
        "warmup_steps": args.warmup * steps,
        "mpo": mpo,
        "build_model_s": build_s,
        "wall_s": time.monotonic() - t_start,
    }
    path = Path(args.out) / "bench_gpu.json"

    tiles = statistics.mean(sum(s["num_tiles"] for s in p) for p in packs)
    print(
        f"{gpu} | {args.model} {dtype} ZeRO-{args.zero_stage} | packs of {args.pack_tokens} tokens, "
        f"{statistics.mean(len(p) for p in packs):.1f} samples, {tiles:.1f} tiles | "
        f"{mean_flops / 1e12:.1f} model TFLOP/step | matmul {(measured_peak or 0) / 1e12:.0f} TFLOP/s | "
        f"{rounds} rounds x {steps} steps"
    )
    print(f"{'variant':<20}{'step s':>9}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>8}{'MFU(mm)':>9}{'GiB':>7}")
    for name, r in results.items():
        cells = [r.get("mfu_spec"), r.get("mfu_measured_matmul"), r["peak_mem_gib"]]
        mfu, mfu_mm, mem = (
            "-" if c is None else f"{c:.1%}" if k < 2 else f"{c:.1f}" for k, c in enumerate(cells)
        )
        print(
            f"{name:<20}{r['step_s']['median']:>9.3f}{r['tokens_per_s']['median']:>10.0f}"
            f"{r['tflops_per_s']['median']:>9.1f}{mfu:>8}{mfu_mm:>9}{mem:>7}"
        )
    for k, v in ratios.items():
        print(f"{k}: {v['median']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]")
    for name, e in {**errors, **mpo.get("errors", {})}.items():
        print(f"FAILED {name}: {e}")
    for layout in ("tree", "separate"):
        if layout in mpo:
            m = mpo[layout]
            print(f"mpo {layout:<9} ({m['attn']}, {m['tokens']} tokens) {m['step_s']['median']:.3f} s/step")
    if "tree_speedup_over_separate" in mpo:
        v = mpo["tree_speedup_over_separate"]
        print(f"mpo tree speed-up over separate: {v['median']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]")
    write_result(path, out, at_start)
    print(f"({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
