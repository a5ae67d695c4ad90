"""Preemption: SIGTERM to one rank (or the stop file SLURM's warning writes) makes every rank finish its
step, save a complete checkpoint and exit 0; the rerun resumes there and ends as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.e2e import REPO, base_overrides, run_sft, sft_command, sft_env, wait_for_steps

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("preemption")
    meta = Path(generate_sft_dataset(root / "data", num_train=64, num_eval=4, seed=4))
    return root, meta, Path(build_tiny_checkpoint(root / "tiny"))


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _start(overrides: list[str], nproc: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        sft_command(overrides, nproc), cwd=REPO, env=sft_env(), stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def _resume_equals_uninterrupted(data, stopped: Path, log: str, reference: Path) -> None:
    _, meta, ckpt = data
    assert "checkpoint complete; run the same command again to resume" in log
    tag = (stopped / "checkpoints" / "complete").read_text().strip()
    k = int(tag.removeprefix("step_"))
    assert 2 <= k < STEPS and not (stopped / "hf").exists()  # stopped mid-run, nothing exported
    assert sorted(_losses(stopped)) == list(range(1, k + 1))
    proc = run_sft(base_overrides(ckpt, meta, stopped, **{"train.max_steps": STEPS}), nproc=2)
    assert f"resumed from {tag} at step {k}" in proc.stdout + proc.stderr
    expected = _losses(reference)
    assert _losses(stopped) == pytest.approx(expected, rel=1e-5)
    a, b = (
        load_file(str(stopped / "hf" / "model.safetensors")),
        load_file(str(reference / "hf" / "model.safetensors")),
    )
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(data) -> Path:
    root, meta, ckpt = data
    out = root / "uninterrupted"
    run_sft(base_overrides(ckpt, meta, out, **{"train.max_steps": STEPS}), nproc=2)
    return out


def test_sigterm_to_one_rank_saves_on_every_rank_exits_0_and_resumes_exactly(data, uninterrupted, tmp_path):
    import psutil

    root, meta, ckpt = data
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = _start(base_overrides(ckpt, meta, out, **{"train.max_steps": STEPS}), 2, log)
    try:
        wait_for_steps(out, proc, 2)
        workers = sorted(psutil.Process(proc.pid).children(), key=lambda p: p.pid)
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGTERM)  # one rank only
        logged = len((out / "metrics.jsonl").read_text().splitlines())  # steps done when it landed (or fewer)
        code = proc.wait(timeout=240)  # a hang guard, not a timing
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert "stopped at step" in text and "SIGTERM" in text
    k = int((out / "checkpoints" / "complete").read_text().strip().removeprefix("step_"))
    assert k <= logged + 2  # the step under way when the signal came, at most one more: not run to the end
    _resume_equals_uninterrupted(data, out, text, uninterrupted)


# slow: tests/scripts/test_launchers.py runs the same stop file through slurm.sbatch (save, stop, requeue)
@pytest.mark.slow
def test_the_stop_file_stops_the_run_and_says_so_for_the_launcher(data, uninterrupted, tmp_path):
    """What scripts/launch/slurm.sbatch does on SLURM's warning signal: it writes the stop file, rank 0
    sees it at a step boundary, every rank stops; the file then says the run stopped early (the launcher
    requeues only then)."""
    root, meta, ckpt = data
    out, stop_file = tmp_path / "run", tmp_path / "stop"
    log = tmp_path / "log.txt"
    overrides = base_overrides(ckpt, meta, out, **{"train.max_steps": STEPS, "train.stop_file": stop_file})
    proc = _start(overrides, 2, log)
    try:
        wait_for_steps(out, proc, 2)
        stop_file.touch()
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text[-4000:]
    k = int((out / "checkpoints" / "complete").read_text().strip().removeprefix("step_"))
    assert stop_file.read_text() == f"stopped at step {k}\n"
    _resume_equals_uninterrupted(data, out, text, uninterrupted)
