"""Re-sharding the data position for a resume on another number of ranks (data/stream.py ``reshard``).

Hand cases give the saved states of the old ranks and the keys each new rank must read before it shards
the next epoch, worked out on paper from the rule: consumed = each old rank's reads minus its buffer;
pending = everything else up to the end of the latest epoch reached, in the global order, dealt round-robin.
The stream cases run real `MicroBatchStream`s (fake samples of uneven lengths, some skipped, best-fit
packing): every sample of every finished epoch is yielded exactly once over a run re-sharded twice.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vlmtune.data.stream import MicroBatchStream, Skipped, keys_of, reshard, runs_of


def state(epoch: int, position: int, buffer=(), pending=()) -> dict:
    return {
        "epoch": epoch,
        "position": position,
        "buffer": [list(k) for k in buffer],
        "pending": list(pending),
    }


def dealt(states: list[dict]) -> list[list[tuple[int, int]]]:
    """Each new state's pending keys (after checking the rest of the state is a fresh start)."""
    epochs = {s["epoch"] for s in states}
    assert len(epochs) == 1 and all(s["position"] == 0 and s["buffer"] == [] for s in states)
    return [list(keys_of(s["pending"])) for s in states]


def e0(*positions: int) -> list[tuple[int, int]]:
    return [(0, p) for p in positions]


# (old states, epoch size, new world, the keys each new rank reads first, the epoch it shards next)
HAND_CASES = {
    # 10 samples, 2 ranks 3 deep (read 0,2,4 and 1,3,5): 6..9 remain
    "2to1_even": ([state(0, 3), state(0, 3)], 10, 1, [e0(6, 7, 8, 9)], 1),
    # rank 0 read 0,2,4,6 holding 2 and 6 in its packing buffer, rank 1 read 1,3 holding 3: only 0, 4, 1
    # were consumed
    "2to1_buffers": (
        [state(0, 4, e0(2, 6)), state(0, 2, e0(3))],
        10,
        1,
        [e0(2, 3, 5, 6, 7, 8, 9)],
        1,
    ),
    # 7 samples: shards 0,2,4,6 and 1,3,5; rank 0 finished its shard (still in epoch 0), rank 1 read 1
    "2to3_uneven": ([state(0, 4), state(0, 1)], 7, 3, [e0(3), e0(5), []], 1),
    # one rank read 0..4 holding 3: 3, 5..9 dealt over two
    "1to2_buffer": ([state(0, 5, e0(3))], 10, 2, [e0(3, 6, 8), e0(5, 7, 9)], 1),
    # rank 0 crossed into epoch 1 (read its epoch-0 shard and (1,0), holds (0,8) and (1,0)); rank 1 is in
    # epoch 0 (read 1,3,5, holds 5): the rest of epoch 0 and all of epoch 1 are pending, epoch 2 is next
    "2to2_epoch_boundary": (
        [state(1, 1, [(0, 8), (1, 0)]), state(0, 3, e0(5))],
        10,
        2,
        [
            [(0, 5), (0, 8), (1, 0), (1, 2), (1, 4), (1, 6), (1, 8)],
            [(0, 7), (0, 9), (1, 1), (1, 3), (1, 5), (1, 7), (1, 9)],
        ],
        2,
    ),
    # states that came from a re-shard (pending partly read) re-shard again: rank 0 has read (0,3) and (0,6)
    # of its pending 3,6,8 and holds 6; rank 1 read 5 of 5,7,9 and holds nothing; no rank has read from
    # epoch 1 yet, which stays to be sharded as usual
    "resharded_again_2to3": (
        [state(1, 0, e0(6), [[0, 8, 9, 1]]), state(1, 0, (), [[0, 7, 10, 2]])],
        10,
        3,
        [e0(6, 9), e0(7), e0(8)],
        1,
    ),
    # the same but rank 1 has started epoch 1 (4 samples; it read (1,1) and holds it): all of epoch 1 is
    # dealt too
    "resharded_again_into_epoch_1": (
        [state(1, 0, e0(6), [[0, 8, 9, 1]]), state(1, 1, [(1, 1)], [])],
        {0: 10, 1: 4},
        2,
        [[(0, 6), (1, 0), (1, 2)], [(0, 8), (1, 1), (1, 3)]],
        2,
    ),
}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_reshard_hand_cases(case):
    old, size, world, expected, next_epoch = HAND_CASES[case]
    new = reshard(old, lambda epoch: size[epoch] if isinstance(size, dict) else size, world)
    assert len(new) == world
    assert dealt(new) == expected
    assert new[0]["epoch"] == next_epoch
    json.dumps(new)  # what the per-rank checkpoint file holds


def test_a_share_of_a_large_epoch_stays_a_few_runs():
    """A million samples re-dealt from 8 ranks to 3: each new rank's pending list is a few runs, not a key
    list (rank r read 1000 + r samples and holds its 1000th in its buffer: 8020 consumed)."""
    old = [state(0, 1000 + r, e0(8 * 999 + r)) for r in range(8)]
    new = reshard(old, lambda epoch: 1_000_000, 3)
    assert all(len(s["pending"]) <= 8 for s in new) and len(json.dumps(new)) < 1000
    shares = [list(keys_of(s["pending"])) for s in new]
    assert sum(map(len, shares)) == 1_000_000 - sum(999 + r for r in range(8))
    assert shares[2][-1] == (0, 999_999) and shares[0][:4] == e0(7992, 7995, 7998, 8008)
    assert runs_of(keys_of([[0, 3, 100, 4], [1, 0, 1, 1]])) == [[0, 3, 100, 4], [1, 0, 1, 1]]


def test_states_holding_a_key_twice_are_refused():
    with pytest.raises(ValueError, match=r"key \(0, 2\) is pending on two ranks"):
        reshard([state(0, 2, e0(2)), state(0, 0, e0(2))], lambda epoch: 10, 1)


# ---- real streams ---------------------------------------------------------------------------------

EPOCH = 23  # odd: the shards of 2 and 3 ranks are uneven


def load(key: tuple[int, int]) -> dict | Skipped:
    """A sample of a key-determined length (1..6 tokens); every 9th position (offset by epoch) is bad."""
    epoch, p = key
    if (p + epoch) % 9 == 4:
        return Skipped("fake", f"fake.jsonl:{p}", "too_long")
    return {"key": key, "length": 1 + (7 * epoch + 5 * p) % 6}


def streams(world: int, packing: bool, states: list[dict] | None = None) -> list[MicroBatchStream]:
    out = []
    for rank in range(world):
        s = MicroBatchStream(
            lambda epoch: EPOCH,
            load,
            rank=rank,
            world_size=world,
            micro_batch_size=2,
            packing=packing,
            max_tokens=8,
            max_tiles=None,
            buffer_size=4,
            on_skip=lambda skipped: None,
        )
        if states is not None:
            s.load_state_dict(json.loads(json.dumps(states[rank])))  # through JSON, as the rank file
        out.append(s)
    return out


def run(ranks: list[MicroBatchStream], micro_batches: int) -> list[tuple[int, int]]:
    """The keys yielded by ``micro_batches`` micro-batches on each rank (each rank's iterator made fresh, as
    after a resume)."""
    keys = []
    for s in ranks:
        it = iter(s)
        for _ in range(micro_batches):
            keys += [tuple(sample["key"]) for sample in next(it)]
    return keys


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("worlds", [(2, 1, 3), (1, 2, 2), (2, 3, 1), (3, 2, 2)])
def test_a_run_resharded_twice_yields_every_sample_of_an_epoch_once(packing, worlds):
    """Each phase stops mid-epoch with full packing buffers; the last runs on until two epochs are done."""
    first, second, third = worlds
    ranks = streams(first, packing)
    seen = run(ranks, 3)
    ranks = streams(second, packing, reshard([s.state_dict() for s in ranks], lambda e: EPOCH, second))
    seen += run(ranks, 4)
    if packing:
        assert any(s.state_dict()["buffer"] for s in ranks)  # the re-shard below must carry buffers over
    ranks = streams(third, packing, reshard([s.state_dict() for s in ranks], lambda e: EPOCH, third))
    seen += run(ranks, 40)
    assert all(s.state_dict()["epoch"] >= 3 for s in ranks)  # epochs 0 and 1 are behind every rank
    good = {(e, p) for e in (0, 1) for p in range(EPOCH) if not isinstance(load((e, p)), Skipped)}
    counts = Counter(k for k in seen if k[0] < 2)
    assert set(counts) == good and set(counts.values()) == {1}


def test_without_packing_the_resharded_stream_continues_the_global_order():
    """2 ranks x 3 samples then 1 rank: the one rank reads on from global position 6, as a run on one rank
    from the start reads after its first 6 (the same samples per step when the global batch is kept)."""

    def no_skips(key):
        return {"key": key, "length": 1}

    def make(world, rank):
        return MicroBatchStream(
            lambda e: EPOCH,
            no_skips,
            rank=rank,
            world_size=world,
            micro_batch_size=1,
            packing=False,
            max_tokens=8,
            max_tiles=None,
            buffer_size=4,
            on_skip=lambda s: None,
        )

    old = [make(2, 0), make(2, 1)]
    for s in old:
        it = iter(s)
        for _ in range(3):
            next(it)
    (new,) = [make(1, 0)]
    new.load_state_dict(reshard([s.state_dict() for s in old], lambda e: EPOCH, 1)[0])
    alone = iter(make(1, 0))
    for _ in range(6):
        next(alone)
    it = iter(new)
    assert [next(it)[0]["key"] for _ in range(2 * EPOCH)] == [next(alone)[0]["key"] for _ in range(2 * EPOCH)]
