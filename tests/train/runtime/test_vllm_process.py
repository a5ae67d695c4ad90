"""vllm_process: a vLLM worker's engine processes never outlive it (they were found orphaned, holding GBs)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vlmtune.train.runtime.eval_engines import vllm_process

# a stand-in worker: starts a grandchild (vLLM's EngineCore) that would run forever, prints its pid
WORKER = (
    "import subprocess, sys; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print(child.pid, flush=True); " + "{end}"
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("end", ["pass", "import time; time.sleep(600)"])  # exits / is abandoned
def test_the_whole_group_is_killed(end):
    cmd = [sys.executable, "-c", WORKER.format(end=end)]
    with vllm_process(cmd, stdout=subprocess.PIPE, text=True) as proc:
        grandchild = int(proc.stdout.readline())
        assert alive(grandchild)
        if end == "pass":
            proc.wait()
            assert alive(grandchild)  # what a plain subprocess leaves behind
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)
    assert proc.returncode is not None
