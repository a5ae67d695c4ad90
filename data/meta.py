"""InternVL's meta file (datasets -> jsonl annotations) and lazy access to the jsonl lines.

The meta file is the one InternVL's `internvl_chat/shell/data/*.json` use::

    {"name": {"root": "images/", "annotation": "train.jsonl", "repeat_time": 1,
              "max_dynamic_patch": 6, "data_augment": false, "length": 1000}}

Two keys of our own drive pre-training mixtures (InternVL3's native multimodal pre-training,
text corpora next to multimodal data): ``supervision`` (``"all"``: every text token is a target,
``"assistant"``: assistant turns only; default by record kind, see data/dataset.py) and ``weight``
(the dataset's target share of the *tokens* of an epoch; see data/mixture.py).

An entry may name a Hugging Face dataset instead of a jsonl file (data/hf_dataset.py reads it)::

    {"name": {"hf_dataset": "sets/llava_mix", "split": "train",
              "columns": {"conversations": "messages", "image": "images"},
              "root": "images/", "repeat_time": 1}}

``hf_dataset`` (instead of ``annotation``): a ``datasets`` ``save_to_disk`` directory (a
``DatasetDict`` or one ``Dataset``) or parquet files (one file, or a directory laid out as on the
Hub: ``data/train-00000-of-00002.parquet``, ``train/*.parquet``, ...). ``split``: which split
(may be omitted when there is one; a single saved ``Dataset`` or parquet file is ``train`` unless it
was saved with a split name). ``columns``: record field -> column (``conversations``, ``image``,
``video``, ``text``, ``question``, ``chosen``, ``rejected``; a field not named is read from the
column of its own name, ``conversations`` also from ``messages`` and ``image`` from ``images``;
``null`` ignores a column). ``root``: what image/video path columns are relative to (embedded
images need none). Every other key means what it means for jsonl. The path, the split, the named
columns and their types are checked at start; records are read lazily and sourced
``"PATH[split]:row N"``.

Everything that can be checked before training is checked at load time: a missing file or a
misspelt key fails at start with the meta file, dataset and key named, not hours into a run.
Relative ``root``/``annotation``/``hf_dataset`` paths resolve against the meta file's directory (InternVL
resolves them against the working directory; anchoring them to the meta file makes a dataset
directory relocatable).
"""

from __future__ import annotations

import json
import os
import random
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from vlmtune.data.report import SkipSample

#: Keys InternVL's meta files use (internvl_chat/internvl/train/internvl_chat_finetune.py,
#: build_datasets), plus ``min_dynamic_patch`` as the per-dataset twin of ``max_dynamic_patch`` and
#: the mixture keys ``supervision`` and ``weight``, and the Hugging Face dataset keys ``hf_dataset``,
#: ``split`` and ``columns``.
KNOWN_KEYS = frozenset(
    {
        "root",
        "annotation",
        "hf_dataset",
        "split",
        "columns",
        "repeat_time",
        "max_dynamic_patch",
        "min_dynamic_patch",
        "data_augment",
        "length",
        "supervision",
        "weight",
    }
)
#: What a dataset's samples are supervised on: every text token (pre-training), assistant turns (SFT),
#: or assistant turns without their ``<|im_end|>`` (a process reward model's ``+``/``-``, data/prm.py).
SUPERVISIONS = ("all", "assistant", "assistant_content")


class MetaError(ValueError):
    """A start-up error in a meta file: names the file, the dataset and the key at fault."""


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of a meta file, with paths resolved and types checked."""

    name: str
    root: Path
    #: The jsonl file, or the Hugging Face dataset (``hf_dataset``: see ``annotation_format``).
    annotation: Path
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    min_dynamic_patch: int | None = None
    data_augment: bool = False
    length: int | None = None
    meta_path: Path | None = None
    #: One of SUPERVISIONS, or None (by record kind: text records "all", conversations "assistant").
    supervision: str | None = None
    #: Target share of an epoch's tokens (relative to the other datasets' weights); None: repeat_time alone.
    weight: float | None = None
    #: Samples this dataset gives an epoch, set from the weights by `data.mixture.apply_mixture`
    #: (not a meta key); None: ``repeat_time`` decides.
    samples_per_epoch: int | None = None
    #: What ``annotation`` is: "jsonl", or a Hugging Face dataset ("arrow": save_to_disk, "parquet").
    annotation_format: str = "jsonl"
    #: The Hugging Face dataset's split (resolved at load time); None for jsonl.
    split: str | None = None
    #: The meta entry's ``columns`` as sorted (field, column or None) pairs (hashable, picklable).
    columns: tuple[tuple[str, str | None], ...] = ()

    @property
    def num_records(self) -> int:
        """Records in the annotation (non-blank jsonl lines, or dataset rows; indexed once, cached)."""
        return record_source(self).num_records


def _resolve(base: Path, value: str | None) -> Path:
    if value is None or value == "":
        return base
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _number(meta: Path, name: str, key: str, value: Any, kind: type, minimum: float) -> Any:
    ok_types = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, ok_types) or value < minimum:
        raise MetaError(
            f"{meta}: dataset {name!r}: {key!r} must be a {kind.__name__} >= {minimum}, got {value!r}"
        )
    return kind(value)


def parse_entry(meta: Path, name: str, entry: Any) -> DatasetSpec:
    """Validate one meta entry (pure apart from the existence check of the annotation file)."""
    if not isinstance(entry, dict):
        raise MetaError(f"{meta}: dataset {name!r}: entry must be an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - KNOWN_KEYS)
    if unknown:
        raise MetaError(
            f"{meta}: dataset {name!r}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(KNOWN_KEYS))})"
        )
    if "annotation" in entry and "hf_dataset" in entry:
        raise MetaError(f"{meta}: dataset {name!r}: 'annotation' and 'hf_dataset': an entry names one")
    hf = "hf_dataset" in entry
    key = "hf_dataset" if hf else "annotation"
    if key not in entry or not isinstance(entry[key], str):
        raise MetaError(
            f"{meta}: dataset {name!r}: 'annotation' (path to a .jsonl file) or 'hf_dataset' (a datasets "
            "save_to_disk directory or parquet files) is required"
        )
    if not hf and ("split" in entry or "columns" in entry):
        extra = "split" if "split" in entry else "columns"
        raise MetaError(f"{meta}: dataset {name!r}: {extra!r} applies to 'hf_dataset' entries only")
    base = meta.parent
    root = entry.get("root")
    if root is not None and not isinstance(root, str):
        raise MetaError(f"{meta}: dataset {name!r}: 'root' must be a string path or null, got {root!r}")
    if root is not None and not _resolve(base, root).is_dir():
        # a typo here would otherwise skip every image as missing_image, hours into the run
        raise MetaError(
            f"{meta}: dataset {name!r}: root directory not found: {_resolve(base, root)} "
            "(image and video paths resolve against it; null for the meta file's directory)"
        )
    annotation = _resolve(base, entry[key])
    hf_fields: dict[str, Any] = {}
    if hf:
        hf_fields = _parse_hf(meta, name, annotation, entry)
    elif not annotation.is_file():
        raise MetaError(f"{meta}: dataset {name!r}: annotation file not found: {annotation}")
    augment = entry.get("data_augment", False)
    if not isinstance(augment, bool):
        raise MetaError(f"{meta}: dataset {name!r}: 'data_augment' must be true/false, got {augment!r}")
    supervision = entry.get("supervision")
    if supervision is not None and supervision not in SUPERVISIONS:
        raise MetaError(
            f"{meta}: dataset {name!r}: 'supervision' must be one of {', '.join(map(repr, SUPERVISIONS))} "
            f"(or absent: text records 'all', conversations 'assistant'), got {supervision!r}"
        )
    weight = entry.get("weight")
    if weight is not None:
        weight = _number(meta, name, "weight", weight, float, 0.0)
        if weight <= 0:
            raise MetaError(
                f"{meta}: dataset {name!r}: 'weight' must be > 0 (leave the dataset out to drop it), got {weight}"
            )
    optional_int = {}
    for key in ("max_dynamic_patch", "min_dynamic_patch", "length"):
        value = entry.get(key)
        optional_int[key] = (
            None if value is None else _number(meta, name, key, value, int, 0 if key == "length" else 1)
        )
    spec = DatasetSpec(
        name=name,
        root=_resolve(base, root),
        annotation=annotation,
        repeat_time=_number(meta, name, "repeat_time", entry.get("repeat_time", 1.0), float, 0.0),
        data_augment=augment,
        meta_path=meta,
        supervision=supervision,
        weight=weight,
        **hf_fields,
        **optional_int,
    )
    # InternVL's `length` is the annotation's number of records: one that disagrees means the file was
    # truncated or is not the one meant, which is cheaper to learn now than from the loss curve.
    if spec.length is not None and spec.num_records != spec.length:
        raise MetaError(
            f"{meta}: dataset {name!r}: 'length' is {spec.length} but {annotation} holds "
            f"{spec.num_records} records (fix or drop 'length')"
        )
    return spec


def _parse_hf(meta: Path, name: str, path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """The `DatasetSpec` fields of an ``hf_dataset`` entry, after opening it: path, split, columns checked."""
    from vlmtune.data.hf_dataset import hf_records

    split, columns = entry.get("split"), entry.get("columns", {})
    if split is not None and not isinstance(split, str):
        raise MetaError(f"{meta}: dataset {name!r}: 'split' must be a string, got {split!r}")
    if not isinstance(columns, dict) or not all(isinstance(c, str) or c is None for c in columns.values()):
        raise MetaError(
            f"{meta}: dataset {name!r}: 'columns' must map record fields to column names (or null), "
            f"got {columns!r}"
        )
    pairs = tuple(sorted(columns.items()))
    try:
        records = hf_records(path, split, pairs)
    except (OSError, ValueError) as e:  # HFDatasetError, and what datasets / pyarrow raise on a broken file
        raise MetaError(f"{meta}: dataset {name!r}: {e}") from e
    return {"annotation_format": records.format, "split": records.split, "columns": pairs}


def load_meta(path: str | Path) -> list[DatasetSpec]:
    """Read and validate an InternVL meta JSON; raises `MetaError` naming file, dataset and key."""
    meta = Path(path).absolute()
    if not meta.is_file():
        raise MetaError(f"meta file not found: {meta}")
    try:
        entries = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MetaError(f"{meta}:{e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(entries, dict) or not entries:
        raise MetaError(f"{meta}: expected a non-empty object {{dataset name: entry}}")
    specs = [parse_entry(meta, name, entry) for name, entry in entries.items()]
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        missing = specs[weighted.index(False)].name
        raise MetaError(
            f"{meta}: dataset {missing!r}: 'weight' is missing; give every dataset a weight (token shares) or none"
        )
    return specs


class RecordSource(Protocol):
    """Lazy, random access to a dataset's records: what every stage after reading sees of a dataset.

    `JsonlFile` (jsonl lines) and `data.hf_dataset.HFRecords` (Hugging Face dataset rows) are the two;
    `record_source` picks a spec's.
    """

    path: Path

    @property
    def num_records(self) -> int: ...

    def read(self, k: int) -> dict[str, Any]:
        """Record ``k`` as a dict of the jsonl line's shape; raises SkipSample for one that is not."""
        ...

    def source(self, k: int) -> str:
        """Where record ``k`` is (``"file:line"``, ``"PATH[split]:row N"``): what skip logs print."""
        ...


def record_source(spec: DatasetSpec) -> RecordSource:
    """The (cached, per-process) records of ``spec``'s annotation, jsonl or Hugging Face dataset."""
    if spec.annotation_format == "jsonl":
        return jsonl_file(spec.annotation)
    from vlmtune.data.hf_dataset import hf_records

    return hf_records(spec.annotation, spec.split, spec.columns)


class JsonlFile:
    """Random access to the records of a jsonl file without loading or parsing it.

    The byte offsets of the non-blank lines are indexed once (no JSON parsing, so indexing a
    multi-GB annotation takes seconds); ``read(k)`` parses record k on demand. Reads use
    ``os.pread`` on a per-process descriptor, so forked dataloader workers never share a file
    position.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._starts = array("q")
        self._ends = array("q")
        self._line_numbers = array("q")  # 1-based line in the file
        pos = 0
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    self._starts.append(pos)
                    self._ends.append(pos + len(raw))
                    self._line_numbers.append(line_no)
                pos += len(raw)
        self._fd: int | None = None
        self._pid: int | None = None

    @property
    def num_records(self) -> int:
        return len(self._starts)

    def line_number(self, k: int) -> int:
        """1-based line in the file of record ``k``."""
        return self._line_numbers[k]

    def source(self, k: int) -> str:
        """``"file:line"`` of record ``k``: what skip logs and error messages print."""
        return f"{self.path}:{self._line_numbers[k]}"

    def read_raw(self, k: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start = self._starts[k]
        return os.pread(self._fd, self._ends[k] - start, start)

    def read(self, k: int) -> dict[str, Any]:
        """Parse record ``k``; a line that is not a JSON object raises SkipSample("malformed_json")."""
        raw = self.read_raw(k)
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkipSample("malformed_json", f"{self.source(k)}: {e}") from e
        if not isinstance(record, dict):
            raise SkipSample(
                "malformed_json", f"{self.source(k)}: expected a JSON object, got {type(record).__name__}"
            )
        return record

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


@lru_cache(maxsize=256)
def jsonl_file(path: Path) -> JsonlFile:
    """The (cached) `JsonlFile` for ``path``, so each annotation is indexed once per process."""
    return JsonlFile(path)


def expand_repeat(num_lines: int, repeat_time: float, rng: random.Random) -> list[int]:
    """Line indices a dataset contributes to one pass, following InternVL's ``repeat_time``.

    ``repeat_time = w + f`` (whole part w, fraction f): every line ``w`` times, plus a seeded
    random subset of ``int(f * num_lines)`` distinct lines. So 0.25 keeps a random quarter and
    2.5 gives two full copies and a random half. InternVL itself keeps the *first* fraction of
    the file and only allows integer repeats above 1; a random subset avoids biasing towards
    whatever order the annotation file was written in.
    """
    if repeat_time < 0:
        raise ValueError(f"repeat_time must be >= 0, got {repeat_time}")
    whole = int(repeat_time)
    extra = int((repeat_time - whole) * num_lines + 1e-6)
    indices = [i for _ in range(whole) for i in range(num_lines)]
    indices += sorted(rng.sample(range(num_lines), extra))
    return indices


def expand_count(num_lines: int, count: int, rng: random.Random) -> list[int]:
    """Exactly ``count`` line indices: ``count // num_lines`` full copies plus a seeded random subset
    of ``count % num_lines`` distinct lines (`expand_repeat` with an integer target, no rounding)."""
    if count < 0 or (count and num_lines <= 0):
        raise ValueError(f"cannot draw {count} samples from {num_lines} lines")
    whole, extra = divmod(count, num_lines) if num_lines else (0, 0)
    return [i for _ in range(whole) for i in range(num_lines)] + sorted(rng.sample(range(num_lines), extra))


def build_index(specs: list[DatasetSpec], seed: int) -> list[tuple[int, int]]:
    """The epoch's sample order: ``(dataset index, record index)`` pairs, shuffled with ``seed``.

    Each dataset's subsample draws from its own RNG (seed, dataset position), so adding a
    dataset to the meta file does not change which lines the others contribute. A dataset's
    ``samples_per_epoch`` (set from mixture weights) wins over its ``repeat_time``.
    """
    index: list[tuple[int, int]] = []
    for ds, spec in enumerate(specs):
        rng = random.Random(f"{seed}:{ds}:{spec.name}")
        if spec.samples_per_epoch is not None:
            lines = expand_count(spec.num_records, spec.samples_per_epoch, rng)
        else:
            lines = expand_repeat(spec.num_records, spec.repeat_time, rng)
        index.extend((ds, line) for line in lines)
    random.Random(seed).shuffle(index)
    return index
