"""The runner every training command shares: config -> model, data, engine -> the one loop -> export, eval.

``run_training(cfg, method)`` goes through explicit phases, each a function below, in this order:
check the config, set up the output dir, build the model, build the data stream, create the engine
and the method's objective, resume, train, export, evaluate. What differs between SFT and MPO is a
`Method` (its sample processor, collate, objective and optional set-up once the engine exists).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from vlmtune.configs import CONFIG_DIR
from vlmtune.data.conversation import check_chat_format
from vlmtune.train.objectives import Objective
from vlmtune.train.runtime.config import SFTRunConfig, register_schemas, to_run_config
from vlmtune.train.runtime.engine import on_rank0

log = logging.getLogger("vlmtune")


class Method(Protocol):
    """What a training method plugs into the runner."""

    def processor(self, cfg: Any, tokenizer: Any, tokens_per_tile: int) -> Callable[..., dict]:
        """(spec, line, rng, training) -> one processed sample (raises SkipSample)."""

    def collate(self, cfg: Any, tokenizer: Any, model: torch.nn.Module) -> Callable[[list[dict]], dict]: ...

    def objective(
        self, cfg: Any, model: torch.nn.Module, ds_config: dict, rebuild: Callable[[], torch.nn.Module]
    ) -> Objective:
        """``rebuild()`` builds the starting model again (MPO's frozen reference under ZeRO-3)."""

    def on_engine(
        self,
        cfg: Any,
        engine: Any,
        objective: Objective,
        processor: Any,
        specs: list,
        collate: Any,
        out_dir: Path,
    ) -> None:
        """Set-up that needs the engine, before the first step (MPO: the precomputed reference)."""


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
        from vlmtune.data.meta import build_index

        if epoch not in self._index_cache:
            self._index_cache = {epoch: build_index(self.specs, self.seed + epoch)}
        return self._index_cache[epoch]

    def epoch_size(self, epoch: int) -> int:
        return len(self.index(epoch))

    def __call__(self, key: tuple[int, int]) -> Any:
        from vlmtune.data.dataset import process_position

        epoch, position = key
        index = self.index(epoch)
        return process_position(self.processor, self.specs, index, position, self.seed, epoch, self.training)


EXPORT_FORMATS = ("hf", "original", "both")


def check_config(cfg: SFTRunConfig) -> None:
    """Refuse, at start, values that would otherwise fail hours in."""
    from vlmtune.data.token_weights import reduction_exponent
    from vlmtune.train.model.lora import check_lora_config

    reduction_exponent(cfg.train.loss_reduction)
    from vlmtune.data.answers import MATCH_MODES

    if cfg.train.export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"train.export_format must be one of {', '.join(EXPORT_FORMATS)}, got {cfg.train.export_format!r}"
        )
    if cfg.lora.enabled and cfg.train.export_format != "hf":
        raise ValueError(
            f"train.export_format={cfg.train.export_format} with LoRA: the adapter is exported against the "
            "-hf keys (peft loads it on the -hf base); write the original layout from it with "
            "`vlmtune merge-lora OUTPUT_DIR/adapter --out DIR --format original`"
        )
    if cfg.train.eval_match not in MATCH_MODES:
        raise ValueError(
            f"train.eval_match must be one of {', '.join(MATCH_MODES)}, got {cfg.train.eval_match!r}"
        )
    if (
        cfg.packing.enabled
        and cfg.data.max_length is not None
        and cfg.data.max_length > cfg.packing.max_tokens
    ):
        raise ValueError(
            f"data.max_length={cfg.data.max_length} > packing.max_tokens={cfg.packing.max_tokens}: "
            "a sample could never fit a pack"
        )
    from vlmtune.data.report import SkipCeiling

    # refuses a window < 1 and a fraction not in (0, 1]
    SkipCeiling(cfg.train.skip_window, cfg.train.skip_ceiling)
    for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg.train, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(cfg.train, name)}")
    check_lora_config(cfg.lora, zero_stage=cfg.deepspeed.zero_stage)
    check_precision(cfg)
    if cfg.deepspeed.offload_param and cfg.deepspeed.zero_stage != 3:
        raise ValueError(
            "deepspeed.offload_param needs deepspeed.zero_stage=3 (only ZeRO-3 partitions parameters)"
        )
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1 (ZeRO-Offload)")


def weight_dtype(cfg: Any) -> str:
    """The dtype the weights will be held in: model.dtype, or for ``auto`` the checkpoint's (its config.json,
    read as data) or float32 for random init."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    if cfg.model.pretrained is None or not (Path(cfg.model.pretrained) / "config.json").is_file():
        return "float32"
    config = json.loads((Path(cfg.model.pretrained) / "config.json").read_text())
    text = config.get("text_config") or config.get("llm_config") or {}
    return str(
        config.get("dtype")
        or config.get("torch_dtype")
        or text.get("dtype")
        or text.get("torch_dtype")
        or "float32"
    )


def check_precision(cfg: Any) -> None:
    """Half-precision weights trained in fp32 with no master copy: every update smaller than the weight's
    bf16 resolution (2^-8 relative) rounds away, so a full fine-tune would barely move. DeepSpeed keeps fp32
    master weights only with ``train.precision=bf16``; LoRA trains fp32 adapters over a frozen base."""
    from vlmtune.train.runtime.engine import resolve_precision

    precision = resolve_precision(cfg.train.precision)
    dtype = weight_dtype(cfg)
    if precision == "fp32" and dtype in ("bfloat16", "float16") and not cfg.lora.enabled:
        raise ValueError(
            f"model weights in {dtype} (model.dtype={cfg.model.dtype}) with train.precision={cfg.train.precision} "
            f"({precision}, no fp32 master copy): updates below {dtype}'s resolution would round to zero. Set "
            "model.dtype=float32 (fp32 training), or train.precision=bf16 (DeepSpeed keeps fp32 master weights)"
        )


def resolve_pretrained(cfg: Any, out_dir: Path, rank: int) -> None:
    """``model.pretrained`` (and ``model.tokenizer``) in the -hf layout. An original-format directory
    (`InternVLChatModel`: the model card's checkpoints, the official trainer's) is converted once by rank
    0 into ``output_dir/pretrained_hf`` (config.json and safetensors read as data: no remote code), the
    other ranks wait; the run then loads that, partitioned under ZeRO-3 as any -hf checkpoint."""
    from vlmtune.train.model.original_format import convert, is_original_format

    source = cfg.model.pretrained
    if source is None or not is_original_format(source):
        return
    target = out_dir / "pretrained_hf"
    marker = target / "converted_from.json"
    if rank == 0:
        stamp = {
            "source": str(Path(source).resolve()),
            "config_mtime": (Path(source) / "config.json").stat().st_mtime,
        }
        if not marker.exists() or json.loads(marker.read_text()) != stamp:
            import shutil

            shutil.rmtree(target, ignore_errors=True)
            summary = convert(source, target, "hf")
            marker.write_text(json.dumps(stamp))
            log.info(
                "model.pretrained=%s is in the original InternVL layout: converted to %s (%d tensors); "
                "it was trained with %s",
                source,
                target,
                summary["tensors"],
                json.dumps(summary["serving"], ensure_ascii=False),
            )
    dist.barrier()
    if cfg.model.tokenizer in (None, source):
        cfg.model.tokenizer = str(target)
    cfg.model.pretrained = str(target)


def load_tokenizer(cfg: SFTRunConfig) -> Any:
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer or cfg.model.pretrained
    if path is None:
        raise ValueError("model.tokenizer (or model.pretrained) must name a directory holding the tokenizer")
    return AutoTokenizer.from_pretrained(path)


def run_training(cfg: Any, method: Method) -> dict[str, Any]:
    """Train with ``method`` (SFT, MPO...) through the one loop; returns a summary (step, output dir, eval).

    The engines live only inside ``_train``: they are released before the process group is torn
    down, which gloo needs to exit cleanly.
    """
    from vlmtune.train.runtime.engine import (
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


# ---- phases -------------------------------------------------------------------------------------


def setup_output_dir(cfg: Any, rank: int) -> Path:
    """The demo's data first when asked, then the output dir with the resolved config."""
    out_dir = Path(cfg.train.output_dir)
    if cfg.prepare_demo:  # the demo presets only (train/demo/)
        if rank == 0:
            from vlmtune.train.demo.prepare import prepare_demo_inputs

            prepare_demo_inputs(cfg)
        dist.barrier()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), out_dir / "config.yaml")
    return out_dir


@dataclass
class BuiltModel:
    model: torch.nn.Module
    tokens_per_tile: int
    rebuild: Callable[[], torch.nn.Module]  # the starting weights again, without LoRA


def build_starting_model(cfg: Any, tokenizer: Any, partitioned: bool, rank: int, world: int) -> BuiltModel:
    """The policy, built so that a second build is identical (random init is seeded): under ZeRO-3 the
    MPO reference is such a second build (a partitioned model cannot be deep-copied)."""
    from vlmtune.train.model.build import build_model, count_parameters, num_image_tokens_per_tile, tile_size
    from vlmtune.train.model.sequence_parallel import enable_sequence_parallel
    from vlmtune.train.model.v2pe import apply_v2pe_config
    from vlmtune.train.runtime.engine import resolve_precision

    def build(lora: Any) -> torch.nn.Module:
        torch.manual_seed(cfg.train.seed)
        built = build_model(cfg.model, tokenizer, lora)
        apply_v2pe_config(built, cfg.v2pe)  # V2PE's δ on the config: policy, reference, eval, export
        enable_sequence_parallel(built, cfg.train.sequence_parallel_size)  # the LLM's attention, the group
        if resolve_precision(cfg.train.precision) == "bf16" and cfg.lora.quantize is None and not partitioned:
            built = built.to(torch.bfloat16)  # (zero.Init casts itself; QLoRA's 4-bit weights can't be cast)
        return built

    model = build(cfg.lora)
    tile = tile_size(model.config.vision_config)
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
    return BuiltModel(model, num_image_tokens_per_tile(model.config), lambda: build(None))


@dataclass
class TrainData:
    specs: list
    processor: Any
    stream: Any  # data.stream.MicroBatchStream
    report: Any  # data.report.SkipReport


def build_data(cfg: Any, method: Method, tokenizer: Any, tokens_per_tile: int, out_dir: Path) -> TrainData:
    """This rank's resumable micro-batch stream over the meta file (mixture weights resolved first)."""
    from vlmtune.data.meta import load_meta
    from vlmtune.data.mixture import resolve_mixture
    from vlmtune.data.report import SkipCeiling, SkipReport
    from vlmtune.data.stream import MicroBatchStream
    from vlmtune.train.model.sequence_parallel import data_parallel_rank

    rank, world = dist.get_rank(), dist.get_world_size()
    # the ranks of a sequence-parallel group read the same micro-batches: shard by data-parallel rank
    dp_rank, dp_world = data_parallel_rank(rank, world, cfg.train.sequence_parallel_size)
    specs = load_meta(cfg.data.meta_path)
    processor = method.processor(cfg, tokenizer, tokens_per_tile)
    # weights -> samples per epoch, estimated by rank 0 alone and broadcast: every rank must shard the
    # same epoch (a rank estimating from its own view of the files could plan another one and hang)
    specs, mixture = on_rank0(lambda: resolve_mixture(specs, processor, cfg.data.seed))
    if rank == 0 and mixture:
        log.info("data mixture (token shares): %s", json.dumps(mixture))
    loader = SampleLoader(processor, specs, cfg.data.seed)
    report = SkipReport(out_dir / f"skipped_rank{rank}.jsonl")
    ceiling = SkipCeiling(cfg.train.skip_window, cfg.train.skip_ceiling)
    stream = MicroBatchStream(
        loader.epoch_size,
        loader,
        rank=dp_rank,
        world_size=dp_world,
        micro_batch_size=cfg.train.micro_batch_size,
        packing=cfg.packing.enabled,
        max_tokens=cfg.packing.max_tokens,
        max_tiles=cfg.packing.max_tiles,
        buffer_size=cfg.packing.buffer_size,
        on_skip=lambda s: ceiling.observe(report.skip(s.dataset, s.source, s.reason, s.detail)),
        on_kept=lambda: ceiling.observe(None),
        num_workers=cfg.train.num_workers,
    )
    return TrainData(specs, processor, stream, report)


def resume(engine: Any, objective: Objective, data: TrainData, out_dir: Path, tag: str | None) -> int:
    """Restore checkpoint ``tag`` (model, optimizer, data position, skips, objective state); returns the
    step to continue from (0 for a fresh run, ``tag`` None)."""
    from vlmtune.train.runtime.checkpoint import load_checkpoint
    from vlmtune.train.runtime.elastic import rank_states

    if tag is None:
        return 0
    world = dist.get_world_size()  # a checkpoint of another world size: its per-rank states re-dealt
    shared, per_rank = load_checkpoint(
        engine, out_dir, tag, reshard=lambda old: rank_states(old, world, data.stream.epoch_size)
    )
    if dist.get_rank() == 0:  # the skip logs of ranks this run does not have: replayed by rank r mod world
        for path in out_dir.glob("skipped_rank*.jsonl"):
            if int(path.stem.removeprefix("skipped_rank")) >= world:
                path.unlink()
    data.stream.load_state_dict(per_rank["stream"])
    for e in per_rank.get("skipped", []):
        source = (
            e["file"] if e["line"] is None else f"{e['file']}:{e['line']}"
        )  # "PATH[split]:row N" has none
        data.report.skip(e["dataset"], source, e["reason"], e["detail"])
    if "objective" in shared:
        objective.load_state_dict(shared["objective"])
    if dist.get_rank() == 0:
        log.info("resumed from %s at step %d", tag, shared["step"])
    return shared["step"]


def export(cfg: Any, engine: Any, tokenizer: Any, out_dir: Path, specs: list) -> Path:
    """The HF directory (full fine-tune) or the peft adapter directory (LoRA), with the run's data
    settings for the serving files (and the datasets whose meta entry tiled otherwise); with
    ``export_format`` original or both, rank 0 also converts it to ``output_dir/original``."""
    from vlmtune.data.dataset import sample_settings
    from vlmtune.data.serving import per_dataset_tiling
    from vlmtune.train.runtime.export import export_adapter, export_hf

    settings = sample_settings(cfg.data)
    extra: dict[str, Any] = {"data": settings}
    if own := per_dataset_tiling(specs, settings):
        extra["per_dataset_tiling"] = own
    write, target = (export_adapter, out_dir / "adapter") if cfg.lora.enabled else (export_hf, out_dir / "hf")
    write(engine, tokenizer, target, source_dir=cfg.model.tokenizer or cfg.model.pretrained, extra=extra)
    if cfg.train.export_format != "hf" and dist.get_rank() == 0:
        import shutil

        from vlmtune.train.model.original_format import convert

        original = out_dir / "original"
        shutil.rmtree(original, ignore_errors=True)  # a rerun's export replaces the last one
        convert(target, original, "original")
        log.info("export: %s in the original InternVL layout (from %s)", original, target)
    dist.barrier()
    return target


def drop_hf_copy(cfg: Any, summary: dict[str, Any], rank: int) -> None:
    """``export_format=original``: the -hf directory served the end-of-run eval; only the original stays."""
    if cfg.train.export_format != "original" or "export" not in summary:
        return
    hf = Path(summary["export"])
    summary["export"] = str(hf.parent / "original")
    if rank == 0:
        import shutil

        shutil.rmtree(hf, ignore_errors=True)


def log_final(summary: dict[str, Any], out_dir: Path, skipped: int) -> None:
    log.info("done: step %d, %d samples skipped, output in %s", summary["step"], skipped, out_dir)
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


def _train(
    cfg: Any, method: Method, rank: int, world: int, ds_config: dict, partitioned: bool
) -> dict[str, Any]:
    from vlmtune.train.runtime.checkpoint import resume_tag, run_fingerprint
    from vlmtune.train.runtime.elastic import prepare_resume
    from vlmtune.train.runtime.engine import create_engine
    from vlmtune.train.runtime.loop import train_loop
    from vlmtune.train.runtime.metrics import MetricsLogger

    out_dir = setup_output_dir(cfg, rank)
    fingerprint = run_fingerprint(cfg, world)  # before resolve_pretrained: the settings as the user gave them
    tag = resume_tag(out_dir, fingerprint) if cfg.train.resume else None  # refused here, before any model
    ds_config = prepare_resume(out_dir, tag, ds_config, world)  # another world size: converted here
    resolve_pretrained(cfg, out_dir, rank)
    tokenizer = load_tokenizer(cfg)
    check_chat_format(tokenizer, f"{cfg.model.tokenizer or cfg.model.pretrained}")
    built = build_starting_model(cfg, tokenizer, partitioned, rank, world)
    data = build_data(cfg, method, tokenizer, built.tokens_per_tile, out_dir)
    collate = method.collate(cfg, tokenizer, built.model)
    objective = method.objective(cfg, built.model, ds_config, rebuild=built.rebuild)
    engine, _, _ = create_engine(built.model, ds_config, cfg.optim, cfg.train.max_steps)
    method.on_engine(cfg, engine, objective, data.processor, data.specs, collate, out_dir)
    start_step = resume(engine, objective, data, out_dir, tag)

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
        from vlmtune.train.runtime.evaluate import evaluate_accuracy

        def evaluate(step: int, keep_records: bool = False) -> dict:
            return evaluate_accuracy(
                engine,
                tokenizer,
                cfg.eval_data,
                built.tokens_per_tile,
                cfg.train.eval_max_samples,
                max_new_tokens=cfg.train.eval_max_new_tokens,
                keep_records=keep_records,
                match=cfg.train.eval_match,
            )

    before = (
        evaluate(start_step) if evaluate is not None and cfg.train.eval_before and start_step == 0 else None
    )
    from vlmtune.train.runtime.preemption import StopRequest

    stop = StopRequest(cfg.train.stop_signals, cfg.train.stop_file)
    if rank == 0 and stop.clear_stale():
        log.info("removed the stop file %s left by the previous, stopped attempt", stop.stop_file)
    try:
        step = train_loop(
            engine,
            objective,
            iter(data.stream),
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
            checkpoint_state=lambda: (
                {"objective": objective.state_dict(), "run": fingerprint},
                {"stream": data.stream.state_dict(), "skipped": data.report.entries},
            ),
            skipped_count=lambda: data.report.total,
            dataset_names=[s.name for s in data.specs],
            stop=stop,
            max_nonfinite_steps=cfg.train.max_nonfinite_steps,
        )
    finally:
        stop.restore()
    from vlmtune.train.runtime.loop import all_reduce_sum

    # every rank's skips (each rank's report holds its own shard's)
    skipped_total = int(all_reduce_sum(torch.tensor([float(data.report.total)], dtype=torch.float64)).item())
    summary: dict[str, Any] = {"step": step, "output_dir": str(out_dir), "skipped": data.report.to_dict()}
    if step < cfg.train.max_steps:  # stopped on request: the checkpoint is saved, the rest is for the rerun
        summary["stopped"] = stop.reason()
        logger.close()
        data.report.close()
        if rank == 0:
            stop.acknowledge(step)
            log.info(
                "stopped at step %d of %d (%s), checkpoint complete; run the same command again to resume",
                step,
                cfg.train.max_steps,
                summary["stopped"],
            )
        return summary
    if cfg.train.export:
        summary["export"] = str(export(cfg, engine, tokenizer, out_dir, data.specs))
    if evaluate is not None:
        results = evaluate(step, keep_records=True)
        records = results.pop("records")
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
    data.report.close()
    if rank == 0:
        log_final(summary, out_dir, skipped_total)
        if "export" in summary and "eval" in summary and cfg.train.serving_check > 0:
            summary["serving_check"] = check_serving(cfg, summary, records, tokenizer, built)
    drop_hf_copy(cfg, summary, rank)
    return summary


def check_serving(cfg: Any, summary: dict, records: list[dict], tokenizer: Any, built: BuiltModel) -> dict:
    """The export asked again through plain transformers (rank 0): what a user who serves it gets.
    Below 99% agreement with vlmtune's answers the run warns loudly and says what differs."""
    from vlmtune.train.model.build import count_parameters
    from vlmtune.train.runtime.eval_engines import SERVING_CHECK_MAX_PARAMS, serving_check

    export_dir = Path(summary["export"])
    if count_parameters(built.model)["total"] > SERVING_CHECK_MAX_PARAMS:
        log.info(
            "serving check skipped (model too large to load twice here): run `vlmtune eval --model %s "
            "--meta %s --engine all`",
            export_dir,
            cfg.eval_data.meta_path,
        )
        return {"skipped": "model too large"}
    result = serving_check(
        export_dir,
        records,
        cfg.eval_data,
        tokenizer,
        built.tokens_per_tile,
        cfg.train.serving_check,
        cfg.train.eval_max_new_tokens,
    )
    (Path(summary["output_dir"]) / "serving_check.json").write_text(json.dumps(result, indent=2))
    if result["agreement"] < 0.99:
        log.warning(
            "SERVING CHECK FAILED: the export answers %d held-out questions through plain transformers with "
            "only %.1f%% agreement with vlmtune's own answers; first difference: %s",
            result["n"],
            100 * result["agreement"],
            json.dumps(result.get("first_disagreement"), ensure_ascii=False),
        )
    else:
        log.info(
            "serving check: transformers agrees with vlmtune on %.1f%% of %d held-out questions",
            100 * result["agreement"],
            result["n"],
        )
    return result


def hydra_entry(argv: list[str], config_name: str, run: Callable[[Any], Any]) -> int:
    """Run a Hydra app with ``argv`` as its overrides; all ranks share one output dir (no timestamps)."""
    register_schemas()

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name=config_name)
    def _app(dcfg: DictConfig) -> Any:
        return run(to_run_config(dcfg))

    saved = sys.argv
    sys.argv = [f"vlmtune-{config_name}", *argv]
    try:
        _app()
    finally:
        sys.argv = saved
    return 0


def command_main(argv: list[str] | None, config_name: str, run: Callable[[Any], Any]) -> int:
    """A Hydra training command's ``main``: logging, then the app with the command line's overrides."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return hydra_entry(list(sys.argv[1:] if argv is None else argv), config_name, run)
