"""`vlmtune mpo` end to end on the tiny model: two-rank ZeRO-3, and the reward shift across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.e2e import LORA, ZERO3, base_overrides, run_sft


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    from vlmtune.data.synthetic import generate_pair_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("mpo_e2e")
    meta = generate_pair_dataset(root / "data", num_train=48, num_eval=8, seed=2)
    ckpt = build_tiny_checkpoint(root / "tiny")
    return root, Path(meta), Path(ckpt)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


MPO_KEYS = {
    "loss",
    "loss/preference",
    "loss/quality",
    "loss/generation",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
    "bco/delta",
}


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_two_rank_zero3_mpo_run_logs_every_term(pair_data, variant):
    """Full fine-tune (frozen-copy reference, sharded) and LoRA (the policy with adapters off)."""
    root, meta, ckpt = pair_data
    out = root / f"zero3_{variant}"
    extra = {"train.max_steps": 3, "train.save_every": 3, **ZERO3, **(LORA if variant == "lora" else {})}
    run_sft(
        base_overrides(ckpt, meta, out, **extra),
        nproc=2,
        timeout=900,
        module="vlmtune.train.commands.mpo",
    )
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert MPO_KEYS <= set(metrics[0])
    assert metrics[0]["bco/delta"] == 0.0  # no past rewards before the first step
    assert metrics[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert metrics[2]["bco/delta"] != 0.0
    # the loss is the paper's weighted sum of its logged terms
    for m in metrics:
        assert m["loss"] == pytest.approx(
            0.8 * m["loss/preference"] + 0.2 * m["loss/quality"] + m["loss/generation"], rel=1e-5
        )


def test_reward_shift_and_weights_survive_resume(pair_data):
    root, meta, ckpt = pair_data
    constant_lr = {"optim.min_lr_ratio": 1.0, "train.save_every": 2}
    ref, resumed = root / "ref", root / "resumed"
    run_sft(
        base_overrides(ckpt, meta, ref, **{"train.max_steps": 4, **constant_lr}),
        module="vlmtune.train.commands.mpo",
    )
    run_sft(
        base_overrides(ckpt, meta, resumed, **{"train.max_steps": 2, **constant_lr}),
        module="vlmtune.train.commands.mpo",
    )
    run_sft(
        base_overrides(ckpt, meta, resumed, **{"train.max_steps": 4, **constant_lr}),
        module="vlmtune.train.commands.mpo",
    )
    a, b = _metrics(ref), _metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["bco/delta"] == pytest.approx(x["bco/delta"], rel=1e-6, abs=1e-9)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert a[3]["bco/delta"] != 0.0
    wa, wb = (
        load_file(str(ref / "hf" / "model.safetensors")),
        load_file(str(resumed / "hf" / "model.safetensors")),
    )
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


def test_precomputed_reference_run_equals_live_reference_run(pair_data):
    """reference=precomputed (log-probs cached before step 1) trains exactly like the live frozen copy."""
    root, meta, ckpt = pair_data
    plain = meta.parent / "meta_pairs_noaug.json"
    entries = json.loads(meta.read_text())
    plain.write_text(json.dumps({k: {**v, "data_augment": False} for k, v in entries.items()}))
    live, cached = root / "live", root / "cached"
    run_sft(base_overrides(ckpt, plain, live, **{"train.max_steps": 3}), module="vlmtune.train.commands.mpo")
    run_sft(
        base_overrides(ckpt, plain, cached, **{"train.max_steps": 3, "reference": "precomputed"}),
        module="vlmtune.train.commands.mpo",
    )
    assert (cached / "reference_logps.pt").exists()
    for a, b in zip(_metrics(live), _metrics(cached)):
        for key in ("loss", "loss/preference", "loss/quality", "rewards/chosen", "bco/delta"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    # augmentation on: refused at start, not hours in
    with pytest.raises(AssertionError, match="data_augment"):
        run_sft(
            base_overrides(
                ckpt, meta, root / "refused", **{"train.max_steps": 1, "reference": "precomputed"}
            ),
            module="vlmtune.train.commands.mpo",
        )
