"""Benchmark MPO: vlmtune's objective vs TRL's ``DPOTrainer`` (MPO loss mix), same model, data and step size.

Both sides train the tiny InternVL3 checkpoint (``train.tiny.build_tiny_checkpoint``, fp32, CPU) on the
same synthetic preference pairs (``vlmtune.data.synthetic.generate_pair_dataset``, images of 150-300 px cut into
up to 6 tiles of 56 px + a thumbnail), ``--pairs`` pairs per optimizer step, AdamW at a constant lr,
no weight decay, gradients clipped at 1.0, vision tower and projector frozen (as InternVL's MPO
scripts freeze the vision backbone; ``--train-vision`` trains everything).

- **ours**: the real `vlmtune mpo` pieces (``vlmtune.train.commands.mpo.MPOMethod``: ``PairProcessor`` ->
  ``collate_pairs`` in the tree layout -> ``MPOObjective`` with a frozen-copy reference that reuses
  the policy's image features) driven by a plain torch loop instead of a DeepSpeed engine: forward,
  backward, clip, ``AdamW.step``, ``on_step_end`` (BCO's reward shift), as ``train/runtime/loop.py`` does
  at ZeRO-0 on one rank.
- **trl**: ``trl.DPOTrainer`` with ``loss_type=["sigmoid", "bco_pair", "sft"]`` and
  ``loss_weights=[0.8, 0.2, 1.0]`` (TRL's MPO recipe), the same checkpoint loaded as policy and
  reference, the same records in TRL's vision format (``images`` + conversational
  ``prompt``/``chosen``/``rejected``) and the checkpoint's ``InternVLProcessor``. TRL 1.16 runs
  InternVL unchanged; the one adaptation is the processor's ``max_patches`` set to the data's
  ``max_dynamic_patch`` (the tiny processor ships InternVL3's 12), so both sides see the same tiles.
  Its other defaults that would make the sides differ are set to ours: no activation checkpointing
  (TRL's default is True), fp32 (TRL's default is bf16), ``max_length=None`` (no truncation),
  sequential sampling, ``optim="adamw_torch"``.

Measured per side, each run in its own fresh subprocess (``--side``), the sides interleaved
(A, B, B, A, ...) over ``--repeats`` rounds:
- step time: optimizer steps after ``--warmup`` steps, from the step's start to after the optimizer
  step; batch building (tiling, tokenising, collation) is outside the timing on both sides (TRL: a
  callback from ``on_step_begin`` to ``on_step_end``, which the Trainer calls after fetching the batch);
- peak memory: the child's own peak RSS (``VmHWM``, see ``common.peak_rss_mib``: the whole process,
  imports and loading included), and its growth over the RSS just before the first step (the
  training working set);
- vision-tower calls and tiles encoded, by a forward hook on every ``model.vision_tower`` (policy and
  reference), per step and per pair, against the tiles the pairs' images have.

Ratios are TRL / ours per round (both sides of a round ran back to back), median and min/max.

    OMP_NUM_THREADS=1 python scripts/bench/bench_mpo.py [--smoke] [--out outputs/bench/mpo.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.bench.common import (  # noqa: E402
    add_child_args,
    announce,
    child_main,
    peak_rss_mib,
    ratio,
    rss_mib,
    run_child,
    run_rounds,
    summary,
    write_result,
)

SIDES = ("ours", "trl")
LOSS_TYPES, LOSS_WEIGHTS = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
IMAGE_SIZE = 56  # the tiny model's tile side


def prepare(workdir: Path, num_pairs: int, max_dynamic_patch: int) -> tuple[Path, Path]:
    """The tiny checkpoint and ``num_pairs`` training pairs under ``workdir`` (built once, reused)."""
    from vlmtune.data.synthetic import generate_pair_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    ckpt = workdir / "tiny"
    if not (ckpt / "config.json").exists():
        build_tiny_checkpoint(ckpt)
    data = workdir / f"pairs_{num_pairs}_p{max_dynamic_patch}"
    meta = data / "meta_pairs_train.json"
    if not meta.exists():
        generate_pair_dataset(
            data,
            num_train=num_pairs,
            num_eval=0,
            seed=0,
            image_size_range=(150, 300),
            max_dynamic_patch=max_dynamic_patch,
        )
    return ckpt, meta


class VisionCounter:
    """Forward hook for vision towers: calls and tiles, split into the policy's and any other (reference)."""

    def __init__(self, policy_tower: Any) -> None:
        self.policy_tower = policy_tower
        self.enabled = False
        self.counts = {"policy_calls": 0, "policy_tiles": 0, "reference_calls": 0, "reference_tiles": 0}

    def hook(self, module: Any, args: Any, output: Any) -> None:
        if self.enabled:
            who = "policy" if module is self.policy_tower else "reference"
            self.counts[f"{who}_calls"] += 1
            self.counts[f"{who}_tiles"] += int(output.last_hidden_state.shape[0])

    def attach(self, tower: Any) -> None:
        # a closure, not a bound method: deepcopy keeps functions as they are, so a model copied after
        # this call (our frozen-copy reference) reports to the same counter
        tower.register_forward_hook(lambda m, a, o: self.hook(m, a, o))


def configs(args: argparse.Namespace, ckpt: Path, meta: Path) -> Any:
    from vlmtune.data.dataset import DataConfig
    from vlmtune.train.model.build import ModelConfig
    from vlmtune.train.objectives.mpo import MPOLossConfig
    from vlmtune.train.runtime.config import MPORunConfig

    frozen = not args.train_vision
    return MPORunConfig(
        model=ModelConfig(pretrained=str(ckpt), freeze_vision=frozen, freeze_projector=frozen),
        data=DataConfig(
            meta_path=str(meta),
            image_size=IMAGE_SIZE,
            max_dynamic_patch=args.max_dynamic_patch,
            system_prompt=None,  # TRL's conversations have no system turn either
            max_length=None,
        ),
        loss=MPOLossConfig(),  # 0.8 sigmoid + 0.2 BCO + 1.0 NLL, beta 0.1, token-mean NLL like TRL's sft
        reference="copy",
    )


def run_ours(args: argparse.Namespace, ckpt: Path, meta: Path) -> dict[str, Any]:
    import torch

    from vlmtune.data.dataset import sample_rng
    from vlmtune.data.meta import load_meta
    from vlmtune.train.commands.mpo import MPOMethod
    from vlmtune.train.commands.runner import load_tokenizer
    from vlmtune.train.model.build import build_model, num_image_tokens_per_tile

    cfg = configs(args, ckpt, meta)
    method = MPOMethod()
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg.model, tokenizer).train()
    counter = VisionCounter(model.model.vision_tower)
    counter.attach(model.model.vision_tower)  # before the objective copies the reference
    spec = load_meta(meta)[0]
    processor = method.processor(cfg, tokenizer, num_image_tokens_per_tile(model.config))
    steps = args.warmup + args.steps
    pairs = [processor(spec, k, sample_rng(0, k), False) for k in range(steps * args.pairs)]
    collate = method.collate(cfg, tokenizer, model)
    batches = [collate(pairs[i * args.pairs : (i + 1) * args.pairs]) for i in range(steps)]
    objective = method.objective(cfg, model, {"zero_optimization": {"stage": 0}})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    rss_before, maxrss_before = rss_mib(), peak_rss_mib()
    times, losses, first_metrics = [], [], {}
    for i, batch in enumerate(batches):
        counter.enabled = i >= args.warmup
        t0 = time.perf_counter()
        totals = objective.weight_totals(batch).double()
        loss, metrics = objective(model, batch, totals)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.on_step_end()
        times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
        first_metrics = first_metrics or metrics
    tiles = sum(p["num_tiles"] for p in pairs[args.warmup * args.pairs :])
    result = finish(args, times, losses, counter, tiles, rss_before, maxrss_before)
    return {**result, "first_step_metrics": first_metrics}


def trl_records(meta: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` pairs as TRL's vision preference format (the ``<image>`` placeholder becomes
    the image entry TRL's ``prepare_multimodal_messages`` puts before the user's text)."""
    from vlmtune.data.media import load_image
    from vlmtune.data.meta import jsonl_file, load_meta

    spec = load_meta(meta)[0]
    jf = jsonl_file(spec.annotation)
    out = []
    for k in range(n):
        r = jf.read(k)
        out.append(
            {
                "images": [load_image(spec.root / r["image"])],
                "prompt": [{"role": "user", "content": r["question"].removeprefix("<image>\n")}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
        )
    return out


def run_trl(args: argparse.Namespace, ckpt: Path, meta: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, InternVLForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from vlmtune.train.model.build import apply_freezing

    cfg = configs(args, ckpt, meta)
    steps = args.warmup + args.steps
    records = trl_records(meta, steps * args.pairs)
    processor = AutoProcessor.from_pretrained(ckpt)
    processor.image_processor.max_patches = args.max_dynamic_patch
    tiles = sum(
        int(processor.image_processor(images=r["images"], return_tensors="pt")["pixel_values"].shape[0])
        for r in records[args.warmup * args.pairs :]
    )
    dataset = Dataset.from_list(records)
    model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    apply_freezing(model, cfg.model)
    config = DPOConfig(
        output_dir=str(Path(args.tmp) / "trl_out"),
        loss_type=LOSS_TYPES,
        loss_weights=LOSS_WEIGHTS,
        beta=cfg.loss.beta,
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        activation_checkpointing=False,  # TRL defaults to on (its `gradient_checkpointing=True`)
        bf16=False,
        use_cpu=True,
        max_length=None,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    state: dict[str, Any] = {"times": []}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            state["rss_before"], state["maxrss_before"] = rss_mib(), peak_rss_mib()

        def on_step_begin(self, _args: Any, st: Any, *_: Any, **__: Any) -> None:
            counter.enabled = st.global_step >= args.warmup
            state["t0"] = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            state["times"].append(time.perf_counter() - state["t0"])
            counter.enabled = False

    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=processor, callbacks=[StepTimer()]
    )
    counter = VisionCounter(trainer.model.model.vision_tower)
    counter.attach(trainer.model.model.vision_tower)
    counter.attach(trainer.ref_model.model.vision_tower)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return finish(args, state["times"], losses, counter, tiles, state["rss_before"], state["maxrss_before"])


def finish(
    args: argparse.Namespace,
    times: list[float],
    losses: list[float],
    counter: VisionCounter,
    tiles: int,
    rss_before: float,
    maxrss_before: float,
) -> dict[str, Any]:
    """One side's figures; vision counts cover the timed steps only."""
    timed = times[args.warmup :]
    pairs = len(timed) * args.pairs
    c = counter.counts
    peak = peak_rss_mib()
    return {
        "step_s": statistics.median(timed),
        "step_times_s": timed,
        "losses": losses,
        "peak_rss_mib": peak,
        "rss_before_steps_mib": rss_before,
        "maxrss_before_steps_mib": maxrss_before,
        "peak_growth_mib": peak - rss_before,
        "vision_calls_per_step": (c["policy_calls"] + c["reference_calls"]) / len(timed),
        "vision_calls_per_pair": (c["policy_calls"] + c["reference_calls"]) / pairs,
        "tiles_encoded_per_pair": (c["policy_tiles"] + c["reference_tiles"]) / pairs,
        "image_tiles_per_pair": tiles / pairs,
        "encodings_per_tile": (c["policy_tiles"] + c["reference_tiles"]) / tiles,
        **c,
    }


def run_side(side: str, args: argparse.Namespace, ckpt: Path, meta: Path) -> dict[str, Any]:
    """Run one side in a fresh interpreter (its own peak memory) and read back its figures."""
    argv = ["--side", side, "--ckpt", str(ckpt), "--meta", str(meta)]
    argv += ["--pairs", str(args.pairs), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    argv += ["--lr", str(args.lr), "--threads", str(args.threads)]
    argv += ["--max-dynamic-patch", str(args.max_dynamic_patch)]
    argv += ["--train-vision"] if args.train_vision else []
    return run_child(__file__, argv, args.threads, f"side {side}")


def summarise(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    ours, trl = runs["ours"], runs["trl"]

    def trl_over_ours(key: str) -> dict[str, float]:
        return ratio([b[key] for b in trl], [a[key] for a in ours])

    per_side = {
        side: {
            "step_s": summary([r["step_s"] for r in rs]),
            "peak_rss_mib": summary([r["peak_rss_mib"] for r in rs]),
            "rss_before_steps_mib": summary([r["rss_before_steps_mib"] for r in rs]),
            "peak_growth_mib": summary([r["peak_growth_mib"] for r in rs]),
            **{
                k: rs[0][k]
                for k in (
                    "vision_calls_per_step",
                    "vision_calls_per_pair",
                    "tiles_encoded_per_pair",
                    "image_tiles_per_pair",
                    "encodings_per_tile",
                    "policy_calls",
                    "reference_calls",
                )
            },
            "first_step_loss": [r["losses"][0] for r in rs],
        }
        for side, rs in runs.items()
    }
    return {
        "sides": per_side,
        "trl_over_ours": {
            "step_time": trl_over_ours("step_s"),
            "peak_rss": trl_over_ours("peak_rss_mib"),
            "peak_growth": trl_over_ours("peak_growth_mib"),
            "tiles_encoded": trl_over_ours("tiles_encoded_per_pair"),
        },
        "settings": {
            "pairs_per_step": args.pairs,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "max_dynamic_patch": args.max_dynamic_patch,
            "train_vision": args.train_vision,
            "lr": args.lr,
            "threads": args.threads,
            "loss_type": LOSS_TYPES,
            "loss_weights": LOSS_WEIGHTS,
        },
        "runs": runs,
    }


def report(result: dict[str, Any]) -> None:
    s, r = result["sides"], result["trl_over_ours"]
    print(f"{'median [min, max] over rounds':<30}{'ours':>28}{'trl':>28}")
    for key, unit, digits in (
        ("step_s", "s/step", 4),
        ("peak_rss_mib", "MiB", 0),
        ("rss_before_steps_mib", "MiB", 0),
        ("peak_growth_mib", "MiB", 1),
    ):
        row = [
            f"{v['median']:.{digits}f} [{v['min']:.{digits}f}, {v['max']:.{digits}f}]"
            for v in (s[side][key] for side in SIDES)
        ]
        print(f"{key + ' (' + unit + ')':<30}{row[0]:>28}{row[1]:>28}")
    for key in (
        "vision_calls_per_step",
        "vision_calls_per_pair",
        "tiles_encoded_per_pair",
        "image_tiles_per_pair",
        "encodings_per_tile",
    ):
        print(f"{key:<30}{s['ours'][key]:>28.3f}{s['trl'][key]:>28.3f}")
    for key in ("step_time", "peak_rss", "peak_growth", "tiles_encoded"):
        v = r[key]
        print(f"TRL/ours {key:<21} {v['median']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, for CI")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (both sides)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds; each runs both sides in fresh processes"
    )
    parser.add_argument("--max-dynamic-patch", type=int, default=6, help="tiles per image (+ thumbnail)")
    parser.add_argument(
        "--train-vision", action="store_true", help="train the vision tower and projector too"
    )
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (OMP_NUM_THREADS)")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "bench" / "mpo_work"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "mpo.json"))
    add_child_args(parser, SIDES)
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.warmup, args.steps, args.repeats = 2, 1, 2, 1
    return args


def main() -> None:
    args = parse_args()

    if args.side:
        child_main(args, {"ours": run_ours, "trl": run_trl})
        return

    at_start = announce("bench_mpo")
    ckpt, meta = prepare(Path(args.workdir), (args.warmup + args.steps) * args.pairs, args.max_dynamic_patch)
    runs = run_rounds(SIDES, args.repeats, lambda side, _: run_side(side, args, ckpt, meta))
    result = summarise(runs, args)
    report(result)
    write_result(args.out, result, at_start)


if __name__ == "__main__":
    main()
