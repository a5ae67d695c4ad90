"""Run by test_loss_invariance_two_ranks under torchrun (2 ranks, gloo): one optimizer step of the real
loop over a DeepSpeed engine, samples split unevenly across 2 ranks x 2 accumulation steps, versus the
gradient of the same samples as one packed row in one process. SGD(lr=1) makes the weight change
equal to minus the gradient, so comparing weights compares gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.train.helpers import make_sample, tiny_model  # noqa: E402
from vlmtune.data.collate import collate_packed  # noqa: E402
from vlmtune.train.objectives.sft import SFTObjective  # noqa: E402
from vlmtune.train.runtime.engine import init_distributed, shutdown_distributed  # noqa: E402
from vlmtune.train.runtime.loop import train_loop  # noqa: E402
from vlmtune.train.runtime.metrics import MetricsLogger  # noqa: E402


def main(out: Path, reduction: str, zero_stage: int) -> None:
    import deepspeed

    rank, world = init_distributed()
    model = tiny_model(seed=0).eval()  # eval: no dropout, so both sides compute the same function
    shapes = [
        (1, 2, 5, 4),
        (0, 0, 9, 6),
        (2, 1, 3, 1),
        (1, 1, 7, 3),
        (1, 3, 2, 9),
        (0, 0, 4, 2),
        (1, 1, 6, 5),
        (2, 2, 3, 3),
    ]
    samples = [make_sample(model, *s, seed=i) for i, s in enumerate(shapes)]
    layout = {0: [samples[0:3], samples[3:4]], 1: [samples[4:5], samples[5:8]]}  # uneven on purpose

    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    # reference: every sample in one packed row, one process, plain autograd
    reference = collate_packed(samples, reduction)
    objective = SFTObjective(reduction)
    loss, _ = objective(model, reference, objective.weight_totals(reference))
    loss.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 2 * world,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config
    )
    train_loop(
        engine,
        objective,
        iter(layout[rank]),
        lambda mb: collate_packed(mb, reduction),
        start_step=0,
        max_steps=1,
        gradient_accumulation_steps=2,
        out_dir=out,
        logger=MetricsLogger(out, enabled=False, total_steps=1, start_step=0, wandb_cfg=None, run_config={}),
        save_every=10**9,
    )
    if zero_stage == 3:
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            after = {n: p.detach().clone() for n, p in params.items()}
    else:
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    worst = max(((initial[n] - after[n]) - ref_grads[n]).abs().max().item() for n in ref_grads)
    scale = max(ref_grads[n].abs().max().item() for n in ref_grads)
    if rank == 0:
        (out / "result.json").write_text(json.dumps({"max_abs_diff": worst, "max_grad": scale}))
    del engine, model, objective
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
