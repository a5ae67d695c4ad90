"""`vlmtune sft`: config -> model, data stream, engine -> the shared loop -> checkpoints, export, eval.

Also `python -m train.sft [hydra overrides]`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from train.config import SFTRunConfig, register_schemas

log = logging.getLogger("vlmtune")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@dataclass
class SampleLoader:
    """(epoch, position) -> processed sample or Skipped; picklable, so DataLoader workers can run it."""

    processor: Any
    specs: list
    seed: int
    training: bool = True

    def __post_init__(self) -> None:
        self._index_cache: dict[int, list] = {}

    def index(self, epoch: int) -> list:
        from data.meta import build_index

        if epoch not in self._index_cache:
            self._index_cache = {epoch: build_index(self.specs, self.seed + epoch)}
        return self._index_cache[epoch]

    def epoch_size(self, epoch: int) -> int:
        return len(self.index(epoch))

    def __call__(self, key: tuple[int, int]) -> Any:
        from data.dataset import sample_rng
        from data.meta import jsonl_file
        from data.report import SkipSample
        from data.stream import Skipped

        epoch, position = key
        ds, line = self.index(epoch)[position]
        spec = self.specs[ds]
        try:
            return self.processor(spec, line, sample_rng(self.seed, position, epoch), self.training)
        except SkipSample as e:
            return Skipped(spec.name, jsonl_file(spec.annotation).source(line), e.reason, e.detail)


def check_config(cfg: SFTRunConfig) -> None:
    """Refuse, at start, values that would otherwise fail hours in."""
    from train.losses import reduction_exponent

    reduction_exponent(cfg.train.loss_reduction)
    if (
        cfg.packing.enabled
        and cfg.data.max_length is not None
        and cfg.data.max_length > cfg.packing.max_tokens
    ):
        raise ValueError(
            f"data.max_length={cfg.data.max_length} > packing.max_tokens={cfg.packing.max_tokens}: "
            "a sample could never fit a pack"
        )
    for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg.train, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(cfg.train, name)}")
    from train.lora import check_lora_config

    check_lora_config(cfg.lora, zero_stage=cfg.deepspeed.zero_stage)


def load_tokenizer(cfg: SFTRunConfig):
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer or cfg.model.pretrained
    if path is None:
        raise ValueError("model.tokenizer (or model.pretrained) must name a directory holding the tokenizer")
    return AutoTokenizer.from_pretrained(path)


class SFTMethod:
    """What SFT plugs into the shared runner: its sample processor, collate and objective."""

    def processor(self, cfg: Any, tokenizer: Any, tokens_per_tile: int) -> Any:
        from data.dataset import SampleProcessor

        return SampleProcessor(cfg.data, tokenizer, tokens_per_tile)

    def collate(self, cfg: Any, tokenizer: Any, model: Any):
        from data.collate import collate_packed, collate_padded

        reduction = cfg.train.loss_reduction
        if cfg.packing.enabled:
            return lambda samples: collate_packed(samples, reduction)
        return lambda samples: collate_padded(samples, reduction, tokenizer.pad_token_id)

    def prepare_demo(self, cfg: Any) -> None:
        from train.demo import prepare_demo

        prepare_demo(cfg)

    def objective(self, cfg: Any, model: Any, ds_config: dict, rebuild: Any = None) -> Any:
        from train.objectives.sft import SFTObjective

        return SFTObjective(cfg.train.loss_reduction)


def run_sft(cfg: SFTRunConfig) -> dict[str, Any]:
    return run_training(cfg, SFTMethod())


def run_training(cfg: Any, method: Any) -> dict[str, Any]:
    """Train with ``method`` (SFT, MPO...) through the one loop; returns a summary (step, output dir, eval).

    The engines live only inside ``_train``: they are released before the process group is torn
    down, which gloo needs to exit cleanly.
    """
    from train.engine import (
        build_ds_config,
        init_distributed,
        partitioned_construction,
        shutdown_distributed,
    )

    check_config(cfg)
    rank, world = init_distributed()
    ds_config = build_ds_config(cfg.deepspeed, cfg.train, cfg.optim, world)
    with partitioned_construction(ds_config) as partitioned:
        summary = _train(cfg, method, rank, world, ds_config, partitioned)
    shutdown_distributed()
    return summary


def _train(
    cfg: Any, method: Any, rank: int, world: int, ds_config: dict, partitioned: bool
) -> dict[str, Any]:
    from data.meta import load_meta
    from data.report import SkipReport
    from data.stream import MicroBatchStream
    from train.checkpoint import latest_complete, load_checkpoint
    from train.engine import create_engine, resolve_precision
    from train.loop import train_loop
    from train.metrics import MetricsLogger
    from train.models import build_model, count_parameters, num_image_tokens_per_tile

    out_dir = Path(cfg.train.output_dir)
    if cfg.prepare_demo:
        if rank == 0:
            method.prepare_demo(cfg)
        dist.barrier()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), out_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg)

    def build_starting_model(lora: Any) -> torch.nn.Module:
        """The starting weights, the same on every call (random init is seeded): the policy, and under
        ZeRO-3 the reference copy too (a partitioned model cannot be deep-copied)."""
        torch.manual_seed(cfg.train.seed)
        built = build_model(cfg.model, tokenizer, lora)
        from train.v2pe import apply_v2pe_config

        apply_v2pe_config(built, cfg.v2pe)  # V2PE's δ on the config: policy, reference, eval, export
        if resolve_precision(cfg.train.precision) == "bf16" and cfg.lora.quantize is None and not partitioned:
            built = built.to(torch.bfloat16)  # (zero.Init casts itself; QLoRA's 4-bit weights can't be cast)
        return built

    model = build_starting_model(cfg.lora)
    tokens_per_tile = num_image_tokens_per_tile(model.config)
    tile = model.config.vision_config.image_size
    tile = tile[0] if isinstance(tile, (list, tuple)) else tile
    for name, data_cfg in (("data", cfg.data), ("eval_data", cfg.eval_data)):
        if data_cfg is not None and data_cfg.image_size != tile:
            raise ValueError(f"{name}.image_size={data_cfg.image_size} but the model's tiles are {tile} px")
    counts = count_parameters(model)
    if rank == 0:
        log.info(
            "parameters: %s (trainable %.2f%%)%s",
            json.dumps(counts),
            100 * counts["trainable"] / counts["total"],
            f"; built partitioned over {world} ranks (ZeRO-3 zero.Init)" if partitioned else "",
        )

    specs = load_meta(cfg.data.meta_path)
    processor = method.processor(cfg, tokenizer, tokens_per_tile)
    from data.mixture import resolve_mixture

    specs, mixture = resolve_mixture(specs, processor, cfg.data.seed)  # weights -> samples per epoch
    if rank == 0 and mixture:
        log.info("data mixture (token shares): %s", json.dumps(mixture))
    loader = SampleLoader(processor, specs, cfg.data.seed)
    report = SkipReport(out_dir / f"skipped_rank{rank}.jsonl")

    def on_skip(s: Any) -> None:
        report.skip(s.dataset, s.source, s.reason, s.detail)

    stream = MicroBatchStream(
        loader.epoch_size,
        loader,
        rank=rank,
        world_size=world,
        micro_batch_size=cfg.train.micro_batch_size,
        packing=cfg.packing.enabled,
        max_tokens=cfg.packing.max_tokens,
        max_tiles=cfg.packing.max_tiles,
        buffer_size=cfg.packing.buffer_size,
        on_skip=on_skip,
        num_workers=cfg.train.num_workers,
    )
    collate = method.collate(cfg, tokenizer, model)
    objective = method.objective(cfg, model, ds_config, rebuild=lambda: build_starting_model(None))
    engine, _, _ = create_engine(model, ds_config, cfg.optim, cfg.train.max_steps)

    if hasattr(method, "on_engine"):
        method.on_engine(cfg, engine, objective, processor, specs, collate, out_dir)

    start_step = 0
    tag = latest_complete(out_dir) if cfg.train.resume else None
    if tag is not None:
        shared, per_rank = load_checkpoint(engine, out_dir, tag)
        start_step = shared["step"]
        stream.load_state_dict(per_rank["stream"])
        for e in per_rank.get("skipped", []):
            report.skip(e["dataset"], f"{e['file']}:{e['line']}", e["reason"], e["detail"])
        if hasattr(objective, "load_state_dict") and "objective" in shared:
            objective.load_state_dict(shared["objective"])
        if rank == 0:
            log.info("resumed from %s at step %d", tag, start_step)

    def checkpoint_state() -> tuple[dict, dict]:
        shared = {"objective": objective.state_dict()} if hasattr(objective, "state_dict") else {}
        return shared, {"stream": stream.state_dict(), "skipped": report.entries}

    logger = MetricsLogger(
        out_dir,
        enabled=rank == 0,
        total_steps=cfg.train.max_steps,
        start_step=start_step,
        wandb_cfg=cfg.train.wandb,
        run_config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    )
    evaluate = None
    if cfg.eval_data is not None:
        from train.evaluate import evaluate_accuracy

        def evaluate(step: int) -> dict:
            return evaluate_accuracy(
                engine, tokenizer, cfg.eval_data, tokens_per_tile, cfg.train.eval_max_samples
            )

    before = (
        evaluate(start_step) if evaluate is not None and cfg.train.eval_before and start_step == 0 else None
    )
    step = train_loop(
        engine,
        objective,
        iter(stream),
        collate,
        start_step=start_step,
        max_steps=cfg.train.max_steps,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        out_dir=out_dir,
        logger=logger,
        log_every=cfg.train.log_every,
        save_every=cfg.train.save_every,
        eval_every=cfg.train.eval_every,
        keep_last=cfg.train.keep_last,
        evaluate=evaluate,
        checkpoint_state=checkpoint_state,
        skipped_count=lambda: report.total,
        dataset_names=[s.name for s in specs],
    )
    summary: dict[str, Any] = {"step": step, "output_dir": str(out_dir), "skipped": report.to_dict()}
    if cfg.train.export:
        from data.dataset import sample_settings
        from train.export import export_adapter, export_hf

        export, target = (
            (export_adapter, out_dir / "adapter") if cfg.lora.enabled else (export_hf, out_dir / "hf")
        )
        export(
            engine,
            tokenizer,
            target,
            source_dir=cfg.model.tokenizer or cfg.model.pretrained,
            extra={"data": sample_settings(cfg.data)},
        )
        summary["export"] = str(target)
    if evaluate is not None:
        results = evaluate(step)
        if before is not None:
            results["before"] = {k: v for k, v in before.items() if k != "examples"}
        summary["eval"] = results
        if rank == 0:
            (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
            logger.log(
                {"step": step, **{f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}},
                advance=0,
            )
    logger.close()
    report.close()
    if rank == 0:
        log.info("done: step %d, %d samples skipped, output in %s", step, report.total, out_dir)
        if "eval" in summary:
            e = summary["eval"]
            log.info(
                "held-out exact match %.3f | same model, blank images %.3f | majority answer %.3f (n=%d) -> %s",
                e["accuracy"],
                e["blank_image_accuracy"],
                e["majority_baseline"],
                e["num_samples"],
                out_dir / "eval.json",
            )
            if "text_perplexity" in e:
                log.info("held-out text perplexity %.3f (%d tokens)", e["text_perplexity"], e["text_tokens"])
    return summary


def _hydra_entry(argv: list[str], config_name: str, run: Any) -> int:
    """Run a Hydra app with ``argv`` as its overrides; all ranks share one output dir (no timestamps)."""
    register_schemas()

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name=config_name)
    def _app(dcfg: DictConfig) -> Any:
        cfg = OmegaConf.to_object(dcfg)
        return run(cfg)

    saved = sys.argv
    sys.argv = [f"vlmtune-{config_name}", *argv]
    try:
        _app()
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return _hydra_entry(list(sys.argv[1:] if argv is None else argv), "sft", run_sft)


if __name__ == "__main__":
    sys.exit(main())
