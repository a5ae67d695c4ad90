"""The one training loop (SFT, MPO, pre-training): engine step, accumulation, logging, eval, checkpoints.

Per optimizer step it draws ``gradient_accumulation_steps`` micro-batches, sums the objective's
normalisers over them and over all ranks (one all-reduce), then runs forward/backward on each.
Each micro-batch loss is the share of the step loss it carries, scaled by ``gas * world`` because
DeepSpeed divides by ``gas`` in backward and averages gradients over ranks: the sum of shares is
exactly the step's weighted mean, however the samples were split.

With sequence parallelism (train/model/sequence_parallel.py) the ranks of an SP group draw the same
micro-batches and each carries the share of its slice of the sequence, so the shares and the scale stay
as they are; what the micro-batches themselves count (normalisers, tokens, samples, skips) is counted
once per group, by its first rank.

The realised data mixture is logged too: ``tokens/<dataset>`` is the tokens (text + image) each
dataset contributed, summed over ranks, since the previous metrics line, so the sum over the file's
lines is the run's total per dataset (`train.metrics.MetricsLogger` adds the cumulative shares).
``text_only_micro_batches`` counts the step's micro-batches (all ranks) without an image tile.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlmtune.train.model.sequence_parallel import sequence_parallel_of
from vlmtune.train.objectives import Objective
from vlmtune.train.runtime.checkpoint import save_checkpoint
from vlmtune.train.runtime.metrics import MetricsLogger
from vlmtune.train.runtime.preemption import StopRequest

log = logging.getLogger("vlmtune")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def grad_norm_before_step(engine: Any) -> float:
    """Global gradient norm (pre-clipping) where DeepSpeed keeps none: ZeRO-0 with a client optimizer."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def skip_nonfinite_step(engine: Any, grad_norm: float) -> bool:
    """ZeRO-0: a non-finite gradient norm (the gradients are already averaged over ranks, so every rank
    sees the same norm) turns the coming optimizer step into a skipped one, the way ZeRO 1-3 skip such a
    step themselves: the optimizer does not run, and DeepSpeed, reading the optimizer's ``overflow`` flag,
    counts it in ``engine.skipped_steps`` and leaves the learning-rate schedule where it was."""
    if math.isfinite(grad_norm):
        return False
    optimizer = engine.optimizer
    step = optimizer.step

    def skipped(*args: Any, **kwargs: Any) -> None:
        optimizer.step = step
        optimizer.overflow = True

    optimizer.step = skipped
    return True


def _clear_overflow(engine: Any) -> None:
    if "overflow" in vars(engine.optimizer):
        del engine.optimizer.overflow


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient: the data or the settings are bad."""


def dataset_tokens(batches: list[dict], names: list[str]) -> torch.Tensor:
    """Tokens of each dataset in ``names`` over ``batches`` (float64 [len(names)]), from the
    ``datasets``/``sample_tokens`` each collated batch carries; batches without them count nothing."""
    out = torch.zeros(len(names), dtype=torch.float64)
    slot = {name: i for i, name in enumerate(names)}
    for batch in batches:
        for name, length in zip(batch.get("datasets", ()), batch.get("sample_tokens", ())):
            if name in slot:
                out[slot[name]] += length
    return out


def train_loop(
    engine: Any,
    objective: Objective,
    micro_batches: Iterator[list[dict]],
    collate: Callable[[list[dict]], dict],
    *,
    start_step: int,
    max_steps: int,
    gradient_accumulation_steps: int,
    out_dir: Path,
    logger: MetricsLogger,
    log_every: int = 1,
    save_every: int = 0,
    eval_every: int = 0,
    keep_last: int = 2,
    evaluate: Callable[[int], dict] | None = None,
    checkpoint_state: Callable[[], tuple[dict, dict]] = lambda: ({}, {}),
    skipped_count: Callable[[], int] = lambda: 0,
    dataset_names: Sequence[str] = (),
    stop: StopRequest | None = None,
    max_nonfinite_steps: int = 3,
) -> int:
    """Run optimizer steps ``start_step+1 .. max_steps``; returns the last step done (fewer than
    ``max_steps`` when ``stop`` was requested: that step is saved as a complete checkpoint first).

    ``checkpoint_state()`` gives (shared, per-rank) state to save beside DeepSpeed's: the step,
    the data stream position, the objective's running state (e.g. BCO's reward shift).
    ``dataset_names``: the meta file's datasets, in its order (the same on every rank, so the
    per-dataset counts reduce element by element). A step whose loss or gradient norm is not finite
    changes no weight on any rank and is counted (``nonfinite_steps``); ``max_nonfinite_steps`` such
    steps in a row stop the run (`NonFiniteError`) naming the last complete checkpoint.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sp = sequence_parallel_of(engine)
    once = 1.0 if sp is None or sp.rank == 0 else 0.0  # what an SP group's ranks share, counted once
    gas = gradient_accumulation_steps
    step = start_step
    names = list(dataset_names)
    pending = torch.zeros(len(names), dtype=torch.float64)  # per-dataset tokens since the last line
    nonfinite_total = nonfinite_run = 0
    saved_at = start_step
    engine.train()
    while step < max_steps:
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # this step's rate: the scheduler moves on inside its last engine.step()
        batches = [collate(next(micro_batches)) for _ in range(gas)]
        totals = all_reduce_sum(
            torch.stack([objective.weight_totals(b) for b in batches]).sum(0).double() * once
        )
        sums: dict[str, float] = {}
        grad_norm = None
        skipped_before = getattr(engine, "skipped_steps", 0)
        dropped = False
        for i, batch in enumerate(batches):
            loss, metrics = objective(engine, batch, totals)
            engine.backward(loss * (gas * world))
            if i == gas - 1 and engine.zero_optimization_stage() == 0:
                grad_norm = grad_norm_before_step(engine)
                dropped = skip_nonfinite_step(engine, grad_norm)
            engine.step()
            if dropped and i == gas - 1:
                _clear_overflow(engine)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            for k in ("num_tokens", "num_samples", "num_slots"):
                sums[k] = sums.get(k, 0.0) + float(batch[k]) * once
            text_only = float(batch["pixel_values"].numel() == 0)  # its vision pass ran on a blank tile
            sums["text_only_micro_batches"] = sums.get("text_only_micro_batches", 0.0) + text_only * once
        # the same on every rank: ZeRO-0 sees the averaged gradients, ZeRO 1-3 agree inside DeepSpeed
        nonfinite = getattr(engine, "skipped_steps", 0) > skipped_before
        objective.on_step_end(applied=not nonfinite)
        step += 1
        if nonfinite:
            nonfinite_total, nonfinite_run = nonfinite_total + 1, nonfinite_run + 1
            sources = [s for b in batches for s in b.get("sources", ())]
            log.warning(
                "rank %d: step %d had a non-finite loss or gradient norm (loss %s, grad_norm %s): skipped, no "
                "weight changed; its samples here: %s",
                rank,
                step,
                sums.get("loss"),
                grad_norm,
                ", ".join(map(str, sources[:8])) or "(not recorded)",
            )
        else:
            nonfinite_run = 0
        keys = sorted(sums)
        asked = float(stop is not None and stop.requested(watch_file=rank == 0))
        head = [sums[k] for k in keys] + [float(skipped_count()) * once, asked]
        reduced = all_reduce_sum(
            torch.cat([torch.tensor(head, dtype=torch.float64), dataset_tokens(batches, names) * once])
        )
        stopping = reduced[len(keys) + 1].item() > 0 and step < max_steps  # one rank's request stops all
        pending += reduced[len(keys) + 2 :]
        elapsed = time.perf_counter() - t0
        if step % log_every == 0 or step == max_steps:
            record: dict[str, Any] = {"step": step}
            record.update(
                {
                    k: reduced[i].item()
                    for i, k in enumerate(keys)
                    if k not in ("num_tokens", "num_samples", "num_slots")
                }
            )
            stats = {k: reduced[i].item() for i, k in enumerate(keys)}
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            record.update(
                lr=lr,
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                tokens=int(stats["num_tokens"]),
                tokens_per_s=stats["num_tokens"] / elapsed,
                samples_per_s=stats["num_samples"] / elapsed,
                fill=stats["num_tokens"] / max(1.0, stats["num_slots"]),
                skipped=int(reduced[len(keys)].item()),
                samples=int(stats["num_samples"]),
                nonfinite_steps=nonfinite_total,
                step_time_s=elapsed,
            )
            record.update({f"tokens/{name}": int(pending[i].item()) for i, name in enumerate(names)})
            pending.zero_()
            logger.log(record, advance=log_every if step % log_every == 0 else step % log_every)
        if evaluate is not None and eval_every and step % eval_every == 0 and step < max_steps:
            results = evaluate(step)
            logger.log(
                {"step": step, **{f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}},
                advance=0,
            )
        if nonfinite_run >= max_nonfinite_steps:
            raise NonFiniteError(
                f"{nonfinite_run} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient "
                f"norm and were skipped; the weights are those of step {step - nonfinite_run}; last complete "
                + (
                    f"checkpoint: step {saved_at} in {out_dir / 'checkpoints'}"
                    if saved_at
                    else "checkpoint: none"
                )
                + ". Check the samples logged above, the learning rate and the precision"
            )
        if (save_every and step % save_every == 0) or step == max_steps or stopping:
            shared, per_rank = checkpoint_state()
            save_checkpoint(engine, out_dir, step, {"step": step, **shared}, per_rank, keep_last)
            saved_at = step
        if stopping:
            if rank == 0 or stop.received is not None:
                log.info(
                    "rank %d: stop (%s): saved a complete checkpoint at step %d", rank, stop.reason(), step
                )
            return step
    return step
