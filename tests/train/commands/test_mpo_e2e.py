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


def _metric_lines_up_to(out: Path, step: int) -> list[bytes]:
    """The raw metrics.jsonl lines of the training steps 1..step."""
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    return [line for line in lines if "loss" in (r := json.loads(line)) and r["step"] <= step]


def _running_reward_means(metrics: list[dict]) -> list[float]:
    """For each step, the mean of all rewards logged at the steps before it (0 before any). A line's
    rewards/chosen and rewards/rejected are sums over the step's pairs (all ranks) divided by their
    number, which the line gives as samples_per_s * step_time_s (a pair is one sample)."""
    total = count = 0
    means = []
    for m in metrics:
        means.append(total / count if count else 0.0)
        pairs = round(m["samples_per_s"] * m["step_time_s"])
        assert pairs > 0 and m["samples_per_s"] * m["step_time_s"] == pytest.approx(pairs, abs=1e-6)
        total += (m["rewards/chosen"] + m["rewards/rejected"]) * pairs
        count += 2 * pairs
    return means


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
    # packs of a few pairs, as many as fit: the ranks' pair counts differ from step to step and rank
    # to rank, so that a delta averaged per rank or per step differs from the mean over every reward
    extra.update({"packing.max_tokens": 400, "data.max_length": 400})
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
    # delta is the mean of every reward (chosen and rejected, both ranks) of the steps before
    assert [m["bco/delta"] for m in metrics] == pytest.approx(_running_reward_means(metrics), rel=1e-5)
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
    [states] = (resumed / "checkpoints" / "step_00000002").glob("*model_states.pt")
    shift = torch.load(states, weights_only=False)["vlmtune"]["objective"]["reward_shift"]
    saved_delta = shift["total"] / shift["count"]
    assert saved_delta != 0.0  # steps 1-2 rewards (step 2's are not zero)
    logged_before = _metric_lines_up_to(resumed, 2)
    assert len(logged_before) == 2
    proc = run_sft(
        base_overrides(ckpt, meta, resumed, **{"train.max_steps": 4, **constant_lr}),
        module="vlmtune.train.commands.mpo",
    )
    # the rerun really resumed (one from step 0 would end the same: training is deterministic), kept
    # the lines of the steps it did not redo byte for byte, and its first step used the saved delta
    assert "resumed from step_00000002 at step 2" in proc.stdout + proc.stderr
    assert _metric_lines_up_to(resumed, 2) == logged_before
    assert _metrics(resumed)[2]["bco/delta"] == pytest.approx(saved_delta, rel=1e-12)
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
    assert (cached / "reference_logps.json").exists()
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


@pytest.mark.parametrize("preference, reduction, zero_stage", [("sigmoid", "token", 2), ("ipo", "square", 3)])
def test_mpo_loss_invariance_two_ranks(tmp_path, preference, reduction, zero_stage):
    """The real loop on 2 ranks x 2 accumulation steps, pairs split unevenly (a text-only micro-batch on
    rank 1), gives the one-process gradient of the MPO loss of all pairs at once, and logs its norm."""
    from tests.train.helpers import check_one_step_against_reference

    record = check_one_step_against_reference(
        tmp_path, "dist_mpo_grad_check.py", preference, reduction, zero_stage
    )
    assert record["bco/delta"] == pytest.approx(0.15)  # the shift both sides were given
    assert record["rewards/chosen"] != 0.0 and record["loss/preference"] > 0
