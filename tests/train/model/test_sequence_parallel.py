"""vlmtune.train.model.sequence_parallel: the slice and tile-share arithmetic and the refusals by hand, the
Ulysses attention outside an SP forward equal to its core, and, under torchrun on 2 ranks (one SP group), the
split runs equal to the un-split ones: losses, every gradient (the vision tower's, whose tiles are shared out
over the group, included) and the metric shares of SFT, LoRA and MPO batches (tests/train/dist_sp_check.py),
and loop steps over a ZeRO-3 engine equal to the one-process gradient."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tests.train.helpers import tiny_model
from vlmtune.train.model.sequence_parallel import (
    ULYSSES_PREFIX,
    SequenceParallel,
    check_sequence_parallel,
    check_world,
    data_parallel_rank,
    enable_sequence_parallel,
    owned,
    shard_bounds,
    shard_row,
    tile_bounds,
)

os.environ.setdefault("DS_ACCELERATOR", "cpu")

IMG = 7  # a stand-in image token id for the hand-made rows


def test_shard_bounds_pad_to_a_multiple_of_the_group() -> None:
    assert [shard_bounds(10, 4, r) for r in range(4)] == [(0, 3, 12), (3, 6, 12), (6, 9, 12), (9, 12, 12)]
    assert shard_bounds(8, 2, 1) == (4, 8, 8)
    assert shard_bounds(1, 2, 1) == (1, 2, 2)


def test_tile_bounds_share_out_every_tile_once() -> None:
    """Contiguous shares, the first count % size ranks one more; fewer tiles than ranks leave shares empty."""
    assert [tile_bounds(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [tile_bounds(1, 2, r) for r in range(2)] == [(0, 1), (1, 1)]
    assert [tile_bounds(7, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert [tile_bounds(0, 3, r) for r in range(3)] == [(0, 0)] * 3
    for count in range(10):
        for size in (1, 2, 3, 4):
            got = [tile_bounds(count, size, r) for r in range(size)]
            want = [
                (int(c[0]), int(c[-1]) + 1) if c.numel() else None
                for c in torch.arange(count).tensor_split(size)
            ]
            assert [g if g[0] < g[1] else None for g in got] == want


def test_shard_row_by_hand() -> None:
    """A 7-token row [text, img, img, img | text, text, text] of two samples over 2 ranks: padded to 8 with
    token 0 whose position continues the last sample; rank 0 holds the three image features, rank 1 none,
    logit positions are relative to the slice, and the attention gets the whole row's ids and tree mask."""
    ids = torch.tensor([[1, IMG, IMG, IMG, 5, 6, 8]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    features = torch.arange(3 * 2, dtype=torch.float32).reshape(3, 1, 2)  # 3 image tokens, hidden 2
    tree = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    sp0, sp1 = SequenceParallel(None, 2, 0), SequenceParallel(None, 2, 1)
    first = shard_row(sp0, ids, pos, None, torch.tensor([2, 3]), features, IMG, 0)
    assert first.input_ids.tolist() == [[1, IMG, IMG, IMG]] and first.position_ids.tolist() == [[0, 1, 2, 3]]
    assert first.keep.tolist() == [2, 3] and first.features.tolist() == [[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]]
    second = shard_row(sp1, ids, pos, tree, torch.tensor([4, 6]), features, IMG, 0)
    assert second.input_ids.tolist() == [[5, 6, 8, 0]] and second.position_ids.tolist() == [[0, 1, 2, 3]]
    assert second.keep.tolist() == [0, 2] and second.features.shape == (1, 0, 2)
    assert second.ulysses.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    mask = second.ulysses.attention_mask[0, 0]
    assert mask.shape == (8, 8) and torch.equal(mask[:7, :7], tree[0, 0])
    assert mask[7].tolist() == [False] * 7 + [True]  # the pad token attends only to itself
    assert owned(sp1, torch.tensor([0, 3, 4, 7]), ids).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="outside this rank's slice"):
        shard_row(sp0, ids, pos, None, torch.tensor([5]), None, IMG, 0)
    with pytest.raises(ValueError, match=r"one packed row \(packing.enabled=true\); got 2 rows"):
        owned(sp0, torch.tensor([0]), torch.zeros(2, 4, dtype=torch.long))


def test_refusals_name_the_numbers() -> None:
    with pytest.raises(ValueError, match="does not divide the LLM's 40 attention heads"):
        check_sequence_parallel(16, 40, 8, "packed_sdpa")
    with pytest.raises(ValueError, match="3 and the LLM's 2 key/value heads"):
        check_sequence_parallel(3, 12, 2, "packed_varlen")
    check_sequence_parallel(4, 12, 2, "packed_sdpa")  # KV heads replicated twice
    check_sequence_parallel(8, 40, 8, "packed_varlen")
    for attn in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        with pytest.raises(ValueError, match=f"attn_implementation='{attn}'.*packed_sdpa or packed_varlen"):
            check_sequence_parallel(2, 4, 2, attn)
    with pytest.raises(ValueError, match="sequence_parallel_size=3 must divide the world size 8"):
        check_world(3, 8)
    assert data_parallel_rank(5, 8, 2) == (2, 4) and data_parallel_rank(5, 8, 1) == (5, 8)
    with pytest.raises(ValueError, match="'sdpa'"):  # refused at the model's build, before any group
        enable_sequence_parallel(tiny_model(attn_implementation="sdpa"), 2)
    assert enable_sequence_parallel(tiny_model(), 1) is None


def test_config_refuses_sequence_parallel_without_packing() -> None:
    from vlmtune.train.runtime.config import compose_config

    assert compose_config("sft", ["train.sequence_parallel_size=2"]).train.sequence_parallel_size == 2
    with pytest.raises(ValueError, match="sequence_parallel_size=2 splits one packed row"):
        compose_config("sft", ["train.sequence_parallel_size=2", "packing.enabled=false"])
    with pytest.raises(ValueError, match="must be >= 1"):
        compose_config("mpo", ["train.sequence_parallel_size=0"])


@pytest.mark.parametrize("core", ["packed_sdpa", "packed_varlen"])
def test_ulysses_attention_outside_an_sp_forward_is_its_core(core) -> None:
    """Generation and evaluation call the LLM without the ``ulysses`` keyword: the core's output exactly."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, 9, 8, generator=g),
        torch.randn(1, 2, 9, 8, generator=g),
        torch.randn(1, 2, 9, 8, generator=g),
    )
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    module = torch.nn.Module()
    want, _ = ALL_ATTENTION_FUNCTIONS[core](module, q, k, v, None, scaling=0.3, position_ids=pos)
    got, _ = ALL_ATTENTION_FUNCTIONS[ULYSSES_PREFIX + core](
        module, q, k, v, None, scaling=0.3, position_ids=pos
    )
    assert torch.equal(got, want)


def test_two_ranks_equal_the_unsplit_run(tmp_path) -> None:
    """One torchrun: every model-level case, then ZeRO-3 loop steps for SFT (twice: the second over a
    one-tile and a 3-tile micro-batch) and MPO. The vision tower's gradient is checked relative to its own
    size (LoRA's vision adapters get small ones), and each rank encodes its share of the tiles only."""
    from tests.train.helpers import check_one_step_against_reference

    check_one_step_against_reference(tmp_path, "dist_sp_check.py", 3)  # SFT through the loop (out/)
    mpo = json.loads((tmp_path / "mpo" / "result.json").read_text())
    assert mpo["partitioned"] and mpo["max_grad"] > 1e-3
    assert mpo["max_abs_diff"] < 1e-5 * max(1.0, mpo["max_grad"])
    [record] = [json.loads(line) for line in (tmp_path / "mpo" / "metrics.jsonl").read_text().splitlines()]
    assert record["grad_norm"] == pytest.approx(mpo["ref_grad_norm"], rel=1e-5)
    assert record["text_only_micro_batches"] == 1 and record["samples"] == 3  # counted once per SP group
    assert record["bco/delta"] == pytest.approx(0.15) and record["rewards/chosen"] != 0.0
    tiles = json.loads((tmp_path / "tiles" / "result.json").read_text())
    assert tiles["partitioned"] and tiles["max_grad"] > 1e-3
    assert tiles["max_abs_diff"] < 1e-5 * max(1.0, tiles["max_grad"])
    cases = json.loads((tmp_path / "sp_result.json").read_text())
    assert len(cases) == 15
    for case in cases:
        name = case["case"]
        assert case["sp_loss"] == pytest.approx(case["ref_loss"], rel=1e-5), name
        assert case["max_grad"] > 1e-3, name
        assert case["max_abs_diff"] < 1e-5 * max(1.0, case["max_grad"]), (name, case["max_abs_diff"])
        assert case["vision_max_abs_diff"] <= 1e-5 * case["vision_max_grad"], (
            name,
            case["vision_max_abs_diff"],
        )
        unsplit, per_rank = case["tiles"]["unsplit"], case["tiles"]["per_rank"]
        assert per_rank == [len(t) for t in torch.arange(unsplit).tensor_split(2)], (name, case["tiles"])
        assert (case["vision_max_grad"] > 1e-4) == (unsplit > 0), name
        for key, (ref, split) in case["metrics"].items():
            assert split == pytest.approx(ref, rel=1e-5, abs=1e-6), (name, key)
    by_name = {case["case"]: case for case in cases}
    assert by_name["sft_odd_tiles"]["tiles"]["per_rank"] == [3, 2]
    assert by_name["sft_one_tile"]["tiles"]["per_rank"] == [1, 0]  # rank 1 ran the tower on a blank tile
    lora = by_name["sft_lora"]
    assert lora["vision_grads"] == 24 and lora["tiles"]["per_rank"] == [3, 2]  # the vision adapters only


def test_vlmtune_sft_split_over_two_ranks_trains_as_one(tmp_path) -> None:
    """`vlmtune sft train.sequence_parallel_size=2` on 2 ranks under ZeRO-3 (the runner's wiring: both ranks
    of the group read the data-parallel shard, the model built partitioned and split) logs the losses,
    gradient norms and token counts of the same run on one rank, and exports."""
    from tests.train.e2e import ZERO3, base_overrides, run_sft
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    meta = generate_sft_dataset(tmp_path / "data", num_train=32, num_eval=8, seed=1)
    ckpt = build_tiny_checkpoint(tmp_path / "tiny")
    extra = {"train.max_steps": 2, "packing.max_tokens": 512, "data.max_length": 512, **ZERO3}
    run_sft(base_overrides(ckpt, meta, tmp_path / "one", **extra))
    run_sft(
        base_overrides(ckpt, meta, tmp_path / "sp", **extra, **{"train.sequence_parallel_size": 2}), nproc=2
    )
    one, split = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "sp")
    )
    assert len(one) == len(split) == 2
    for a, b in zip(one, split):
        assert (b["tokens"], b["samples"]) == (a["tokens"], a["samples"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert (tmp_path / "sp" / "hf" / "model.safetensors").exists()
