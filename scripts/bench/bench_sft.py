"""Benchmark SFT packing: fill ratio and tokens/s, packed rows vs padded batches, same samples, one run.

Fill ratio = real tokens / token slots computed (padding is wasted compute). Measured on
(a) the demo data (real pipeline: tiling + tokenisation at the tiny model's 56 px / 16 tokens per
tile) and (b) lengths drawn like InternVL SFT data (1-13 tiles x 256 tokens + a text prompt, short
answers) at the recipe's pack length.

Tokens/s: forward + backward of the tiny model on the same demo samples, as packed rows
(``packing.max_tokens``, with our ``packed_sdpa`` and with transformers' dense block mask) and as
padded micro-batches of ``--batch`` samples (the peers' layout);
the two sides are interleaved, repeated ``--rounds`` times, median and min/max reported; one torch
thread unless ``--threads`` says otherwise. Against TRL's ``SFTTrainer``: ``bench_sft_peer.py``.

    OMP_NUM_THREADS=1 python scripts/bench/bench_sft.py [--smoke] [--out outputs/bench/sft.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.bench.common import announce, ratio, round_order, summary, write_result  # noqa: E402
from vlmtune.data.collate import collate_packed, collate_padded  # noqa: E402
from vlmtune.data.conversation import IGNORE_INDEX  # noqa: E402
from vlmtune.data.packing import fill_ratio, iter_packs  # noqa: E402
from vlmtune.data.token_weights import loss_normaliser  # noqa: E402
from vlmtune.train.model.forward import forward_logits  # noqa: E402
from vlmtune.train.objectives.losses import weighted_nll_sum  # noqa: E402


def demo_samples(n: int, workdir: Path) -> tuple[list[dict], object]:
    from transformers import AutoTokenizer

    from vlmtune.data.dataset import DataConfig, SampleProcessor, sample_rng
    from vlmtune.data.meta import build_index, load_meta
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    meta = workdir / "data" / "meta_train.json"
    if not meta.exists():
        generate_sft_dataset(meta.parent, num_train=max(n, 64), num_eval=8, seed=0)
    ckpt = workdir / "tiny"
    if not (ckpt / "config.json").exists():
        build_tiny_checkpoint(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    cfg = DataConfig(
        meta_path=str(meta), image_size=56, max_dynamic_patch=6, system_prompt=None, max_length=2048
    )
    specs = load_meta(meta)
    index = build_index(specs, 0)[:n]
    processor = SampleProcessor(cfg, tokenizer, 16)
    samples = []
    for i, (d, line) in enumerate(index):
        s = processor(specs[d], line, sample_rng(0, i), True)
        s["index"] = i
        samples.append(s)
    return samples, ckpt


def padded_fill(lengths: list[int], batch: int) -> float:
    slots = sum(
        max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch)
    )
    return sum(lengths) / slots


def internvl_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Long image prompts, short answers: 0-13 tiles x 256 tokens, log-normal text prompt and answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tiles = 0 if rng.random() < 0.1 else rng.choice([1, 2, 3, 5, 7, 9, 13])  # ~10% pure text
        prompt = int(rng.lognormvariate(4.0, 0.8))
        answer = int(rng.lognormvariate(4.5, 1.0))
        out.append(min(16384, tiles * 256 + 2 + prompt + answer + 20))
    return out


def step(model, batch) -> None:
    keep = (batch["targets"] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    logits = forward_logits(model, batch, keep)
    loss = weighted_nll_sum(
        logits.flatten(0, 1), batch["targets"][:, keep].flatten(), batch["weights"][:, keep].flatten()
    )
    (loss / loss_normaliser(batch["supervised_counts"], "square")).backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--pack-tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="samples per padded micro-batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per core figures by default)")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "bench" / "sft_work"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "sft.json"))
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.rounds = 32, 2
    torch.set_num_threads(args.threads)
    at_start = announce("bench_sft")
    workdir = Path(args.workdir)
    samples, ckpt = demo_samples(args.samples, workdir)
    lengths = [len(s["input_ids"]) for s in samples]

    packs = list(iter_packs(samples, args.pack_tokens, None, buffer_size=64))
    internvl = internvl_like_lengths(20000 if not args.smoke else 2000)
    fake = [{"input_ids": range(n), "num_tiles": 0, "index": i} for i, n in enumerate(internvl)]
    fills = {
        "demo_packed": fill_ratio(packs, args.pack_tokens),
        "demo_padded": padded_fill(lengths, args.batch),
        "internvl_like_packed_16384": fill_ratio(iter_packs(fake, 16384, None, buffer_size=256), 16384),
        "internvl_like_packed_8192": fill_ratio(
            iter_packs([f for f in fake if len(f["input_ids"]) <= 8192], 8192, None, buffer_size=256), 8192
        ),
        "internvl_like_padded": padded_fill(internvl, args.batch),
    }

    from transformers import InternVLForConditionalGeneration

    import vlmtune.train.model.attention  # noqa: F401  (registers packed_sdpa)

    models = {
        impl: InternVLForConditionalGeneration.from_pretrained(ckpt, attn_implementation=impl).train()
        for impl in ("packed_sdpa", "sdpa")
    }
    packed_batches = [collate_packed(p.samples, "square") for p in packs]
    padded_batches = [
        collate_padded(samples[i : i + args.batch], "square", 0) for i in range(0, len(samples), args.batch)
    ]
    sides = {  # name -> (model, batches)
        "packed": (models["packed_sdpa"], packed_batches),
        "packed_dense_mask": (models["sdpa"], packed_batches),
        "padded": (models["sdpa"], padded_batches),
    }
    total_tokens = sum(lengths)
    for model, batches in sides.values():  # warm-up every path
        step(model, batches[0])
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in round_order(list(sides), r):
            model, batches = sides[name]
            t0 = time.perf_counter()
            for b in batches:
                step(model, b)
            times[name].append(time.perf_counter() - t0)
    tps = {k: [total_tokens / t for t in v] for k, v in times.items()}
    result = {
        "fill_ratio": fills,
        "tokens_per_s": {k: summary(v) for k, v in tps.items()},
        "speedup_packed_over_padded": ratio(tps["packed"], tps["padded"]),
        "speedup_packed_sdpa_over_dense_mask": ratio(tps["packed"], tps["packed_dense_mask"]),
        "samples": len(samples),
        "real_tokens": total_tokens,
        "pack_tokens": args.pack_tokens,
        "padded_batch": args.batch,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
    }
    print("fill ratio (real tokens / slots):")
    for k, v in fills.items():
        print(f"  {k:<28} {v:.3f}")
    print("tokens/s, tiny model fwd+bwd (median [min, max]):")
    for k, v in result["tokens_per_s"].items():
        print(f"  {k:<8} {v['median']:>9.0f} [{v['min']:.0f}, {v['max']:.0f}]")
    for key in ("speedup_packed_over_padded", "speedup_packed_sdpa_over_dense_mask"):
        v = result[key]
        print(f"{key}: {v['median']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]")
    write_result(args.out, result, at_start)


if __name__ == "__main__":
    main()
