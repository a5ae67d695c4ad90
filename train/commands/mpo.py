"""`vlmtune mpo`: Mixed Preference Optimization through the same runner and loop as SFT.

Also `python -m vlmtune.train.commands.mpo [hydra overrides]`; ablations: `vlmtune mpo -m experiment=mpo_ablation
loss.preference=sigmoid,ipo,hinge` (one output dir per variant).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.train.commands.runner import command_main, run_training


@dataclass
class PairWithLength:
    """The pair processor plus each pair's packed length for the chosen layout (picklable for workers).

    A pair longer than a pack (``max_tokens``; prompt + both answers, not the ``max_length`` of one
    side) is skipped here as ``too_long``, counted like any bad sample, instead of failing the packer."""

    processor: Any
    layout: str
    max_tokens: int | None = None

    @property
    def cfg(self) -> Any:  # the data settings, as on the processors themselves (data.dataset.iter_samples)
        return self.processor.cfg

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        from vlmtune.data.report import SkipSample

        pair = self.processor(*args, **kwargs)
        p, c, r = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
        pair["length"] = p + c + r if self.layout == "tree" else 2 * p + c + r
        if self.max_tokens is not None and pair["length"] > self.max_tokens:
            raise SkipSample(
                "too_long",
                f"the pair takes {pair['length']} tokens in a pack ({self.layout} layout: prompt {p}, chosen {c}, "
                f"rejected {r}) > packing.max_tokens {self.max_tokens}",
            )
        return pair


#: The precomputed reference log-probs, in the output dir: JSON (read back without running anything), keyed by
#: a hash of the data, the weights and the settings they were computed with.
REFERENCE_CACHE = "reference_logps.json"


def read_reference_cache(path: Path, key: str) -> dict[str, list[float]] | str | None:
    """The cached log-probs (``file:line`` -> [chosen, rejected]) if ``path`` holds them for ``key``; None
    when there is no cache; a refusal message when it was computed for something else."""
    if not path.exists():
        legacy = path.with_suffix(".pt")
        if legacy.exists():
            return f"{legacy}: a pickled cache of an older vlmtune, not loaded; delete it to recompute"
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"{path}: not a readable cache ({e}); delete it to recompute"
    if saved.get("key") != key:
        return f"{path} was computed for other data, model or settings; delete it to recompute"
    return saved["logps"]


def write_reference_cache(path: Path, key: str, cache: dict[str, list[float]]) -> None:
    """Atomically (a kill mid-write leaves no truncated cache behind); floats round-trip exactly."""
    from vlmtune.train.runtime.checkpoint import atomic_write

    atomic_write(path, json.dumps({"key": key, "logps": cache}))


class MPOMethod:
    """Pairs in, the MPO objective out; everything else is the SFT runner."""

    def __init__(self) -> None:
        self.layout: str | None = None

    def _layout(self, cfg: Any) -> str:
        from vlmtune.train.model.build import resolve_attn_implementation
        from vlmtune.train.objectives.mpo import resolve_layout

        if self.layout is None:
            self.layout = resolve_layout(
                cfg.loss.layout, resolve_attn_implementation(cfg.model.attn_implementation)
            )
        return self.layout

    def processor(self, cfg: Any, tokenizer: Any, tokens_per_tile: int) -> Any:
        from vlmtune.data.pairs import PairProcessor

        max_tokens = cfg.packing.max_tokens if cfg.packing.enabled else None
        return PairWithLength(
            PairProcessor(cfg.data, tokenizer, tokens_per_tile), self._layout(cfg), max_tokens
        )

    def collate(self, cfg: Any, tokenizer: Any, model: Any):
        from vlmtune.data.collate import collate_pairs

        layout, reduction = self._layout(cfg), cfg.loss.generation_reduction
        return lambda pairs: collate_pairs(pairs, layout, reduction)

    def objective(self, cfg: Any, model: Any, ds_config: dict, rebuild: Any = None) -> Any:
        """``rebuild()`` builds the starting model again: the frozen reference under ZeRO-3."""
        from vlmtune.train.objectives.mpo import MPOObjective
        from vlmtune.train.objectives.reference import adapter_disabled_reference, frozen_copy_reference

        if cfg.reference not in ("copy", "precomputed"):
            raise ValueError(f"reference must be 'copy' or 'precomputed', got {cfg.reference!r}")
        needs = cfg.loss.preference_weight or cfg.loss.quality_weight
        # precomputed: the cache is filled by on_engine, before the first step
        reference = None
        if needs and cfg.reference == "copy":  # LoRA: the policy itself with its adapters off (no copy)
            reference = (
                adapter_disabled_reference(model)
                if cfg.lora.enabled
                else frozen_copy_reference(model, ds_config, rebuild)
            )
        share = cfg.model.freeze_vision and cfg.model.freeze_projector and not cfg.lora.vision.enabled
        return MPOObjective(cfg.loss, reference, share_vision=share)

    def on_engine(
        self, cfg: Any, engine: Any, objective: Any, processor: Any, specs: list, collate: Any, out_dir: Any
    ) -> None:
        """``reference=precomputed``: load the cached reference log-probs, or compute them now with the
        untrained policy (ZeRO-3 sharded like training) and save them in the output dir."""
        if cfg.reference != "precomputed" or not objective.needs_reference:
            return
        import dataclasses

        import torch
        import torch.distributed as dist

        from vlmtune.data.dataset import iter_samples, sample_settings
        from vlmtune.data.report import SkipReport
        from vlmtune.train.model.v2pe import v2pe_key
        from vlmtune.train.objectives.reference import cache_key, cached_reference, precompute_reference
        from vlmtune.train.runtime.engine import on_rank0

        if any(spec.data_augment for spec in specs):
            raise ValueError(
                "reference=precomputed needs data_augment off in the meta file: the cached reference would "
                "have seen other pixels than the policy does"
            )
        settings = {**sample_settings(cfg.data), "layout": self._layout(cfg), **v2pe_key(engine)}
        if cfg.model.pretrained is None:  # random init: no weights file, the shapes and the seed make them
            settings["random_init"] = {"model": dataclasses.asdict(cfg.model), "seed": cfg.train.seed}
        rank, world = dist.get_rank(), dist.get_world_size()
        path = out_dir / REFERENCE_CACHE
        # rank 0 alone hashes the inputs and reads the cache, and tells the others what it found: ranks
        # deciding from their own view of a shared filesystem could take different paths and hang
        key = cache_key(cfg.data.meta_path, cfg.model.pretrained, settings) if rank == 0 else None
        found = on_rank0(lambda: read_reference_cache(path, key))
        if isinstance(found, str):
            raise ValueError(found)
        if found is not None:
            cache = found
        else:
            index = [(d, line) for d, spec in enumerate(specs) for line in range(spec.num_records)][
                rank::world
            ]
            pairs = list(iter_samples(processor.processor, specs, index, 0, SkipReport(), training=False))
            count = torch.tensor([-(-len(pairs) // 8)])
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            mine = precompute_reference(engine, pairs, collate, batch_pairs=8, num_batches=int(count))
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, mine)
            cache = {k: v for part in parts for k, v in part.items()}
            if rank == 0:
                write_reference_cache(path, key, cache)
            dist.barrier()
        objective.reference = cached_reference(cache)


def pack_length_warning(max_length: int | None, max_tokens: int, packing: bool) -> str | None:
    """What to say at start when pairs within ``data.max_length`` can still outgrow a pack.

    ``max_length`` bounds one side (prompt + the longer answer); a pair in a pack takes the prompt and both
    answers (tree layout; the separate layout the prompt twice), up to 2 x max_length tokens. Such pairs are
    skipped and counted as ``too_long`` (``PairWithLength``), so the run goes on; the skip ceiling stops it
    if most of them are."""
    if not packing:
        return None
    if max_length is None:
        return (
            f"data.max_length is unset: pairs longer than packing.max_tokens={max_tokens} (prompt + both "
            "answers) are skipped as too_long; set data.max_length <= packing.max_tokens / 2 to bound them"
        )
    if 2 * max_length > max_tokens:
        return (
            f"a pair takes up to 2 x data.max_length = {2 * max_length} tokens in a pack (prompt + both answers), "
            f"more than packing.max_tokens={max_tokens}: those pairs are skipped as too_long; set "
            f"packing.max_tokens >= {2 * max_length} (or data.max_length <= {max_tokens // 2}) to keep them all"
        )
    return None


def run_mpo(cfg: Any) -> dict[str, Any]:
    from vlmtune.train.objectives.mpo import check_mpo_config

    check_mpo_config(cfg.loss)
    warning = pack_length_warning(cfg.data.max_length, cfg.packing.max_tokens, cfg.packing.enabled)
    if warning and int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("vlmtune").warning(warning)
    if cfg.reference not in ("copy", "precomputed"):
        raise ValueError(f"reference={cfg.reference!r} is unknown; valid: copy, precomputed")
    return run_training(cfg, MPOMethod())


def main(argv: list[str] | None = None) -> int:
    return command_main(argv, "mpo", run_mpo)


if __name__ == "__main__":
    sys.exit(main())
