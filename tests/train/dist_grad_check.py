"""Run by test_loss_invariance_two_ranks under torchrun (2 ranks, gloo): one optimizer step of the real
loop over a DeepSpeed engine, samples split unevenly across 2 ranks x 2 accumulation steps (rank 1's
first micro-batch has no image at all, the LM head chunked), versus the gradient of the same samples as
one packed row in one process through the full logits. SGD(lr=1) makes the weight change equal to minus
the gradient, so comparing weights compares gradients. The loop's metrics.jsonl (rank 0) is written to the output dir, for the test to
compare its ``grad_norm`` with the reference gradient's norm (no clipping)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.train.helpers import make_sample, tiny_model  # noqa: E402
from vlmtune.data.collate import collate_packed  # noqa: E402
from vlmtune.train.model.lm_head import HEAD_CHUNK_ATTR  # noqa: E402
from vlmtune.train.objectives.sft import SFTObjective  # noqa: E402
from vlmtune.train.runtime.config import WandbConfig  # noqa: E402
from vlmtune.train.runtime.engine import init_distributed, shutdown_distributed  # noqa: E402
from vlmtune.train.runtime.loop import train_loop  # noqa: E402
from vlmtune.train.runtime.metrics import MetricsLogger  # noqa: E402


def one_step_versus_reference(
    out: Path,
    model: torch.nn.Module,
    objective: Any,
    reference_objective: Any,
    items: list[dict],
    layout: dict[int, list[list[dict]]],
    collate: Callable[[list[dict]], dict],
    zero_stage: int,
    sequence_parallel: int = 1,
) -> None:
    """The gradient of all ``items`` as one batch in this process (``reference_objective``), then one
    step of the real loop over ``layout[rank]`` (2 micro-batches) with SGD(lr=1); rank 0 writes
    result.json (weight change vs reference gradient, its norm, whether ZeRO-3 partitioned every
    parameter) and the loop's metrics.jsonl into ``out``. ``sequence_parallel`` > 1: the run's model and
    engine split sequences over groups of that many ranks (train/model/sequence_parallel.py), whose
    ranks must be given the same micro-batches."""
    import deepspeed
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = collate(items)
    chunk = getattr(model, HEAD_CHUNK_ATTR)
    setattr(
        model, HEAD_CHUNK_ATTR, 0
    )  # the reference through the full logits, the run through the chunked head
    loss, _ = reference_objective(model, reference, reference_objective.weight_totals(reference))
    loss.backward()
    setattr(model, HEAD_CHUNK_ATTR, chunk)
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    if sequence_parallel > 1:
        from vlmtune.train.model.sequence_parallel import enable_sequence_parallel

        enable_sequence_parallel(model, sequence_parallel)
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:  # partition every parameter, however small (the tiny model's all are)
        zero["stage3_param_persistence_threshold"] = 0
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 2 * world,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config
    )
    partitioned = all(p.numel() == 0 for p in engine.module.parameters()) if zero_stage == 3 else None
    logger = MetricsLogger(
        out, enabled=rank == 0, total_steps=1, start_step=0, wandb_cfg=WandbConfig(), run_config={}
    )
    train_loop(
        engine,
        objective,
        iter(layout[rank]),
        collate,
        start_step=0,
        max_steps=1,
        gradient_accumulation_steps=2,
        out_dir=out,
        logger=logger,
        save_every=10**9,
    )
    logger.close()
    if zero_stage == 3:
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            after = {n: p.detach().clone() for n, p in params.items()}
    else:
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    worst = max(((initial[n] - after[n]) - ref_grads[n]).abs().max().item() for n in ref_grads)
    scale = max(ref_grads[n].abs().max().item() for n in ref_grads)
    norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in ref_grads.values()])).item()
    if rank == 0:
        result = {"max_abs_diff": worst, "max_grad": scale, "ref_grad_norm": norm, "partitioned": partitioned}
        (out / "result.json").write_text(json.dumps(result))
    del engine


def main(out: Path, reduction: str, zero_stage: int) -> None:
    init_distributed()
    # eval: no dropout, so both sides compute the same function; the run's LM head 8 rows at a time
    model = tiny_model(seed=0, head_chunk_size=8).eval()
    shapes = [
        (1, 2, 5, 4),
        (0, 0, 9, 6),
        (2, 1, 3, 1),
        (1, 1, 7, 3),
        (1, 3, 2, 9),
        (0, 0, 4, 2),
        (1, 1, 6, 5),
        (2, 2, 3, 3),
        (0, 0, 5, 7),
    ]
    samples = [make_sample(model, *s, seed=i) for i, s in enumerate(shapes)]
    # uneven on purpose; rank 1's first micro-batch is text only (two samples, no image) while rank 0's
    # has images: under ZeRO-3 its vision pass on a blank tile must gather what rank 0's gathers
    layout = {0: [samples[0:3], samples[3:4]], 1: [[samples[5], samples[8]], samples[4:5] + samples[6:8]]}
    assert all(s["num_tiles"] == 0 for s in layout[1][0]) and any(s["num_tiles"] for s in layout[0][0])
    one_step_versus_reference(
        out,
        model,
        SFTObjective(reduction),
        SFTObjective(reduction),
        samples,
        layout,
        lambda mb: collate_packed(mb, reduction),
        zero_stage,
    )
    del model
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
