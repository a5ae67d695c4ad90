"""This rank's resumable stream of micro-batches: shard -> process (optionally in workers) -> pack.

Why a stream of its own rather than a DataLoader alone: a killed run must resume on the exact
sample it stopped at, with the packing buffer as it was. The state is three numbers and a list
(epoch, position in this rank's shard, the keys held in the packing buffer); every sample is a
pure function of its key (its augmentation RNG is seeded from it), so resuming re-creates the
buffer by processing those keys again. Workers may run ahead; only what the packer consumed
counts as consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmtune.data.packing import best_fit_pack

Key = tuple[int, int]  # (epoch, position in the epoch's global index)


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

    def state_dict(self) -> dict:
        return {
            "epoch": self.state.epoch,
            "position": self.state.position,
            "buffer": [list(k) for k in self.state.buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        self.state = StreamState(state["epoch"], state["position"], [tuple(k) for k in state["buffer"]])

    def _shard(self, epoch: int) -> list[Key]:
        return [(epoch, p) for p in range(self.rank, self.epoch_size(epoch), self.world_size)]

    def _samples(self) -> Iterator[tuple[Key, dict]]:
        """(key, sample) from the saved position on, through as many epochs as needed; skips counted."""
        while True:
            keys = self._shard(self.state.epoch)[self.state.position :]
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
                self.state.position += 1
                if isinstance(result, Skipped):
                    self.on_skip(result)
                    continue
                self.on_kept()  # with on_skip, every sample's fate (e.g. for a skip ceiling)
                yield key, result
            self.state.epoch += 1
            self.state.position = 0

    def __iter__(self) -> Iterator[list[dict]]:
        restored = [(k, self.load(k)) for k in self.state.buffer]  # skips among them were counted before
        buffer = [(k, s) for k, s in restored if not isinstance(s, Skipped)]
        samples = self._samples()
        while True:
            if not self.packing:
                batch = [s for _, s in (next(samples) for _ in range(self.micro_batch_size))]
                self.state.buffer = []
                yield batch
                continue
            batch = []
            for _ in range(self.micro_batch_size):
                while len(buffer) < self.buffer_size:
                    buffer.append(next(samples))
                batch.extend(self._take_pack(buffer))
            self.state.buffer = [k for k, _ in buffer]
            yield batch

    def _take_pack(self, buffer: list[tuple[Key, dict]]) -> list[dict]:
        for key, sample in buffer:
            sample["index"] = key  # best_fit_pack keeps stream order inside a pack
        items = [s for _, s in buffer]
        pack = best_fit_pack(items, self.max_tokens, self.max_tiles)
        taken = {id(s) for s in pack.samples}
        buffer[:] = [(k, s) for k, s in buffer if id(s) not in taken]
        return pack.samples
