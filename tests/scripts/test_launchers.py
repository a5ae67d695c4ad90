"""scripts/launch/slurm.sbatch and deepspeed.sh run as a cluster would run them, with stand-ins for the
cluster's own tools on PATH (srun, scontrol, deepspeed): what they start must be a real vlmtune run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.train.e2e import REPO, base_overrides, free_port, sft_env, wait_for_steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("launchers")
    meta = Path(generate_sft_dataset(root / "data", num_train=32, num_eval=4, seed=6))
    return meta, Path(build_tiny_checkpoint(root / "tiny"))


def _stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_slurm_warning_signal_saves_stops_and_requeues(data, tmp_path):
    meta, ckpt = data
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    _stub(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n')
    _stub(
        bin_dir,
        "scontrol",
        f'if [[ $1 == show ]]; then echo 127.0.0.1; else echo "$@" >> {calls}; fi\n',
    )
    env = sft_env()
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-0",
        SLURM_NNODES="1",
        SLURM_GPUS_PER_NODE="2",
        MASTER_PORT=str(free_port()),
        VLMTUNE_STOP_FILE=str(tmp_path / "stop"),
    )
    out = tmp_path / "run"
    overrides = [str(o) for o in base_overrides(ckpt, meta, out, **{"train.max_steps": 30})]
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(
        ["bash", "scripts/launch/slurm.sbatch", "sft", *overrides],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_steps(out, proc, 2)
        os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@120 does: to the batch shell only
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text[-4000:]
    k = int((out / "checkpoints" / "complete").read_text().strip().removeprefix("step_"))
    assert 2 <= k < 30 and not (out / "hf").exists()
    assert calls.read_text().split() == ["requeue", "4242"]
    assert not (tmp_path / "stop").exists()  # removed for the requeued attempt
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, k + 1))


def test_deepspeed_launcher_starts_the_vlmtune_module(data, tmp_path):
    """deepspeed.sh hands its hostfile and the job's module to DeepSpeed's launcher; the stand-in runs that
    module on this machine: a wrong module path (it was train.sft before the layout moved) fails here."""
    meta, ckpt = data
    bin_dir = tmp_path / "bin"
    _stub(
        bin_dir,
        "deepspeed",
        'while [[ $1 != --module ]]; do shift; done\nshift\nmodule=$1\nshift\nexec python -m "$module" "$@"\n',
    )
    env = sft_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    out = tmp_path / "run"
    overrides = [
        str(o) for o in base_overrides(ckpt, meta, out, **{"train.max_steps": 1, "train.export": False})
    ]
    proc = subprocess.run(
        ["bash", "scripts/launch/deepspeed.sh", "sft", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
