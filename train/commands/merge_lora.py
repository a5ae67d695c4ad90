"""`vlmtune merge-lora ADAPTER_DIR [--base DIR] --out DIR [--format hf|original]`: fold LoRA adapters into the base weights.

The merged model is only written when its logits on a few multimodal check inputs match the
adapter model's (the step where a wrong base, a dtype surprise or a missing `modules_to_save`
part silently gives users a different model). The check inputs come from ``--meta`` samples when
given, else from seeded random tiles and tokens that exercise the vision tower, projector and LLM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

# max |merged - adapter| / max |adapter logits| allowed, per weight dtype: merging W + s*B@A is
# exact up to float reassociation in fp32; bf16 weights round the merged matrix once.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def check_inputs(model: Any, tokenizer: Any, num: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Seeded prompts with 1-2 image tiles each, in the chat format the model was trained on."""
    from vlmtune.train.model.build import num_image_tokens_per_tile, tile_size

    config = model.config
    size = tile_size(config.vision_config)
    g = torch.Generator().manual_seed(seed)
    per_tile = num_image_tokens_per_tile(config)
    vocab = min(len(tokenizer), config.text_config.vocab_size)
    special = set(tokenizer.all_special_ids) | {config.image_token_id}
    ordinary = torch.tensor([i for i in range(vocab) if i not in special])
    inputs = []
    for i in range(num):
        tiles = 1 + i % 2
        head = tokenizer("<|im_start|>user\n<img>", add_special_tokens=False)["input_ids"]
        tail = tokenizer("</img>\n", add_special_tokens=False)["input_ids"]
        words = ordinary[torch.randint(len(ordinary), (12,), generator=g)].tolist()
        ids = head + [config.image_token_id] * (tiles * per_tile) + tail + words
        inputs.append(
            {
                "input_ids": torch.tensor([ids]),
                "pixel_values": torch.randn(tiles, 3, size, size, generator=g),
            }
        )
    return inputs


def meta_inputs(model: Any, tokenizer: Any, adapter_dir: Path, meta: str, num: int) -> list[dict]:
    """The first ``num`` usable samples of a meta file, processed the way training did."""
    from vlmtune.data.dataset import SampleProcessor, iter_samples
    from vlmtune.data.meta import load_meta
    from vlmtune.data.report import SkipReport
    from vlmtune.train.model.build import num_image_tokens_per_tile, tile_size
    from vlmtune.train.runtime.evaluate import trained_data_config

    data_cfg = trained_data_config(adapter_dir, tile_size(model.config.vision_config), meta)
    processor = SampleProcessor(data_cfg, tokenizer, num_image_tokens_per_tile(model.config))
    specs = load_meta(meta)
    index = [(d, line) for d, spec in enumerate(specs) for line in range(spec.num_records)][:num]
    return [
        {"input_ids": s["input_ids"][None], "pixel_values": s["pixel_values"]}
        for s in iter_samples(processor, specs, index, 0, SkipReport(), training=False)
    ]


@torch.no_grad()
def logits_on(model: Any, inputs: list[dict]) -> list[torch.Tensor]:
    dtype = next(model.parameters()).dtype
    out = []
    for x in inputs:
        kwargs: dict[str, Any] = {"input_ids": x["input_ids"], "use_cache": False}
        if x["pixel_values"].numel():
            kwargs["pixel_values"] = x["pixel_values"].to(dtype)
        out.append(model(**kwargs).logits.float())
    return out


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(t.abs().max().item() for t in a)
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / max(scale, 1e-12)


def merge_lora(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    meta: str | None = None,
    num_checks: int = 4,
    tolerance: float | None = None,
    out_format: str = "hf",
) -> dict[str, Any]:
    """Merge, check, write (``out_format`` hf, or original: the model card's layout, converted from the
    checked -hf merge); raises (and writes nothing at ``out``) when the check fails."""
    if out_format not in ("hf", "original"):
        raise ValueError(f"format={out_format!r}: use 'hf' or 'original'")
    from transformers import AutoTokenizer

    from vlmtune.train.runtime.export import load_trained, write_companions

    adapter_dir, out = Path(adapter_dir), Path(out)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ValueError(f"{adapter_dir}: not a peft adapter directory (no adapter_config.json)")
    model = load_trained(adapter_dir, base).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    settings_file = adapter_dir / "vlmtune.json"
    settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    inputs = (
        meta_inputs(model, tokenizer, adapter_dir, meta, num_checks)
        if meta
        else check_inputs(model, tokenizer, num_checks)
    )
    if not inputs:
        raise ValueError(f"{meta}: no usable sample to check the merge on")
    before = logits_on(model, inputs)
    merged = model.merge_and_unload()
    after = logits_on(merged, inputs)
    dtype = next(merged.parameters()).dtype
    limit = tolerance if tolerance is not None else TOLERANCES.get(dtype, 3e-2)
    diff = relative_difference(before, after)
    check = {"inputs": len(inputs), "max_relative_logit_diff": diff, "tolerance": limit, "dtype": str(dtype)}
    if not diff <= limit:
        raise RuntimeError(
            f"merged model's logits differ from the adapter model's by {diff:.3g} (relative) > {limit:.3g}; "
            f"nothing written to {out}"
        )
    # (not convert's own staging name, "<out>.partial", when the original layout is converted from it)
    staging = out.with_name(out.name + (".partial" if out_format == "hf" else ".merged-hf"))
    shutil.rmtree(staging, ignore_errors=True)
    from vlmtune.data.serving import stop_at_im_end

    stop_at_im_end(merged.generation_config, tokenizer)
    merged.save_pretrained(staging, safe_serialization=True)
    write_companions(staging, tokenizer, str(adapter_dir), {**settings, "merge_check": check}, merged.config)
    shutil.rmtree(out, ignore_errors=True)
    if out_format == "original":
        from vlmtune.train.model.original_format import convert

        try:
            convert(staging, out, "original")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(out)
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune merge-lora", description=__doc__)
    parser.add_argument("adapter", help="peft adapter directory (a LoRA run's OUTPUT_DIR/adapter)")
    parser.add_argument("--out", required=True, help="where to write the merged model")
    parser.add_argument("--base", default=None, help="base model directory (default: the adapter config's)")
    parser.add_argument("--meta", default=None, help="check the merge on this meta file's first samples")
    parser.add_argument("--num-checks", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=None, help="max relative logit difference")
    parser.add_argument(
        "--format",
        default="hf",
        choices=("hf", "original"),
        help="hf: transformers' layout; original: the model card's InternVLChatModel layout",
    )
    args = parser.parse_args(argv)
    try:
        check = merge_lora(
            args.adapter,
            args.out,
            base=args.base,
            meta=args.meta,
            num_checks=args.num_checks,
            tolerance=args.tolerance,
            out_format=args.format,
        )
    except (ValueError, RuntimeError) as e:
        print(f"vlmtune merge-lora: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": args.out, **check}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
