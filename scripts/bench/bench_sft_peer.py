"""Benchmark SFT against a peer: vlmtune's packed step vs TRL's ``SFTTrainer``, same model, data and step size.

Both sides train the tiny InternVL3 checkpoint (``train.tiny.build_tiny_checkpoint``, fp32, CPU, every
part trained) on the same demo samples (``data.synthetic.generate_sft_dataset`` without its multi-image
task, see ``prepare``: an image of 40-300 px cut into up to 6 tiles of 56 px + a thumbnail, or pure
text; file order, no JPEG augmentation on either side) with ``--samples-per-step`` samples per optimizer step, AdamW at a constant lr, no
weight decay, gradients clipped at 1.0, loss averaged over the step's supervised tokens.

- **ours**: the real `vlmtune sft` pieces (``vlmtune.train.commands.sft.SFTMethod``: ``SampleProcessor`` ->
  ``collate_packed`` -> ``SFTObjective`` with ``train.loss_reduction=token``, the model from
  ``build_model`` with its CPU attention, ``packed_sdpa``) driven by a plain torch loop instead of a
  DeepSpeed engine, as ``train/runtime/loop.py`` does at ZeRO-0 on one rank. Each step's samples are one packed
  row (no padding; the trainer's best-fit packing would put a varying number of samples in a step).
- **trl**: ``trl.SFTTrainer`` on the checkpoint's ``InternVLProcessor`` with TRL's vision collator
  (one right-padded row per sample) and ``assistant_only_loss=True``. Adaptations, all settings a
  user makes: the processor's ``max_patches`` set to the data's ``max_dynamic_patch`` (the tiny
  processor ships InternVL3's 12) so both sides see the same tiles; its chat template given
  ``{% generation %}`` markers around each answer and its ``<|im_end|>`` (TRL needs them for an
  assistant-only loss; the rendered text is unchanged, checked on every sample), so TRL's labels equal
  ours token for token (checked); the conversations as structured content, each image where its
  ``<image>`` stood; TRL's defaults that would make the sides differ set to ours: no gradient
  checkpointing (TRL's default is on), fp32 (TRL's default is bf16), ``max_length=None`` (no
  truncation), sequential sampling, ``optim="adamw_torch"``.

Measured per side, each run in a fresh subprocess (``--side``), the sides interleaved (A B, B A, ...)
over ``--repeats`` rounds, ``--warmup`` steps excluded:
- step time, from the step's start to after the optimizer step (batch building outside on both
  sides; TRL: a callback from ``on_step_begin`` to ``on_step_end``), and from it supervised and real
  tokens per second;
- fill ratio: real tokens / token slots the model computes (a padded row computes its padding);
- memory: the child's own peak RSS (``VmHWM``, see ``common.peak_rss_mib``) and its growth over the RSS
  just before the first step.

Check (in the first TRL child, after its figures): over every sample of the run, the same rendered
text, token ids, labels and tile counts on both sides, and the largest pixel difference (the
processors resize differently: GotOcr2's torchvision bicubic vs the model card's PIL bicubic); on the
first step's samples from the same weights, TRL's ``compute_loss`` on its collated batch, ours on ours,
ours on TRL's pixel values, and ours with vlmtune's default ``square`` averaging for contrast.
Ratios are TRL / ours per round.

    OMP_NUM_THREADS=1 python scripts/bench/bench_sft_peer.py [--smoke] [--out outputs/bench/sft_peer.json]
"""

from __future__ import annotations

import argparse
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
IMAGE_SIZE = 56  # the tiny model's tile side
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
)
#: The tiny checkpoint's chat template (train/model/tiny.py) with TRL's assistant-mask markers around each
#: answer and its <|im_end|>: the tokens InternVL (and vlmtune) train on. Renders the same text.
TRAINING_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "{{'<|im_end|>'}}"
    "{% endgeneration %}{{'\n'}}{% else %}" + _CONTENT + "{{'<|im_end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def prepare(workdir: Path, num_samples: int) -> tuple[Path, Path]:
    """The tiny checkpoint and ``num_samples`` demo records without the multi-image task (built once).

    Multi-image samples would give TRL more work: vlmtune follows InternVL, whose images share the
    tile budget (``max_dynamic_patch // images`` each, data/dataset.py ``tile_limits``), while the HF
    processor tiles every image up to ``max_patches``.
    """
    from vlmtune.data.synthetic import TASK_WEIGHTS, generate_sft_dataset

    ckpt = workdir / "tiny"
    if not (ckpt / "config.json").exists():
        from vlmtune.train.model.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(ckpt)
    meta = workdir / f"sft_{num_samples}_single_image" / "meta_train.json"
    if not meta.exists():
        weights = {task: w for task, w in TASK_WEIGHTS.items() if task != "multi_image"}
        generate_sft_dataset(meta.parent, num_train=num_samples, num_eval=0, seed=0, task_weights=weights)
    return ckpt, meta


def run_config(args: argparse.Namespace, ckpt: Path, meta: Path) -> Any:
    from vlmtune.data.dataset import DataConfig
    from vlmtune.train.model.build import ModelConfig
    from vlmtune.train.runtime.config import SFTRunConfig, TrainConfig

    return SFTRunConfig(
        model=ModelConfig(pretrained=str(ckpt)),
        data=DataConfig(
            meta_path=str(meta),
            image_size=IMAGE_SIZE,
            max_dynamic_patch=args.max_dynamic_patch,
            system_prompt=None,  # TRL's conversations have no system turn either
            max_length=None,
        ),
        train=TrainConfig(loss_reduction="token", precision="fp32"),  # TRL: the mean over the step's tokens
    )


def our_samples(cfg: Any, tokenizer: Any, tokens_per_tile: int, n: int) -> list[dict]:
    """The first ``n`` records through vlmtune's sample processor, without augmentation."""
    from vlmtune.data.dataset import sample_rng
    from vlmtune.data.meta import load_meta
    from vlmtune.train.commands.sft import SFTMethod

    spec = load_meta(cfg.data.meta_path)[0]
    processor = SFTMethod().processor(cfg, tokenizer, tokens_per_tile)
    return [processor(spec, k, sample_rng(0, k), False) for k in range(n)]


def batch_tokens(batch: dict[str, Any]) -> dict[str, int]:
    """Real tokens, token slots computed and supervised tokens of one collated batch (ours or TRL's)."""
    if "labels" in batch:  # TRL: padded rows; the first position is never a target
        return {
            "real": int(batch["attention_mask"].sum()),
            "slots": int(batch["input_ids"].numel()),
            "supervised": int(batch["labels"][:, 1:].ne(-100).sum()),
        }
    return {
        "real": int(batch["num_tokens"]),
        "slots": int(batch["num_slots"]),
        "supervised": int(batch["targets"].ne(-100).sum()),
    }


def build_ours(args: argparse.Namespace, ckpt: Path, meta: Path) -> tuple:
    """(config, model, samples of every step, collate, objective) for our side."""
    from vlmtune.train.commands.runner import load_tokenizer
    from vlmtune.train.commands.sft import SFTMethod
    from vlmtune.train.model.build import build_model, num_image_tokens_per_tile

    cfg = run_config(args, ckpt, meta)
    method = SFTMethod()
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg.model, tokenizer).train()
    n = (args.warmup + args.steps) * args.samples_per_step
    samples = our_samples(cfg, tokenizer, num_image_tokens_per_tile(model.config), n)
    collate = method.collate(cfg, tokenizer, model)
    objective = method.objective(cfg, model, {"zero_optimization": {"stage": 0}})
    return cfg, model, samples, collate, objective


def run_ours(args: argparse.Namespace, ckpt: Path, meta: Path) -> dict[str, Any]:
    import torch

    _, model, samples, collate, objective = build_ours(args, ckpt, meta)
    k = args.samples_per_step
    batches = [collate(samples[i : i + k]) for i in range(0, len(samples), k)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    rss_before, peak_before = rss_mib(), peak_rss_mib()
    times, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        loss, metrics = objective(model, batch, objective.weight_totals(batch).double())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
    tokens = [batch_tokens(b) for b in batches]
    result = finish(args, times, losses, tokens, rss_before, peak_before)
    return {**result, "attn_implementation": model.config._attn_implementation}


def trl_records(meta: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` records in TRL's vision format: ``images`` and structured ``messages`` whose
    image entries stand where vlmtune puts each ``<image>`` (its ``<img>...</img>`` is followed by the
    ``\\n`` that the processor's template writes after each image)."""
    from vlmtune.data.conversation import IMAGE_PLACEHOLDER, insert_placeholders, validate_record
    from vlmtune.data.media import load_image
    from vlmtune.data.meta import jsonl_file, load_meta

    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    spec = load_meta(meta)[0]
    jf = jsonl_file(spec.annotation)
    out = []
    for k in range(n):
        record = validate_record(jf.read(k))
        if record.video is not None:
            raise ValueError(f"{jf.source(k)}: video samples are not part of this benchmark")
        messages = []
        for turn in insert_placeholders(record.conversations, len(record.images), False):
            parts = turn["value"].split(IMAGE_PLACEHOLDER)
            content = [{"type": "text", "text": parts[0]}] if parts[0] else []
            for part in parts[1:]:
                if not part.startswith("\n"):
                    raise ValueError(f"{jf.source(k)}: an <image> not followed by a newline")
                content.append({"type": "image", "text": None})
                content += [{"type": "text", "text": part[1:]}] if part[1:] else []
            messages.append({"role": roles[turn["from"]], "content": content})
        out.append({"images": [load_image(spec.root / p) for p in record.images], "messages": messages})
    return out


def trl_trainer(
    args: argparse.Namespace, ckpt: Path, records: list[dict], output_dir: str, callbacks: list
) -> Any:
    """TRL's SFTTrainer on the checkpoint and ``records``, with the settings above."""
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, InternVLForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    processor = AutoProcessor.from_pretrained(ckpt)
    processor.image_processor.max_patches = args.max_dynamic_patch
    processor.chat_template = TRAINING_TEMPLATE
    model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    config = SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.samples_per_step,
        gradient_accumulation_steps=1,
        max_steps=len(records) // args.samples_per_step,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        activation_checkpointing=False,  # TRL defaults to on (its `gradient_checkpointing=True`)
        bf16=False,
        use_cpu=True,
        max_length=None,
        assistant_only_loss=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=processor,
        callbacks=callbacks,
    )


def run_trl(args: argparse.Namespace, ckpt: Path, meta: Path) -> dict[str, Any]:
    from transformers import TrainerCallback

    records = trl_records(meta, (args.warmup + args.steps) * args.samples_per_step)
    state: dict[str, Any] = {"times": [], "tokens": []}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            state["rss_before"], state["peak_before"] = rss_mib(), peak_rss_mib()

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            state["t0"] = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            state["times"].append(time.perf_counter() - state["t0"])

    trainer = trl_trainer(args, ckpt, records, str(Path(args.tmp) / "trl_out"), [StepTimer()])
    collate = trainer.data_collator

    def recording_collate(examples: list[dict]) -> dict:
        batch = collate(examples)
        state["tokens"].append(batch_tokens(batch))
        return batch

    trainer.data_collator = recording_collate  # read when train() builds its dataloader
    if trainer.model.is_activation_checkpointing:
        raise RuntimeError("TRL turned gradient checkpointing on: the sides would not do the same work")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = finish(args, state["times"], losses, state["tokens"], state["rss_before"], state["peak_before"])
    if args.loss_check:  # after the figures are taken: it loads both sides' models afresh
        result["loss_check"] = loss_check(args, ckpt, meta, str(Path(args.tmp) / "check"))
    return result


def finish(
    args: argparse.Namespace,
    times: list[float],
    losses: list[float],
    tokens: list[dict[str, int]],
    rss_before: float,
    peak_before: float,
) -> dict[str, Any]:
    """One side's figures over the timed steps (the first ``--warmup`` steps left out)."""
    import statistics

    if len(times) != len(tokens):
        raise RuntimeError(f"{len(times)} timed steps but {len(tokens)} batches")
    timed, counted = times[args.warmup :], tokens[args.warmup :]
    seconds = sum(timed)
    total = {key: sum(t[key] for t in counted) for key in ("real", "slots", "supervised")}
    peak = peak_rss_mib()
    return {
        "step_s": statistics.median(timed),
        "step_times_s": timed,
        "real_tokens_per_s": total["real"] / seconds,
        "supervised_tokens_per_s": total["supervised"] / seconds,
        "fill_ratio": total["real"] / total["slots"],
        "tokens": total,
        "losses": losses,
        "peak_rss_mib": peak,
        "rss_before_steps_mib": rss_before,
        "peak_rss_before_steps_mib": peak_before,
        "peak_growth_mib": peak - rss_before,
    }


def loss_check(args: argparse.Namespace, ckpt: Path, meta: Path, tmp: str) -> dict[str, Any]:
    """Whether both sides train on the same thing, over every sample of a run: the same rendered text,
    token ids, labels and tiles (and how far apart the processors' pixels are); and the step-1 losses
    from the same weights on the first step's samples: TRL's ``compute_loss`` on its batch, ours on
    ours, ours on TRL's pixel values, and ours with vlmtune's default ``square`` averaging."""
    import torch
    from transformers import AutoProcessor

    from vlmtune.data.collate import collate_packed
    from vlmtune.train.objectives.sft import SFTObjective

    k = args.samples_per_step
    n = (args.warmup + args.steps) * k
    trainer = trl_trainer(args, ckpt, trl_records(meta, n), tmp, [])
    processor, shipped = trainer.processing_class, AutoProcessor.from_pretrained(ckpt).chat_template
    _, model, samples, collate, objective = build_ours(args, ckpt, meta)
    differ: dict[str, list[int]] = {"text": [], "input_ids": [], "labels": [], "tiles": []}
    tiles = {"ours": 0, "trl": 0}
    pixel_diff = 0.0
    for start in range(0, n, k):
        examples = [trainer.train_dataset[i] for i in range(start, start + k)]  # as its dataloader yields
        peer, ours = trainer.data_collator(examples), collate(samples[start : start + k])
        for i, (e, s, width) in enumerate(
            zip(examples, samples[start:], peer["attention_mask"].sum(1).tolist())
        ):
            text = processor.apply_chat_template([e["messages"]], tokenize=False)
            if text != processor.apply_chat_template([e["messages"]], tokenize=False, chat_template=shipped):
                differ["text"].append(start + i)
            if not torch.equal(s["input_ids"], peer["input_ids"][i, :width]):
                differ["input_ids"].append(start + i)
            if not torch.equal(s["labels"], peer["labels"][i, :width]):
                differ["labels"].append(start + i)
        tiles["ours"] += ours["pixel_values"].shape[0]
        tiles["trl"] += peer["pixel_values"].shape[0]
        if peer["pixel_values"].shape == ours["pixel_values"].shape:
            pixel_diff = max(pixel_diff, (peer["pixel_values"] - ours["pixel_values"]).abs().max().item())
        else:
            differ["tiles"].append(start)  # the step starting at this sample
        if start == 0:
            first_peer, first_ours = peer, ours

    def our_loss(batch: dict, obj: Any) -> float:
        return obj(model, batch, obj.weight_totals(batch).double())[0].item()

    with torch.no_grad():
        alike = first_peer["pixel_values"].shape == first_ours["pixel_values"].shape
        losses = {
            "trl": trainer.compute_loss(trainer.model, dict(first_peer)).item(),
            "ours": our_loss(first_ours, objective),
            "ours_on_trl_pixels": our_loss(
                {**first_ours, "pixel_values": first_peer["pixel_values"]}, objective
            )
            if alike
            else None,
            "ours_square_reduction": our_loss(collate_packed(samples[:k], "square"), SFTObjective("square")),
        }
    return {
        "losses": losses,
        "loss_samples": k,
        "samples": n,
        "differ": differ,  # sample indices (tiles: the first sample of each step whose tiles differ)
        "template_renders_the_same_text": not differ["text"],
        "same_input_ids": not differ["input_ids"],
        "same_labels": not differ["labels"],
        "tiles": tiles,
        "max_abs_pixel_diff": pixel_diff,
    }


def summarise(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict:
    ours, trl = runs["ours"], runs["trl"]
    check = trl[0].pop("loss_check")
    measured = (
        "step_s",
        "supervised_tokens_per_s",
        "real_tokens_per_s",
        "peak_rss_mib",
        "rss_before_steps_mib",
        "peak_growth_mib",
    )
    per_side = {
        side: {
            **{key: summary([r[key] for r in rs]) for key in measured},
            "fill_ratio": rs[0]["fill_ratio"],  # the same batches every round
            "tokens": rs[0]["tokens"],
            "first_step_loss": [r["losses"][0] for r in rs],
        }
        for side, rs in runs.items()
    }

    def trl_over_ours(key: str) -> dict[str, float]:
        return ratio([r[key] for r in trl], [r[key] for r in ours])

    first = [abs(b["losses"][0] - a["losses"][0]) / a["losses"][0] for a, b in zip(ours, trl)]
    if any(len(a["losses"]) != len(b["losses"]) for a, b in zip(ours, trl)):
        raise RuntimeError("the sides logged different numbers of steps")
    every = [abs(y - x) / x for a, b in zip(ours, trl) for x, y in zip(a["losses"], b["losses"])]
    return {
        "sides": per_side,
        "trl_over_ours": {
            "step_time": trl_over_ours("step_s"),
            "supervised_tokens_per_s": trl_over_ours("supervised_tokens_per_s"),
            "real_tokens_per_s": trl_over_ours("real_tokens_per_s"),
            "peak_rss": trl_over_ours("peak_rss_mib"),
            "peak_growth": trl_over_ours("peak_growth_mib"),
            "fill_ratio": per_side["trl"]["fill_ratio"] / per_side["ours"]["fill_ratio"],
        },
        "first_step_loss_max_rel_diff": max(first),
        "every_step_loss_max_rel_diff": max(every),  # same trajectory: same gradients and AdamW updates
        "loss_check": check,
        "settings": {
            "samples_per_step": args.samples_per_step,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "max_dynamic_patch": args.max_dynamic_patch,
            "lr": args.lr,
            "threads": args.threads,
            "loss_reduction": "token",
            "precision": "fp32",
        },
        "runs": runs,
    }


def report(result: dict[str, Any]) -> None:
    s, r, c = result["sides"], result["trl_over_ours"], result["loss_check"]
    print(f"{'median [min, max] over rounds':<34}{'ours':>28}{'trl':>28}")
    for key, digits in (
        ("step_s", 4),
        ("supervised_tokens_per_s", 1),
        ("real_tokens_per_s", 0),
        ("peak_rss_mib", 0),
        ("peak_growth_mib", 1),
    ):
        row = [
            f"{v['median']:.{digits}f} [{v['min']:.{digits}f}, {v['max']:.{digits}f}]"
            for v in (s[side][key] for side in SIDES)
        ]
        print(f"{key:<34}{row[0]:>28}{row[1]:>28}")
    print(f"{'fill ratio (real / slots)':<34}{s['ours']['fill_ratio']:>28.3f}{s['trl']['fill_ratio']:>28.3f}")
    for key in ("step_time", "supervised_tokens_per_s", "real_tokens_per_s", "peak_rss", "peak_growth"):
        v = r[key]
        print(f"TRL/ours {key:<25} {v['median']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]")
    print(f"TRL/ours fill_ratio                {r['fill_ratio']:.3f}")
    firsts = ", ".join(
        f"{a:.5f}/{b:.5f}" for a, b in zip(s["ours"]["first_step_loss"], s["trl"]["first_step_loss"])
    )
    print(
        f"step-1 loss as run, ours/trl per round: {firsts} (max rel diff {result['first_step_loss_max_rel_diff']:.1e}); "
        f"every step's loss: max rel diff {result['every_step_loss_max_rel_diff']:.1e}"
    )
    lc = {k: "n/a" if v is None else f"{v:.6f}" for k, v in c["losses"].items()}
    print(
        f"step-1 loss, same weights and {c['loss_samples']} samples: trl {lc['trl']}, ours {lc['ours']}, "
        f"ours on TRL's pixels {lc['ours_on_trl_pixels']}, ours with square averaging "
        f"{lc['ours_square_reduction']}"
    )
    print(
        f"over all {c['samples']} samples: same text {c['template_renders_the_same_text']}, token ids "
        f"{c['same_input_ids']}, labels {c['same_labels']}; tiles ours {c['tiles']['ours']}, trl "
        f"{c['tiles']['trl']}; max |pixel diff| {c['max_abs_pixel_diff']:.3g}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="2 samples/step, 1+2 steps, 1 round, for CI")
    parser.add_argument("--samples-per-step", type=int, default=8, help="both sides")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds; each runs both sides in fresh processes"
    )
    parser.add_argument("--max-dynamic-patch", type=int, default=6, help="tiles per image (+ thumbnail)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (OMP_NUM_THREADS)")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "bench" / "sft_peer_work"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "sft_peer.json"))
    add_child_args(parser, SIDES)
    parser.add_argument("--loss-check", action="store_true", help=argparse.SUPPRESS)  # child: then check
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples_per_step, args.warmup, args.steps, args.repeats = 2, 1, 2, 1
    return args


def main() -> None:
    args = parse_args()
    if args.side:
        child_main(args, {"ours": run_ours, "trl": run_trl})
        return

    at_start = announce("bench_sft_peer")
    ckpt, meta = prepare(Path(args.workdir), (args.warmup + args.steps) * args.samples_per_step)
    child = ["--ckpt", str(ckpt), "--meta", str(meta), "--samples-per-step", str(args.samples_per_step)]
    child += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--lr", str(args.lr)]
    child += ["--threads", str(args.threads), "--max-dynamic-patch", str(args.max_dynamic_patch)]

    def run_side(side: str, round_index: int) -> dict[str, Any]:
        check = ["--loss-check"] if side == "trl" and round_index == 0 else []
        return run_child(__file__, ["--side", side, *check, *child], args.threads, f"side {side}")

    runs = run_rounds(SIDES, args.repeats, run_side)
    result = summarise(runs, args)
    report(result)
    write_result(args.out, result, at_start)


if __name__ == "__main__":
    main()
