"""Elastic resume: a run resumed on another number of data-parallel ranks continues exactly.

What "exactly" means (train/runtime/elastic.py): the weights and the optimizer state are restored whole
(DeepSpeed's universal checkpoint), the global batch (world_size x gradient_accumulation_steps
micro-batches) is kept, and the samples not consumed at the checkpoint are read first, in the epoch's
global order, dealt over the new ranks: over the whole run no sample is skipped or seen twice.

The reference. With packing off and one sample per micro-batch, every optimizer step of an
uninterrupted run draws the next ``global batch`` samples of the epoch's order, whatever the world size
(2 ranks x 1 accumulation step or 1 rank x 2), and its gradient is their weighted mean however they are
split: an uninterrupted run on the resumed run's world sizes draws, step for step, the same samples and
computes the same losses. So each stage resumes a chain of world sizes (2 -> 1 -> 2 under ZeRO-2, 1 -> 2
-> 1 under ZeRO-3, the middle checkpoint itself one written after a re-shard) and is compared, step by
step, with one uninterrupted run on the final world size: the losses, the samples each step drew (a
debug log of the stream's keys), and the final weights. A resume that skipped, repeated or reordered a
sample, or lost part of the optimizer state, changes a step's samples, a loss or the weights. (The same
run resumed on the same world size would be no reference for the data: its data path is the old one.)
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.e2e import LORA, ZERO3, base_overrides, run_sft
from tests.train.runtime.test_schedule import one_rank  # noqa: F401

STEPS = 6
GLOBAL_BATCH = 2  # micro-batches (one sample each, packing off) per optimizer step: world x gas
CHAINS = {  # stage -> (its overrides, the world sizes of the three segments: 2 steps each)
    "zero2": ({"deepspeed": "zero2"}, (2, 1, 2)),
    "zero3": (ZERO3, (1, 2, 1)),
    "zero0": ({"deepspeed": "zero0"}, (1, 2, 1)),  # no conversion: the whole optimizer state on every rank
    # adapter-only checkpoints (the frozen base excluded); without the adapters' dropout, whose masks come
    # from per-rank generators that no other world size draws alike (elastic.py: RNG)
    "lora_zero3": ({**ZERO3, **LORA, "lora.dropout": 0.0}, (2, 1, 2)),
}
SLOW = {"zero0", "lora_zero3"}
CONVERSION = re.compile(r"converted to DeepSpeed's universal checkpoint in ([\d.]+) s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("elastic")
    meta = generate_sft_dataset(root / "data", num_train=32, num_eval=2, seed=3)
    return root, Path(meta), Path(build_tiny_checkpoint(root / "tiny"))


def _run(data, out: Path, stage: str, world: int, max_steps: int, keys: Path, monkeypatch, **extra):
    """`vlmtune sft` on ``world`` ranks, keeping the global batch, with a constant learning rate (the
    segments stop at other max_steps than the reference; the schedule must not depend on it)."""
    from vlmtune.data.stream import KEY_LOG_ENV

    _, meta, ckpt = data
    values = {
        "packing": "none",
        "optim.min_lr_ratio": 1.0,
        "train.max_steps": max_steps,
        "train.save_every": 2,
        "train.keep_last": STEPS // 2,
        "train.gradient_accumulation_steps": GLOBAL_BATCH // world,
        **CHAINS[stage][0],
        **extra,
    }
    monkeypatch.setenv(KEY_LOG_ENV, str(keys))
    return run_sft(base_overrides(ckpt, meta, out, **values), nproc=world, timeout=600)


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _step_keys(keys: Path, world: int, first_step: int) -> dict[int, Counter]:
    """The sample keys each optimizer step drew, over all ranks, from the stream's key log (one line per
    micro-batch a rank yielded)."""
    gas = GLOBAL_BATCH // world
    steps: dict[int, Counter] = defaultdict(Counter)
    for rank in range(world):
        lines = (keys / f"keys_rank{rank}.jsonl").read_text().splitlines()
        for i, line in enumerate(lines):
            steps[first_step + i // gas].update(tuple(k) for k in json.loads(line))
    return dict(steps)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """The run's final output: the HF model, or the peft adapter file of a LoRA run."""
    adapter = out / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else out / "hf" / "model.safetensors"))


@pytest.mark.parametrize(
    "stage", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in sorted(CHAINS)]
)
def test_resumed_on_other_world_sizes_equals_an_uninterrupted_run(data, stage, monkeypatch, capsys):
    root = data[0]
    first, middle, last = CHAINS[stage][1]
    assert first == last  # the reference runs on the final world size; the chain's first segment is its own
    ref = root / f"ref_{stage}"
    _run(data, ref, stage, first, STEPS, ref / "keys", monkeypatch)
    out = root / f"elastic_{stage}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    (out / "checkpoints" / "complete").write_text("step_00000002")
    timings = {}
    segments = ((middle, 4, {"train.export": False}), (last, STEPS, {}))
    for n, (world, max_steps, extra) in enumerate(segments, start=2):
        start = time.perf_counter()
        proc = _run(data, out, stage, world, max_steps, out / f"keys{n}", monkeypatch, **extra)
        log = proc.stdout + proc.stderr
        tag, old = f"step_{max_steps - 2:08d}", (first, middle)[n - 2]
        assert f"resumed from {tag} at step {max_steps - 2}" in log
        assert f"data re-dealt from {old} ranks to {world}" in log
        if stage == "zero0":
            assert f"resuming {tag} (written by {old} ranks) on {world} ranks: ZeRO-0" in log
            assert not (out / "checkpoints" / tag / "universal").exists()
        else:
            assert f"resuming {tag} (written by {old} ranks) on {world} ranks from universal" in log
            assert (out / "checkpoints" / tag / "universal" / "zero").is_dir()
            timings[f"{old}->{world} conversion_s"] = float(CONVERSION.search(log).group(1))
        timings[f"{old}->{world} run_s"] = round(time.perf_counter() - start, 1)
    with capsys.disabled():
        print(f"\n{stage}: {timings}")

    # the losses of every resumed step, on whatever world size it ran, are the uninterrupted run's
    reference = _losses(ref)
    got = _losses(out)
    assert sorted(got) == list(range(3, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    # each step drew the samples the uninterrupted run's step drew: over the whole run (the first two
    # steps are the reference's own) the same samples, none twice
    drawn = _step_keys(ref / "keys", first, 1)
    assert sorted(drawn) == list(range(1, STEPS + 1))
    elastic = {s: c for s, c in drawn.items() if s <= 2}
    elastic.update(_step_keys(out / "keys2", middle, 3))
    elastic.update(_step_keys(out / "keys3", last, 5))
    assert elastic == drawn
    whole = sum(elastic.values(), Counter())
    assert whole == sum(drawn.values(), Counter()) and set(whole.values()) == {1}
    assert len(whole) == STEPS * GLOBAL_BATCH
    a, b = _weights(out), _weights(ref)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)


# ---- the decisions at start, and the per-rank states, without a model -------------------------------


def _checkpoint(tmp_path: Path, world: int, **settings) -> dict:
    """A complete checkpoint directory's vlmtune files (no DeepSpeed files), written by ``world`` ranks."""
    from vlmtune.train.runtime.checkpoint import POINTER, atomic_write, run_fingerprint
    from vlmtune.train.runtime.config import compose_config

    cfg = compose_config("sft", ["data.meta_path=m.json", *(f"{k}={v}" for k, v in settings.items())])
    saved = run_fingerprint(cfg, world_size=world)
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "vlmtune_run.json").write_text(json.dumps(saved))
    for rank in range(world):
        (ckpt / f"vlmtune_rank{rank:05d}.json").write_text("{}")
    atomic_write(tmp_path / "checkpoints" / POINTER, "step_00000004")
    return saved


def _fingerprint(world: int, **settings) -> dict:
    from vlmtune.train.runtime.checkpoint import run_fingerprint
    from vlmtune.train.runtime.config import compose_config

    cfg = compose_config("sft", ["data.meta_path=m.json", *(f"{k}={v}" for k, v in settings.items())])
    return run_fingerprint(cfg, world_size=world)


def test_another_world_size_is_resumed_when_the_global_batch_is_kept(one_rank, tmp_path):  # noqa: F811
    from vlmtune.train.runtime.checkpoint import resume_tag

    _checkpoint(tmp_path, 2, **{"train.gradient_accumulation_steps": 2})
    assert (
        resume_tag(tmp_path, _fingerprint(1, **{"train.gradient_accumulation_steps": 4})) == "step_00000004"
    )
    assert (
        resume_tag(tmp_path, _fingerprint(4, **{"train.gradient_accumulation_steps": 1})) == "step_00000004"
    )


@pytest.mark.parametrize(
    "world, settings, refused",
    [
        (
            1,
            {"train.gradient_accumulation_steps": 2},
            "was 2 x 2 = 4, now 1 x 2 = 2: set train.gradient_accumulation_steps=4 to keep it",
        ),
        (
            3,
            {},
            "no gradient_accumulation_steps keeps it on 3 ranks: resume on a number of ranks that divides 4",
        ),
        (
            1,
            {"train.gradient_accumulation_steps": 4, "train.micro_batch_size": 2},
            "train.micro_batch_size was 1",
        ),
        (
            1,
            {"train.gradient_accumulation_steps": 4, "packing.max_tokens": 4096},
            "packing.max_tokens was 8192",
        ),
        (1, {"train.gradient_accumulation_steps": 4, "model.text.hidden_size": 64}, "model.config was"),
        (
            1,
            {"train.gradient_accumulation_steps": 4, "deepspeed": "zero3"},
            "deepspeed.zero_stage was 0, now 3",
        ),
    ],
)
def test_what_an_elastic_resume_cannot_keep_is_refused_naming_it(
    one_rank,  # noqa: F811
    tmp_path,
    world,
    settings,
    refused,
):
    from vlmtune.train.runtime.checkpoint import resume_tag

    _checkpoint(tmp_path, 2, **{"train.gradient_accumulation_steps": 2})
    with pytest.raises(ValueError, match="cannot resume exactly") as e:
        resume_tag(tmp_path, _fingerprint(world, **settings))
    assert refused in str(e.value) and "step_00000004" in str(e.value)


def test_a_moved_model_directory_is_the_same_model(tmp_path):
    from vlmtune.train.runtime.checkpoint import _model_identity

    class Model:
        pretrained = tmp_path / "a"

    Model.pretrained.mkdir()
    (Model.pretrained / "config.json").write_text('{"hidden_size": 8}')
    here = _model_identity(Model)
    Model.pretrained = tmp_path / "b"
    shutil.copytree(tmp_path / "a", Model.pretrained)
    assert _model_identity(Model) == here
    (Model.pretrained / "config.json").write_text('{"hidden_size": 16}')
    assert _model_identity(Model) != here


def test_nvme_offload_on_another_world_size_is_refused_before_converting(one_rank, tmp_path):  # noqa: F811
    from vlmtune.train.runtime.elastic import prepare_resume

    _checkpoint(tmp_path, 2)
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}
    with pytest.raises(ValueError, match="written by 2 ranks, this run has 1, with NVMe offload"):
        prepare_resume(tmp_path, "step_00000004", ds, world_size=1)
    assert not (tmp_path / "checkpoints" / "step_00000004" / "universal").exists()
    # ZeRO-0 holds the whole optimizer state on every rank: loaded as it is, nothing converted
    zero0 = {"zero_optimization": {"stage": 0}}
    assert prepare_resume(tmp_path, "step_00000004", zero0, world_size=1) is zero0


def test_a_conversion_is_reused_and_a_failed_one_leaves_nothing_to_reuse(one_rank, tmp_path, monkeypatch):  # noqa: F811
    from vlmtune.train.runtime import elastic

    _checkpoint(tmp_path, 2)
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ds = {"zero_optimization": {"stage": 2}}

    def fails(path):  # what a kill or a bug half-way through DeepSpeed's conversion leaves
        (path / ".universal.partial" / "universal" / "zero").mkdir(parents=True)
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(elastic, "convert_to_universal", fails)
    with pytest.raises(RuntimeError, match="conversion failed"):
        elastic.prepare_resume(tmp_path, "step_00000004", ds, world_size=1)
    assert not (ckpt / "universal").exists() and "conversion failed" in (ckpt / elastic.FAILED).read_text()

    converted = []
    monkeypatch.setattr(elastic, "convert_to_universal", lambda path: converted.append(path) or 0.0)
    (ckpt / "universal").mkdir()  # a complete conversion (renamed into place only once complete)
    new = elastic.prepare_resume(tmp_path, "step_00000004", ds, world_size=1)
    assert new["checkpoint"] == {"load_universal": True} and "checkpoint" not in ds
    assert converted == [] and not (ckpt / elastic.FAILED).exists()


def test_rank_states_carry_skips_and_rng_over(one_rank):  # noqa: F811
    from vlmtune.train.runtime.elastic import rank_states

    def old(rank: int, position: int) -> dict:
        return {
            "stream": {"epoch": 0, "position": position, "buffer": [], "pending": []},
            "skipped": [{"line": 10 * rank + i} for i in range(rank + 1)],
            "rng": f"rng of rank {rank}",
        }

    three = [old(0, 2), old(1, 2), old(2, 1)]
    two = rank_states(three, 2, lambda epoch: 9)
    # skips: old rank r's to new rank r mod 2 (the run's total is their sum); RNG: old rank r mod 3's
    assert [[e["line"] for e in s["skipped"]] for s in two] == [[0, 20, 21, 22], [10, 11]]
    assert [s["rng"] for s in two] == ["rng of rank 0", "rng of rank 1"]
    four = rank_states(two, 4, lambda epoch: 9)
    assert [s["rng"] for s in four] == ["rng of rank 0", "rng of rank 1"] * 2
    assert sum(len(s["skipped"]) for s in four) == 6
    # the data: 0,3,6 / 1,4,7 / 2,5,8 read 2, 2, 1 deep -> 5, 6, 7, 8 pending, dealt over two ranks
    assert [s["stream"]["pending"] for s in two] == [[[0, 5, 8, 2]], [[0, 6, 9, 2]]]


def _two_group_engine(stage: int, universal: bool = False):
    """create_engine on a small model with matrices (decayed) and biases + a norm (not decayed): two
    optimizer parameter groups with different weight decay, as every vlmtune run under ZeRO-1/2 or LoRA has."""
    from vlmtune.train.runtime.config import DeepSpeedConfig, OptimConfig, TrainConfig
    from vlmtune.train.runtime.engine import build_ds_config, create_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 3))
    optim = OptimConfig(lr=1e-2, weight_decay=0.5, warmup_ratio=0.0)
    train = TrainConfig(micro_batch_size=1, precision="fp32")
    ds = build_ds_config(DeepSpeedConfig(zero_stage=stage), train, optim, world_size=1)
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    engine, _, _ = create_engine(model, ds, optim, max_steps=10)
    return engine


def _train_steps(engine, first: int, n: int) -> list[float]:
    losses = []
    for step in range(first, first + n):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("stage", [2, 3])
def test_a_universal_load_restores_what_a_plain_load_does(one_rank, tmp_path, stage):  # noqa: F811
    """Train 2 steps, save, go on 3 more; a fresh engine loading the checkpoint's universal conversion goes
    on the same 3 steps with the same losses and ends with the same weights. Under ZeRO-3 this holds only
    with checkpoint._repair_zero3_universal_load: DeepSpeed's load alone decays the no-decay group and
    advances the second group's Adam step twice per step."""
    from deepspeed.utils import safe_get_full_fp32_param

    from vlmtune.train.runtime.checkpoint import load_checkpoint, save_checkpoint
    from vlmtune.train.runtime.elastic import convert_to_universal

    engine = _two_group_engine(stage)
    assert [g["weight_decay"] for g in engine.optimizer.optimizer.param_groups] == [0.5, 0.0]
    _train_steps(engine, 0, 2)
    ckpt = save_checkpoint(engine, tmp_path, 2, {"step": 2}, {"stream": {}}, keep_last=2)
    expected = _train_steps(engine, 2, 3)
    convert_to_universal(ckpt)
    resumed = _two_group_engine(stage, universal=True)
    load_checkpoint(resumed, tmp_path, "step_00000002")
    assert [g["weight_decay"] for g in resumed.optimizer.optimizer.param_groups] == [0.5, 0.0]
    assert _train_steps(resumed, 2, 3) == pytest.approx(expected, rel=1e-6)
    for a, b in zip(resumed.module.parameters(), engine.module.parameters()):
        torch.testing.assert_close(
            safe_get_full_fp32_param(a), safe_get_full_fp32_param(b), rtol=1e-6, atol=1e-7
        )
