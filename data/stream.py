"""This rank's resumable stream of micro-batches: shard -> process (optionally in workers) -> pack.

Why a stream of its own rather than a DataLoader alone: a killed run must resume on the exact
sample it stopped at, with the packing buffer as it was. The state is three numbers and a list
(epoch, position in this rank's shard, the keys held in the packing buffer); every sample is a
pure function of its key (its augmentation RNG is seeded from it), so resuming re-creates the
buffer by processing those keys again. Workers may run ahead; only what the packer consumed
counts as consumed.

A run resumed on another number of ranks (`reshard`) first reads the samples the saved ranks had not
consumed, dealt over the new ranks in the epoch's global order (``pending``), then shards the next
epoch as usual: over the whole run no sample is skipped or seen twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmtune.data.packing import best_fit_pack

Key = tuple[int, int]  # (epoch, position in the epoch's global index)
Run = list[int]  # [epoch, start, stop, step]: the keys (epoch, p) for p in range(start, stop, step)

#: Debugging aid (tests): a directory where each rank appends the keys of every micro-batch it yields,
#: one JSON line per micro-batch, to ``keys_rank{rank}.jsonl``.
KEY_LOG_ENV = "VLMTUNE_KEY_LOG"


@dataclass
class Skipped:
    """A sample that left the pipeline; counted by the main process (worker-side counts would be lost)."""

    dataset: str
    source: str
    reason: str
    detail: str = ""


@dataclass
class StreamState:
    epoch: int = 0
    position: int = 0  # next position in this rank's shard of the epoch
    buffer: list[Key] = field(default_factory=list)
    pending: list[Run] = field(default_factory=list)  # read before the shard (after a re-shard); shrinks


def runs_of(keys: Iterable[Key]) -> list[Run]:
    """``keys`` (in order) as arithmetic runs: a rank's share of an epoch is one or a few runs, so the
    pending list of a re-sharded state stays small in the JSON whatever the dataset's size."""
    runs: list[list[int]] = []  # [epoch, first, count, step] while building
    for epoch, p in keys:
        if runs and runs[-1][0] == epoch:
            _, first, count, step = runs[-1]
            if count == 1 and p > first:
                runs[-1][2:] = [2, p - first]
                continue
            if count > 1 and p == first + count * step:
                runs[-1][2] += 1
                continue
        runs.append([epoch, p, 1, 1])
    return [[e, first, first + (count - 1) * step + 1, step] for e, first, count, step in runs]


def keys_of(runs: Iterable[Run]) -> Iterator[Key]:
    for epoch, start, stop, step in runs:
        for p in range(start, stop, step):
            yield epoch, p


def reshard(states: Sequence[dict], epoch_size: Callable[[int], int], world_size: int) -> list[dict]:
    """The stream states of ``world_size`` new ranks from the saved states of the old ranks (rank order).

    What old rank r has consumed is its reads (its pending runs, then its shard ``r, r+W, ...`` of each
    epoch up to its position) minus its buffer; everything else up to the end of the latest epoch any old
    rank has read from is pending: the buffers, the unread pending runs and each shard's remainder. The
    pending keys, in the epochs' global order, are dealt round-robin (key i to new rank i mod
    ``world_size``); after them every new rank shards the next epoch as usual. The new states are
    ordinary states: they re-shard again the same way. Without packing and with the global batch kept,
    step t of the resumed run draws the same samples as step t of a run on ``world_size`` ranks throughout.
    """
    old = len(states)
    last = max(s["epoch"] for s in states)
    if all(s["epoch"] == last and s["position"] == 0 for s in states):
        last -= 1  # no rank has read from it yet: it is sharded as usual
    # each size once: an epoch's size may mean building its index (the runner's SampleLoader keeps one)
    sizes = {e: epoch_size(e) for e in range(min(s["epoch"] for s in states), last + 1)}
    pending: list[Key] = []
    for rank, s in enumerate(states):
        pending += [tuple(k) for k in s["buffer"]]
        pending += keys_of(s.get("pending", []))
        for epoch in range(s["epoch"], last + 1):
            shard = range(rank, sizes[epoch], old)[s["position"] if epoch == s["epoch"] else 0 :]
            pending += ((epoch, p) for p in shard)
    order = sorted(pending)
    repeated = next((a for a, b in zip(order, order[1:]) if a == b), None)
    if repeated is not None:
        raise ValueError(f"saved stream states are inconsistent: key {repeated} is pending on two ranks")
    return [
        {"epoch": last + 1, "position": 0, "buffer": [], "pending": runs_of(order[r::world_size])}
        for r in range(world_size)
    ]


class _KeyedSamples(torch.utils.data.Dataset):
    """Map-style view over keys so that DataLoader workers can process samples ahead, in order."""

    def __init__(self, keys: Sequence[Key], load: Callable[[Key], Any]) -> None:
        self.keys, self.load = keys, load

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Any:
        return self.load(self.keys[i])


class MicroBatchStream:
    """Endless (epochs cycle) stream of micro-batches for one data-parallel rank."""

    def __init__(
        self,
        epoch_size: Callable[[int], int],
        load: Callable[[Key], dict | Skipped],
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        packing: bool,
        max_tokens: int,
        max_tiles: int | None,
        buffer_size: int,
        on_skip: Callable[[Skipped], None],
        num_workers: int = 0,
        on_kept: Callable[[], None] = lambda: None,
    ) -> None:
        self.epoch_size, self.load = epoch_size, load
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.packing = micro_batch_size, packing
        self.max_tokens, self.max_tiles, self.buffer_size = max_tokens, max_tiles, buffer_size
        self.on_skip, self.on_kept, self.num_workers = on_skip, on_kept, num_workers
        self.state = StreamState()
        log_dir = os.environ.get(KEY_LOG_ENV)
        self._key_log = Path(log_dir) / f"keys_rank{rank}.jsonl" if log_dir else None
        if self._key_log is not None:
            self._key_log.parent.mkdir(parents=True, exist_ok=True)

    def state_dict(self) -> dict:
        return {
            "epoch": self.state.epoch,
            "position": self.state.position,
            "buffer": [list(k) for k in self.state.buffer],
            "pending": [list(r) for r in self.state.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.state = StreamState(
            state["epoch"],
            state["position"],
            [tuple(k) for k in state["buffer"]],
            [list(r) for r in state.get("pending", [])],  # absent in states saved before re-sharding existed
        )

    def _shard(self, epoch: int) -> list[Key]:
        return [(epoch, p) for p in range(self.rank, self.epoch_size(epoch), self.world_size)]

    def _samples(self) -> Iterator[tuple[Key, dict]]:
        """(key, sample) from the saved position on, through as many epochs as needed; skips counted."""
        while True:
            from_pending = bool(self.state.pending)
            keys = (
                list(keys_of(self.state.pending))
                if from_pending
                else self._shard(self.state.epoch)[self.state.position :]
            )
            if not keys and self.state.position == 0:
                raise RuntimeError(f"rank {self.rank}: the dataset is empty for this world size")
            loader = torch.utils.data.DataLoader(
                _KeyedSamples(keys, self.load),
                batch_size=None,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=lambda x: x,
                # its own generator: a DataLoader draws its workers' base seed from the global RNG
                # when iterated, which would shift dropout's random stream after a resume
                generator=torch.Generator().manual_seed(self.state.epoch),
            )
            for key, result in zip(keys, loader):
                if from_pending:
                    self._pop_pending()
                else:
                    self.state.position += 1
                if isinstance(result, Skipped):
                    self.on_skip(result)
                    continue
                self.on_kept()  # with on_skip, every sample's fate (e.g. for a skip ceiling)
                yield key, result
            if not from_pending:
                self.state.epoch += 1
                self.state.position = 0

    def _pop_pending(self) -> None:
        run = self.state.pending[0]
        run[1] += run[3]
        if run[1] >= run[2]:
            self.state.pending.pop(0)

    def _log_keys(self, keys: list[Key]) -> None:
        if self._key_log is not None:
            with open(self._key_log, "a") as f:
                f.write(json.dumps([list(k) for k in keys]) + "\n")

    def __iter__(self) -> Iterator[list[dict]]:
        restored = [(k, self.load(k)) for k in self.state.buffer]  # skips among them were counted before
        buffer = [(k, s) for k, s in restored if not isinstance(s, Skipped)]
        samples = self._samples()
        while True:
            if not self.packing:
                drawn = [next(samples) for _ in range(self.micro_batch_size)]
                self.state.buffer = []
                self._log_keys([k for k, _ in drawn])
                yield [s for _, s in drawn]
                continue
            batch = []
            for _ in range(self.micro_batch_size):
                while len(buffer) < self.buffer_size:
                    buffer.append(next(samples))
                batch.extend(self._take_pack(buffer))
            self.state.buffer = [k for k, _ in buffer]
            self._log_keys([s["index"] for s in batch])
            yield batch

    def _take_pack(self, buffer: list[tuple[Key, dict]]) -> list[dict]:
        for key, sample in buffer:
            sample["index"] = key  # best_fit_pack keeps stream order inside a pack
        items = [s for _, s in buffer]
        pack = best_fit_pack(items, self.max_tokens, self.max_tiles)
        taken = {id(s) for s in pack.samples}
        buffer[:] = [(k, s) for k, s in buffer if id(s) not in taken]
        return pack.samples
