"""ZeRO-3 builds the model partitioned (zero.Init): no rank ever holds the whole model, the loaded
weights are the checkpoint's, and a seeded random init is reproducible (the MPO reference rebuild)."""

from __future__ import annotations

import json
import subprocess

import torch

from tests.train.e2e import REPO, sft_env, torchrun
from vlmtune.train.model.build import ModelConfig, build_model
from vlmtune.train.runtime.engine import param_groups


def test_zero3_builds_the_model_partitioned_with_the_checkpoints_weights(tiny_model_dir, tmp_path):
    cmd = torchrun(REPO / "tests" / "train" / "zero_init_check.py", tiny_model_dir, tmp_path)
    proc = subprocess.run(cmd, cwd=REPO, env=sft_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = dict(build_model(ModelConfig(pretrained=str(tiny_model_dir))).named_parameters())
    total = sum(t.numel() for t in expected.values())
    # weight decay splits the partitioned parameters by their full shapes, as the unpartitioned ones
    built = build_model(ModelConfig(pretrained=str(tiny_model_dir)))
    names = {id(p): n for n, p in built.named_parameters()}
    no_decay = sorted(names[id(p)] for p in param_groups(built, 0.1)[1]["params"])
    assert any(n.endswith("norm.weight") for n in no_decay) and not any(
        n.endswith("proj.weight") for n in no_decay
    )
    for r in ranks:
        assert r["partitioned"] and r["world"] == 2
        assert r["no_decay"] == no_decay
        assert r["local_numel"] == 0  # nothing materialised in full on this rank
        assert total / 2 <= r["held_numel"] <= total / 2 + 64 * len(expected)  # its half, plus padding
        assert r["counts"]["total"] == total  # counted at full size, not this rank's share
        assert r["random_rebuild_max_diff"] == 0.0 and r["random_std"] > 0  # seeded rebuild = same weights
    weights = torch.load(tmp_path / "gathered.pt")
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor.detach()), name
