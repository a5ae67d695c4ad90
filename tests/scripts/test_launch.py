"""A real two-"node" launch on one machine: two torchrun agents (one per node) meet over loopback
through scripts/launch/torchrun.sh, and their run equals the same world size started as one node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.train.e2e import REPO, base_overrides, free_port, run_sft, sft_env


def test_two_node_torchrun_launch_equals_one_node_run(tmp_path):
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    meta = Path(generate_sft_dataset(tmp_path / "data", num_train=32, num_eval=4, seed=3))
    ckpt = build_tiny_checkpoint(tmp_path / "tiny")
    extra = {"train.max_steps": 3, "train.save_every": 3, "deepspeed": "zero2"}
    two_nodes = tmp_path / "two_nodes"
    overrides = [str(o) for o in base_overrides(ckpt, meta, two_nodes, **extra)]
    port = free_port()
    procs = []
    for node in (0, 1):
        env = sft_env()
        env.update(
            NNODES="2", NODE_RANK=str(node), GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        procs.append(
            subprocess.Popen(
                ["bash", "scripts/launch/torchrun.sh", "sft", *overrides],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for node, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} failed:\n{out[-4000:]}"

    # both nodes took part: a world of 2, each rank's optimizer shard and state written by its own node
    config_ranks = sorted(
        p.name for p in (two_nodes / "checkpoints" / "step_00000003").glob("*optim_states.pt")
    )
    assert len(config_ranks) == 2
    assert (two_nodes / "checkpoints" / "step_00000003" / "vlmtune_rank00001.json").exists()
    # rank 0 alone logs metrics (one line per step, not one per node)
    steps = [json.loads(line)["step"] for line in (two_nodes / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    one_node = tmp_path / "one_node"
    run_sft(base_overrides(ckpt, meta, one_node, **extra), nproc=2)
    a = load_file(str(two_nodes / "hf" / "model.safetensors"))
    b = load_file(str(one_node / "hf" / "model.safetensors"))
    initial = load_file(str(ckpt / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(a[n], initial[n]) for n in a)  # the steps changed the weights
