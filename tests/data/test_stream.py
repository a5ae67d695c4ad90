"""The training stream (data/stream.py MicroBatchStream), built as the runner builds it (runner.build_data:
the meta file, the SFT processor, SampleLoader, one rank's shard): a resumed stream continues exactly
where the saved one stopped, workers and micro-batch size change nothing but the grouping, packing
regroups the same samples without losing or repeating one, and the loss over the same samples is the
same packed or padded.

The data mixes augmented images (JPEG quality drawn per sample), two videos (frames drawn per sample),
a text record and a dataset with one of every bad kind (skipped and counted), so that every draw that
depends on a sample's key and every skip is on the path a resume must reproduce.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from functools import cache
from types import SimpleNamespace

import pytest
import torch

from tests.train.helpers import tiny_model, tiny_tokenizer

TOKENS_PER_TILE = 16  # the tiny model's 56 px tiles


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    from vlmtune.data.synthetic import generate_bad_samples, generate_sft_dataset

    root = tmp_path_factory.mktemp("stream")
    generate_sft_dataset(
        root / "shapes", num_train=12, num_eval=1, seed=1, image_size_range=(40, 160), num_videos=2
    )
    generate_bad_samples(root / "bad", seed=1, num_good=2, with_video=False)
    path = root / "meta.json"
    path.write_text(
        json.dumps(
            {
                "shapes": {"root": "shapes", "annotation": "shapes/train.jsonl", "data_augment": True},
                "bad": {"root": "bad", "annotation": "bad/bad.jsonl"},
            }
        )
    )
    return path


@cache
def _compose(overrides: tuple[str, ...]):
    from vlmtune.train.runtime.config import compose_config

    return compose_config("sft", list(overrides))


def config(meta, packing: bool, micro_batch_size: int = 1, num_workers: int = 0, **extra):
    """The run config `vlmtune sft` gets for these settings (configs/data/demo.yaml's sample settings)."""
    values = {
        "data.meta_path": meta,
        "data.max_dynamic_patch": 2,  # 1 to 3 tiles an image: samples of uneven lengths
        "train.micro_batch_size": micro_batch_size,
        "train.num_workers": num_workers,
        "packing.max_tokens": 256,
        "packing.buffer_size": 6,
        **extra,
    }
    overrides = [f"{k}={v}" for k, v in values.items()] + ([] if packing else ["packing=none"])
    return _compose(tuple(overrides))


def build(cfg, out_dir, monkeypatch, rank: int = 0, world: int = 1):
    """The rank's TrainData exactly as `_train` builds it (runner.build_data), for a ``world``-rank run."""
    from vlmtune.train.commands import runner
    from vlmtune.train.commands.sft import SFTMethod

    monkeypatch.setattr(runner, "dist", SimpleNamespace(get_rank=lambda: rank, get_world_size=lambda: world))
    monkeypatch.setattr(
        runner, "on_rank0", lambda decide: decide()
    )  # one process: each rank decides as rank 0
    out_dir.mkdir(parents=True, exist_ok=True)  # (runner.setup_output_dir's part)
    return runner.build_data(cfg, SFTMethod(), tiny_tokenizer(), TOKENS_PER_TILE, out_dir)


def digest(sample: dict) -> tuple:
    """A sample's identity: its record and its exact tokens and pixels (augmentation and frames included)."""
    h = hashlib.sha256()
    for name in ("input_ids", "labels", "pixel_values"):
        h.update(sample[name].contiguous().numpy().tobytes())
    return sample["source"], h.hexdigest()


def take(stream_iter, n: int) -> list[list[tuple]]:
    return [[digest(s) for s in next(stream_iter)] for _ in range(n)]


def saved_and_loaded(state: dict) -> dict:
    """Through torch.save/torch.load, as the per-rank checkpoint file carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


RESUME_CASES = {  # (packing, micro_batch_size, num_workers, micro-batches, interrupted after)
    "packed": (True, 1, 0, 12, 5),
    "packed_mbs2_workers": (True, 2, 2, 7, 3),
    "padded": (False, 1, 0, 30, 13),
    "padded_mbs3_workers": (False, 3, 2, 12, 5),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resumed_stream_continues_the_uninterrupted_one(meta, tmp_path, monkeypatch, case):
    """Consume k micro-batches, save the state, build a fresh stream, load it: the continuation is the
    uninterrupted stream's, sample for sample (pixels included), across an epoch boundary, and the
    skips counted before and after the resume add up to the uninterrupted run's."""
    packing, mbs, workers, n, k = RESUME_CASES[case]
    cfg = config(meta, packing, mbs, workers)
    full = build(cfg, tmp_path / "full", monkeypatch)
    expected = take(iter(full.stream), n)
    assert full.stream.state_dict()["epoch"] >= 1  # the run crossed into the next epoch

    first = build(cfg, tmp_path / "first", monkeypatch)
    got = take(iter(first.stream), k)
    state = saved_and_loaded(first.stream.state_dict())
    if packing:
        assert state["buffer"]  # the resume must rebuild a non-empty packing buffer
    resumed = build(cfg, tmp_path / "resumed", monkeypatch)
    resumed.stream.load_state_dict(state)
    got += take(iter(resumed.stream), n - k)
    assert got == expected
    assert first.report.total + resumed.report.total == full.report.total > 0
    assert resumed.stream.state_dict() == full.stream.state_dict()


@pytest.mark.parametrize("packing", [True, False])
def test_workers_change_nothing(meta, tmp_path, monkeypatch, packing):
    n = 8 if packing else 20
    alone = build(config(meta, packing, 2), tmp_path / "alone", monkeypatch)
    workers = build(config(meta, packing, 2, num_workers=2), tmp_path / "workers", monkeypatch)
    assert take(iter(workers.stream), n) == take(iter(alone.stream), n)
    assert workers.report.total == alone.report.total


def test_micro_batch_size_only_groups_the_unpacked_stream(meta, tmp_path, monkeypatch):
    one = take(iter(build(config(meta, False, 1), tmp_path / "one", monkeypatch).stream), 30)
    three = take(iter(build(config(meta, False, 3), tmp_path / "three", monkeypatch).stream), 10)
    assert [len(b) for b in one] == [1] * 30 and [len(b) for b in three] == [3] * 10
    assert [s for b in three for s in b] == [s for b in one for s in b]


def test_ranks_share_out_the_same_samples(meta, tmp_path, monkeypatch):
    """Two ranks' epoch-0 shards hold, between them, exactly the one-rank epoch: the same samples, pixels
    included (a sample's draws follow its position in the epoch, not the rank that processes it)."""

    def epoch0(rank: int, world: int) -> list[tuple]:
        stream = build(config(meta, False), tmp_path / f"r{rank}of{world}", monkeypatch, rank, world)
        stream = stream.stream
        shard = len(range(rank, stream.epoch_size(0), world))
        it, out = iter(stream), []
        while stream.state_dict()["position"] < shard and stream.state_dict()["epoch"] == 0:
            out += [digest(s) for s in next(it)]
        # the last sample read may be past a trailing skip: drop what came from epoch 1
        return out[: len(out) - (stream.state_dict()["epoch"] > 0)]

    ranks = [epoch0(0, 2), epoch0(1, 2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert Counter(ranks[0] + ranks[1]) == Counter(epoch0(0, 1))


def _packed_run(meta, tmp_path, monkeypatch, n: int, mbs: int = 1, **extra):
    data = build(config(meta, True, mbs, **extra), tmp_path / "packed", monkeypatch)
    it = iter(data.stream)
    batches = [next(it) for _ in range(n)]
    return data, batches


def test_packs_regroup_the_stream_without_losing_or_repeating_a_sample(meta, tmp_path, monkeypatch):
    """The samples packed so far plus those held in the packing buffer are exactly a prefix of the
    unpacked stream; every pack keeps stream order and its token budget."""
    data, packs = _packed_run(meta, tmp_path, monkeypatch, n=10)
    max_tokens = 256
    for pack in packs:
        keys = [s["index"] for s in pack]
        assert keys == sorted(keys)
        assert sum(len(s["input_ids"]) for s in pack) <= max_tokens
    assert max(len(p) for p in packs) > 1  # packs really hold several samples
    held = [tuple(k) for k in data.stream.state_dict()["buffer"]]
    by_key = {s["index"]: digest(s) for p in packs for s in p}
    by_key.update({k: digest(data.stream.load(k)) for k in held})
    assert len(by_key) == sum(len(p) for p in packs) + len(held)  # no key twice
    packed_order = [by_key[k] for k in sorted(by_key)]
    unpacked = build(config(meta, False), tmp_path / "unpacked", monkeypatch)
    assert [s for b in take(iter(unpacked.stream), len(packed_order)) for s in b] == packed_order
    # packing reorders across packs: the stream order is not the pack order
    assert [k for p in packs for k in (s["index"] for s in p)] != sorted(by_key)[: sum(map(len, packs))]


def _step_loss(model, objective, batches: list[dict]) -> float:
    """The loss of one optimizer step over ``batches`` as the loop computes it (one rank): each micro-batch's
    share, normalised by the totals summed over all of them."""
    totals = torch.stack([objective.weight_totals(b) for b in batches]).sum(0).double()
    with torch.no_grad():
        return sum(objective(model, b, totals)[0].item() for b in batches)


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def _collate_and_objective(cfg, model):
    """The runner's collate for ``cfg`` (packed row or padded rows) and its SFT objective."""
    from vlmtune.train.commands.sft import SFTMethod

    method = SFTMethod()
    return method.collate(cfg, tiny_tokenizer(), model), method.objective(cfg, model, {})


REDUCTIONS = ("token", "square")


def test_packed_and_padded_streams_give_the_same_samples_and_loss(meta, tmp_path, monkeypatch, model):
    """A buffer of 3 that always fits one pack makes each pack the next 3 samples: the packed stream and
    the padded stream with micro_batch_size=3 then hold the same samples in the same order, and each
    micro-batch's loss through the runner's collate and the SFT objective is the same."""
    fits = {"packing.buffer_size": 3, "packing.max_tokens": 8192}
    a = iter(build(config(meta, True, 1, **fits), tmp_path / "packed", monkeypatch).stream)
    b = iter(build(config(meta, False, 3, **fits), tmp_path / "padded", monkeypatch).stream)
    for _ in range(5):
        x, y = next(a), next(b)
        assert [digest(s) for s in x] == [digest(s) for s in y]
        for reduction in REDUCTIONS:
            collate_x, objective = _collate_and_objective(
                config(meta, True, 1, **fits, **{"train.loss_reduction": reduction}), model
            )
            collate_y, _ = _collate_and_objective(
                config(meta, False, 3, **fits, **{"train.loss_reduction": reduction}), model
            )
            px, py = collate_x(x), collate_y(y)
            assert px["input_ids"].shape[0] == 1 and py["input_ids"].shape[0] == 3  # one row, three padded
            assert _step_loss(model, objective, [px]) == pytest.approx(
                _step_loss(model, objective, [py]), rel=1e-5
            )


def test_best_fit_packs_give_the_loss_of_the_same_samples_padded(meta, tmp_path, monkeypatch, model):
    """Real best-fit packing (two packs per micro-batch) against the same samples taken from the padded
    stream in its own order, two per micro-batch: one step's loss over them is the same."""
    _, packs = _packed_run(meta, tmp_path, monkeypatch, n=3, mbs=2)
    wanted = Counter(digest(s) for p in packs for s in p)
    unpacked, chosen = iter(build(config(meta, False, 2), tmp_path / "padded", monkeypatch).stream), []
    for _ in range(100):  # the packed samples are a prefix of the stream with the buffer's left out
        for s in next(unpacked):
            if wanted[digest(s)]:
                wanted[digest(s)] -= 1
                chosen.append(s)
        if not sum(wanted.values()):
            break
    assert not sum(wanted.values())
    for reduction in REDUCTIONS:
        collate, objective = _collate_and_objective(
            config(meta, True, 2, **{"train.loss_reduction": reduction}), model
        )
        packed_batches = [collate(p) for p in packs]
        collate, _ = _collate_and_objective(
            config(meta, False, 2, **{"train.loss_reduction": reduction}), model
        )
        padded_batches = [collate(chosen[i : i + 2]) for i in range(0, len(chosen), 2)]
        assert sum(b["num_samples"] for b in packed_batches) == len(chosen) > 2 * len(packs)
        assert _step_loss(model, objective, packed_batches) == pytest.approx(
            _step_loss(model, objective, padded_batches), rel=1e-5
        )
