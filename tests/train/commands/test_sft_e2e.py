"""End to end on the tiny model: resume after SIGKILL, two-rank ZeRO-3 with a text-only rank, export."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.e2e import LORA, REPO, ZERO3, base_overrides, run_sft, sft_command, sft_env


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("sft_e2e")
    meta = generate_sft_dataset(root / "data", num_train=64, num_eval=16, seed=1)
    ckpt = build_tiny_checkpoint(root / "tiny")
    return root, Path(meta), Path(ckpt)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """The run's final output: the HF model, or the peft adapter file of a LoRA run."""
    adapter = out / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else out / "hf" / "model.safetensors"))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_resume_after_sigkill_equals_uninterrupted_run(small_data, variant):
    root, meta, ckpt = small_data
    steps = 10
    extra = {"train.max_steps": steps, "train.save_every": 2, **(LORA if variant == "lora" else {})}
    ref = root / f"ref_{variant}"
    run_sft(base_overrides(ckpt, meta, ref, **extra))

    killed = root / f"killed_{variant}"
    cmd = sft_command(base_overrides(ckpt, meta, killed, **extra))
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=sft_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = killed / "checkpoints" / "complete"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "step_00000004":
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "hf").exists() and not (killed / "adapter").exists(), (
        "the run finished before it could be killed; the test proved nothing"
    )
    resumed_from = int(pointer.read_text().strip().split("_")[1])
    assert 4 <= resumed_from < steps

    logged_before = _metric_lines_up_to(killed, resumed_from)
    assert len(logged_before) == resumed_from  # every step up to the checkpoint was logged once
    proc = run_sft(base_overrides(ckpt, meta, killed, **extra))
    # the rerun really resumed (a rerun from step 0 would also end with equal weights: training is
    # deterministic) and left the lines of the steps it did not redo untouched, byte for byte
    assert f"resumed from step_{resumed_from:08d} at step {resumed_from}" in proc.stdout + proc.stderr
    assert _metric_lines_up_to(killed, resumed_from) == logged_before
    a, b = _weights(ref), _weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    # the metrics file holds each step once, and the resumed steps match the reference losses
    ref_loss = {m["step"]: m["loss"] for m in _metrics(ref)}
    got = _metrics(killed)
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    for m in got:
        assert m["loss"] == pytest.approx(ref_loss[m["step"]], rel=1e-4)


def _metric_lines_up_to(out: Path, step: int) -> list[bytes]:
    """The raw metrics.jsonl lines of steps 1..step (a line cut by the kill is not one of them)."""
    lines = []
    for line in (out / "metrics.jsonl").read_bytes().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record and record["step"] <= step:
            lines.append(line)
    return lines


def _rank_split_dataset(root: Path, meta: Path, world: int = 2, n: int = 192) -> Path:
    """A dataset whose shuffled index gives rank 0 only image samples and rank 1 only pure text.

    Only epoch 0's index is arranged so (each epoch is shuffled with its own seed): ``n`` is more than
    3 steps draw (rank 1 packs up to its whole 16-sample buffer per step), so no rank reaches epoch 1.
    """
    from vlmtune.data.meta import build_index, load_meta

    records = [json.loads(line) for line in (meta.parent / "train.jsonl").read_text().splitlines()]
    images = [r for r in records if "image" in r]
    texts = [r for r in records if "image" not in r and "video" not in r]
    out = root / "rank_split"
    out.mkdir(exist_ok=True)
    if not (out / "images").exists():
        (out / "images").symlink_to(meta.parent / "images")
    (out / "train.jsonl").write_text("{}\n" * n)
    new_meta = out / "meta.json"
    new_meta.write_text(json.dumps({"split": {"root": ".", "annotation": "train.jsonl"}}))
    index = build_index(load_meta(new_meta), seed=0)  # the seed data.seed defaults to
    lines = [None] * n
    for position, (_, line) in enumerate(index):
        source = images if position % world == 0 else texts
        lines[line] = source[(position // world) % len(source)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return new_meta


def test_two_rank_zero3_with_a_text_only_rank_finishes_and_exports(small_data):
    """Rank 1 never sees an image: without the vision keep-alive ZeRO-3 would hang gathering the tower."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, meta, ckpt = small_data
    split_meta = _rank_split_dataset(root, meta)
    out = root / "zero3"
    proc = run_sft(
        base_overrides(ckpt, split_meta, out, **{"train.max_steps": 3, "train.save_every": 3, **ZERO3}),
        nproc=2,
        timeout=900,
    )
    assert "Traceback" not in proc.stderr
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # at every step one of the two ranks' micro-batches had no image tile (rank 1's: rank 0 has only
    # image samples), so the text-only forward really ran beside one with images
    assert [m["text_only_micro_batches"] for m in metrics] == [1, 1, 1]
    # the export loads through the public API, completely, with exactly the weights DeepSpeed
    # reconstructs from the ZeRO-3 shards of the last checkpoint
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(out / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the published -hf key layout (what transformers writes for a model loaded the ordinary way, and
    # what vLLM reads), not the doubled `language_model.model.model.*` of transformers' ZeRO-3 path
    published = set(load_file(str(ckpt / "model.safetensors")))
    assert set(load_file(str(out / "hf" / "model.safetensors"))) == published
    reference = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000003")
    loaded = model.state_dict()
    assert set(reference) <= set(loaded)
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor.to(loaded[name].dtype), msg=name)
    initial = InternVLForConditionalGeneration.from_pretrained(ckpt).state_dict()
    assert any(not torch.equal(initial[n], loaded[n]) for n in reference)  # training changed the weights
    # vLLM is not started here (~40 s): it reads exactly the published key set asserted above, and serves
    # an export in that layout as vlmtune answers in tests/train/commands/test_serving_parity.py


def test_two_rank_zero3_lora_exports_the_trained_adapters(small_data):
    """LoRA under ZeRO-3 with a text-only rank: the adapter directory holds exactly the trained tensors
    (as DeepSpeed reconstructs them from the shards) and loads over the base with peft."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    root, meta, ckpt = small_data
    split_meta = _rank_split_dataset(root, meta)
    out = root / "zero3_lora"
    extra = {"train.max_steps": 3, "train.save_every": 3, **ZERO3, **LORA}
    run_sft(base_overrides(ckpt, split_meta, out, **extra), nproc=2, timeout=900)
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    assert [m["text_only_micro_batches"] for m in _metrics(out)] == [1, 1, 1]  # rank 1's, every step
    saved = _weights(out)
    reference = get_fp32_state_dict_from_zero_checkpoint(
        str(out / "checkpoints"), tag="step_00000003", exclude_frozen_parameters=True
    )

    def peft_name(name: str) -> str:  # peft's file drops the adapter name and the copy's wrapper
        return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")

    assert {peft_name(k) for k in reference} == set(saved)
    for name, tensor in reference.items():
        torch.testing.assert_close(saved[peft_name(name)], tensor, msg=name)
    assert any(".lora_" in k and "vision_tower" in k for k in saved)
    assert any("multi_modal_projector" in k for k in saved)
    # the checkpoint is a peft adapter directory too, with the same tensors as the final output
    in_checkpoint = load_file(
        str(out / "checkpoints" / "step_00000003" / "adapter" / "adapter_model.safetensors")
    )
    assert in_checkpoint.keys() == saved.keys()
    assert all(torch.equal(in_checkpoint[k], saved[k]) for k in saved)
    base = InternVLForConditionalGeneration.from_pretrained(ckpt)
    model = PeftModel.from_pretrained(base, out / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # B starts at 0: training moved it


@pytest.mark.parametrize("reduction, zero_stage", [("square", 0), ("sample", 2), ("token", 3)])
def test_loss_invariance_two_ranks(tmp_path, reduction, zero_stage):
    """The real loop on 2 ranks x 2 accumulation steps gives the gradient of one big packed batch, and
    logs its norm; under ZeRO-3 with every parameter partitioned and a text-only micro-batch on rank 1."""
    from tests.train.helpers import check_one_step_against_reference

    check_one_step_against_reference(tmp_path, "dist_grad_check.py", reduction, zero_stage)


def test_training_from_an_original_format_checkpoint_equals_training_from_hf(small_data):
    """`model.pretrained=` an original-layout dir (InternVLChatModel keys, fused qkv) is converted at start
    and trains exactly as the -hf checkpoint it came from: the same loss at every step."""
    from vlmtune.train.model.original_format import convert

    root, meta, ckpt = small_data
    original = root / "tiny_original"
    if not original.exists():
        convert(ckpt, original, "original")
    extra = {"train.max_steps": 2, "train.save_every": 0, "train.export": False}
    from_hf, from_original = root / "from_hf", root / "from_original"
    run_sft(base_overrides(ckpt, meta, from_hf, **extra))
    proc = run_sft(base_overrides(original, meta, from_original, **extra))
    assert "is in the original InternVL layout: converted to" in proc.stdout + proc.stderr
    assert (from_original / "pretrained_hf" / "config.json").exists()
    hf_losses = [m["loss"] for m in _metrics(from_hf)]
    assert [m["loss"] for m in _metrics(from_original)] == pytest.approx(hf_losses, rel=1e-6)
