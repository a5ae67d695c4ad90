"""A step whose loss is NaN changes no weight (ZeRO-0, where DeepSpeed would apply it, and ZeRO-2, where it
skips it itself), is counted in metrics.jsonl, and the run goes on; several in a row stop the run."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.runtime.test_schedule import engine_with_schedule, micro_batches, one_rank  # noqa: F401


class PoisonedObjective:
    """The SFT objective, with the loss of the chosen optimizer steps (1-based) multiplied by NaN."""

    def __init__(self, poisoned: set[int]) -> None:
        from vlmtune.train.objectives.sft import SFTObjective

        self.inner, self.poisoned, self.calls = SFTObjective("token"), poisoned, 0
        self.applied: list[bool] = []

    def weight_totals(self, batch):
        return self.inner.weight_totals(batch)

    def __call__(self, model, batch, totals):
        self.calls += 1
        loss, metrics = self.inner(model, batch, totals)
        if self.calls in self.poisoned:
            loss = loss * float("nan")
        return loss, metrics

    def on_step_end(self, applied: bool = True) -> None:
        self.applied.append(applied)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _run(tmp_path, zero_stage: int, poisoned: set[int], steps: int, max_nonfinite: int = 3):
    from vlmtune.data.collate import collate_packed
    from vlmtune.train.runtime.config import WandbConfig
    from vlmtune.train.runtime.loop import train_loop
    from vlmtune.train.runtime.metrics import MetricsLogger

    engine, model, _ = engine_with_schedule(zero_stage, gas=1)
    snapshots: list[dict[str, torch.Tensor]] = []

    def batches():  # the weights as each step begins: snapshots[k] = after step k
        for mb in micro_batches(model, steps):
            snapshots.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
            yield mb

    objective = PoisonedObjective(poisoned)
    logger = MetricsLogger(
        tmp_path, enabled=True, total_steps=steps, start_step=0, wandb_cfg=WandbConfig(), run_config={}
    )
    try:
        train_loop(
            engine,
            objective,
            batches(),
            lambda mb: collate_packed(mb, "token"),
            start_step=0,
            max_steps=steps,
            gradient_accumulation_steps=1,
            out_dir=tmp_path,
            logger=logger,
            save_every=10**9,
            max_nonfinite_steps=max_nonfinite,
        )
        snapshots.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
    finally:
        logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return snapshots, records, objective


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nan_step_changes_nothing_is_counted_and_training_goes_on(one_rank, tmp_path, zero_stage):  # noqa: F811
    snapshots, records, objective = _run(tmp_path, zero_stage, poisoned={3}, steps=5)
    same = lambda a, b: all(torch.equal(a[n], b[n]) for n in a)  # noqa: E731
    assert same(snapshots[2], snapshots[3])  # step 3: no weight moved
    assert not same(snapshots[3], snapshots[4]) and not same(snapshots[1], snapshots[2])  # the others did
    assert all(torch.isfinite(t).all() for t in snapshots[-1].values())
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert objective.applied == [True, True, False, True, True]  # a skipped step's state is not folded in


def test_nan_steps_in_a_row_stop_the_run_naming_the_checkpoint(one_rank, tmp_path):  # noqa: F811
    from vlmtune.train.runtime.loop import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row \(up to step 3\).*those of step 1"):
        _run(tmp_path, 0, poisoned={2, 3, 4}, steps=6, max_nonfinite=2)
