"""The learning-rate schedule through a real DeepSpeed engine (one gloo rank): the rate each optimizer step
uses follows the warm-up, the cosine decay and the floor written out by hand below, and the ``lr`` the
training loop logs in metrics.jsonl for a step is the rate that step used.

Schedule (train/runtime/engine.py create_engine): lr 4e-3, max_steps 8, warmup_ratio 0.5 (4 warm-up
steps), min_lr_ratio 0.25 (floor 1e-3). Step k (1-based) uses the multiplier of scheduler step k - 1:
warm-up k/4 for k = 1..4, then 0.25 + 0.75 * (1 + cos(pi * (k - 5) / 4)) / 2 for k = 5..8, the floor
from k = 9 on (a run longer than the schedule).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.train.helpers import make_sample, tiny_model, world_of_one

LR, FLOOR = 4e-3, 1e-3
HALF = math.sqrt(0.5)  # cos(pi / 4)
EXPECTED = [  # the rate of optimizer steps 1..10
    1e-3,  # warm-up: 1/4 of lr
    2e-3,
    3e-3,
    4e-3,  # warm-up done
    4e-3,  # cosine at progress 0
    1e-3 + 1.5e-3 * (1 + HALF),  # progress 1/4
    1e-3 + 1.5e-3,  # progress 1/2: halfway between lr and the floor
    1e-3 + 1.5e-3 * (1 - HALF),  # progress 3/4
    FLOOR,  # progress 1
    FLOOR,  # past the schedule's end: stays at the floor
]


@pytest.fixture(scope="module")
def one_rank():
    from vlmtune.train.runtime.engine import init_distributed

    with world_of_one():
        assert init_distributed() == (0, 1)
        yield


def engine_with_schedule(zero_stage: int, gas: int):
    """create_engine as the runner calls it, and what every optimizer step's update used: {step: [rate of
    each parameter group]}, read from the torch optimizer's param groups as its step() begins."""
    from vlmtune.train.runtime.config import DeepSpeedConfig, OptimConfig, TrainConfig
    from vlmtune.train.runtime.engine import build_ds_config, create_engine

    optim = OptimConfig(lr=LR, warmup_ratio=0.5, min_lr_ratio=0.25)
    train = TrainConfig(micro_batch_size=1, gradient_accumulation_steps=gas, precision="fp32")
    ds_config = build_ds_config(DeepSpeedConfig(zero_stage=zero_stage), train, optim, world_size=1)
    model = tiny_model()
    engine, optimizer, _ = create_engine(model, ds_config, optim, max_steps=8)
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer):  # ZeRO wraps the torch optimizer
        inner = inner.optimizer
    used: dict[int, list[float]] = {}  # optimizer step (1-based) -> the rate of each parameter group

    def record(opt: torch.optim.Optimizer, *_: object) -> None:  # ZeRO steps its groups one at a time
        used.setdefault(engine.global_steps + 1, []).extend(g["lr"] for g in opt.param_groups)

    inner.register_step_pre_hook(record)
    return engine, model, used


def micro_batches(model, n: int):
    """One sample a micro-batch, every other one with an image."""
    for i in range(n):
        yield [make_sample(model, i % 2, 1, prompt_len=4, answer_len=3, seed=i)]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_each_step_uses_the_hand_computed_rate(one_rank, zero_stage):
    from vlmtune.data.collate import collate_packed
    from vlmtune.train.objectives.sft import SFTObjective

    engine, model, used = engine_with_schedule(zero_stage, gas=1)
    objective = SFTObjective("token")
    for samples in micro_batches(model, len(EXPECTED)):
        batch = collate_packed(samples, "token")
        loss, _ = objective(engine, batch, objective.weight_totals(batch))
        engine.backward(loss)
        engine.step()
    assert sorted(used) == list(range(1, len(EXPECTED) + 1))
    for step, expected in enumerate(EXPECTED, start=1):
        assert len(used[step]) == 2  # decayed and not decayed parameters: one schedule
        assert used[step] == pytest.approx([expected] * 2, rel=1e-12, abs=0), f"step {step}"


def test_loop_logs_the_rate_the_step_used(one_rank, tmp_path):
    """train_loop over 2 accumulation micro-batches a step: the scheduler moves once per optimizer step, and
    metrics.jsonl's ``lr`` for step k is the rate step k's update used (not the next step's)."""
    from vlmtune.data.collate import collate_packed
    from vlmtune.train.objectives.sft import SFTObjective
    from vlmtune.train.runtime.config import WandbConfig
    from vlmtune.train.runtime.loop import train_loop
    from vlmtune.train.runtime.metrics import MetricsLogger

    engine, model, used = engine_with_schedule(0, gas=2)
    steps = len(EXPECTED)
    logger = MetricsLogger(
        tmp_path, enabled=True, total_steps=steps, start_step=0, wandb_cfg=WandbConfig(), run_config={}
    )
    last = train_loop(
        engine,
        SFTObjective("token"),
        micro_batches(model, 2 * steps),
        lambda mb: collate_packed(mb, "token"),
        start_step=0,
        max_steps=steps,
        gradient_accumulation_steps=2,
        out_dir=tmp_path,
        logger=logger,
        save_every=10**9,
    )
    logger.close()
    assert last == steps
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert sorted(used) == list(range(1, steps + 1))  # one optimizer step per 2 micro-batches
    assert [used[k][0] for k in sorted(used)] == pytest.approx(EXPECTED, rel=1e-12, abs=0)
    assert [r["lr"] for r in records] == pytest.approx(EXPECTED, rel=1e-12, abs=0)
    assert all(r["lr"] == used[r["step"]][0] for r in records)  # the logged rate is the one used
