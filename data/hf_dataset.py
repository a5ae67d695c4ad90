"""Hugging Face datasets (``save_to_disk`` directories, parquet files) as the records of a meta entry.

Many SFT and preference sets are published as Hugging Face datasets rather than InternVL jsonl. A
meta entry naming ``hf_dataset`` (see data/meta.py) is read here, lazily: a ``save_to_disk``
directory through ``datasets.load_from_disk`` (memory-mapped arrow), parquet through pyarrow (the
footer at start, then one row group per read, the last few cached). Nothing is decoded at start;
the start-up checks read the schema only.

Each row becomes the dict a jsonl line would have been (`HFRecords.read`), so everything after
reading (validation, media, tiling, tokenising, skip accounting, ``repeat_time``, the seeded index,
`vlmtune check-data`, MPO pairs) is the jsonl path itself. Columns map to record fields:

- ``conversations``: a list of InternVL turns ``{"from", "value"}`` or of chat messages
  ``{"role", "content"}`` (roles user -> human, assistant -> gpt, system -> system; a content
  list of parts becomes text with ``<image>\\n``/``<video>\\n`` where its image/video parts are, as
  InternVL3-hf's chat template renders them).
- ``image``: paths (relative to ``root``), or bytes / ``datasets.Image`` (embedded bytes, else its
  path): one or a list. Embedded bytes become `EmbeddedImage` strings, decoded with the sample.
- ``video``: a path (relative to ``root``); ``text``, ``question``, ``chosen``, ``rejected``: strings.

A field not named in ``columns`` is read from the column of its own name (``conversations`` also
from ``messages``, ``image`` from ``images``); naming a field ``null`` ignores that column. A null
cell leaves its field out of the record. Records are sourced ``"PATH[split]:row N"`` (N 0-based,
``dataset[split][N]`` in ``datasets``).

Parquet has no row-level random access: a read costs its row group (the last two are kept per
process, so memory is about two row groups a worker; a row group over 512 MiB is warned about).
Shuffled reads of 2,000 rows of 20 KB images took ~40 us a record from ``save_to_disk``, ~0.4 ms
from parquet in 100-row groups (jsonl: ~4 us), small next to decoding and tiling the image; for
large embedded-image sets in big row groups, a ``save_to_disk`` copy
(``load_dataset("parquet", ...).save_to_disk``) reads one row instead.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pyarrow as pa

from vlmtune.data.media import EmbeddedImage
from vlmtune.data.report import SkipSample

log = logging.getLogger("vlmtune")

#: Record fields a column can feed, and the columns each is read from when ``columns`` does not say.
FIELDS: dict[str, tuple[str, ...]] = {
    "conversations": ("conversations", "messages"),
    "image": ("image", "images"),
    "video": ("video",),
    "text": ("text",),
    "question": ("question",),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
}
#: Chat-message roles -> InternVL's turn names.
ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
#: What a content part of each type becomes in InternVL's turn text.
PART_TEXT = {"image": "<image>\n", "video": "<video>\n"}


class HFDatasetError(ValueError):
    """A dataset that cannot be read as asked (path, split, column); data/meta.py adds the meta file."""


# -------------------------------------------------------------------------------- arrow types


def _is(kind: str, t: pa.DataType) -> bool:
    """Whether arrow type ``t`` is a string / binary / list / struct / null (large variants included)."""
    checks = {
        "string": (pa.types.is_string, pa.types.is_large_string),
        "binary": (pa.types.is_binary, pa.types.is_large_binary),
        "list": (pa.types.is_list, pa.types.is_large_list),
        "struct": (pa.types.is_struct,),
        "null": (pa.types.is_null,),
    }
    return any(check(t) for check in checks[kind])


def _struct_fields(t: pa.DataType) -> set[str]:
    return {t.field(i).name for i in range(t.num_fields)}


def _is_image_cell(t: pa.DataType) -> bool:
    """A path, bytes, or ``datasets.Image``'s storage ``struct<bytes, path>``."""
    return (
        _is("string", t) or _is("binary", t) or (_is("struct", t) and _struct_fields(t) >= {"bytes", "path"})
    )


def check_column_type(field: str, column: str, t: pa.DataType) -> None:
    """Refuse, at start, a column whose arrow type cannot hold ``field``; names what was expected."""
    if _is("null", t):  # every cell null: the field is simply absent
        return
    if field == "conversations":
        turn = t.value_type if _is("list", t) else None
        if turn is not None and _is("struct", turn):
            keys = _struct_fields(turn)
            if keys >= {"from", "value"} or keys >= {"role", "content"}:
                return
            found = f"a list of {{{', '.join(sorted(keys))}}}"
        else:
            found = str(t)
        raise HFDatasetError(
            f"column {column!r} (conversations): expected a list of InternVL turns {{from, value}} or of "
            f"chat messages {{role, content}}, found {found}"
        )
    if field == "image":
        if _is_image_cell(t) or (_is("list", t) and _is_image_cell(t.value_type)):
            return
        raise HFDatasetError(
            f"column {column!r} (image): expected paths, bytes or datasets.Image (one or a list), found {t}"
        )
    if not _is("string", t):
        what = (
            "a path relative to root (embedded videos are not supported)" if field == "video" else "strings"
        )
        raise HFDatasetError(f"column {column!r} ({field}): expected {what}, found {t}")


# ---------------------------------------------------------------------------------------- rows


class _SavedRows:
    """Rows of a ``save_to_disk`` split through ``datasets`` (memory-mapped; forked workers share the map)."""

    def __init__(self, directory: Path) -> None:
        import datasets

        self.dataset = datasets.load_from_disk(str(directory))
        self.schema = self.dataset.data.schema
        self._view: Any = None

    def __len__(self) -> int:
        return len(self.dataset)

    def select(self, columns: list[str]) -> None:
        self._view = self.dataset.select_columns(columns).with_format("arrow")

    def row(self, k: int) -> dict[str, Any]:
        return self._view[k].to_pylist()[0]  # the arrow format: no feature decoding (images stay bytes)


class _ParquetRows:
    """Rows of parquet files through pyarrow: row counts from the footers at start, a row group per read."""

    CACHED_ROW_GROUPS = 2
    LARGE_ROW_GROUP = 512 << 20

    def __init__(self, files: list[Path]) -> None:
        import pyarrow.parquet as pq

        self.files = files
        self._groups: list[tuple[int, int]] = []  # (file, row group) in row order
        self._starts: list[int] = []
        total = 0
        schema = None
        for f, path in enumerate(files):
            meta = pq.read_metadata(path)
            file_schema = meta.schema.to_arrow_schema()
            if schema is None:
                schema = file_schema
            elif set(file_schema.names) != set(schema.names):
                raise HFDatasetError(
                    f"{path}: columns {sorted(file_schema.names)} differ from {files[0]}'s {sorted(schema.names)}"
                )
            for g in range(meta.num_row_groups):
                self._groups.append((f, g))
                self._starts.append(total)
                total += meta.row_group(g).num_rows
            largest = max((meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)), default=0)
            if largest > self.LARGE_ROW_GROUP:
                log.warning(
                    "%s: a row group of %d MiB is read (and cached, two per process) for every record in "
                    "it; a save_to_disk copy reads one row",
                    path,
                    largest >> 20,
                )
        self.schema = schema
        self._len = total
        self._columns: list[str] = []
        self._open: dict[int, Any] = {}
        self._pid: int | None = None
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return self._len

    def select(self, columns: list[str]) -> None:
        self._columns = columns

    def _group(self, i: int) -> Any:
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a forked worker opens its own files (no shared positions)
            self._open, self._cache, self._pid = {}, OrderedDict(), os.getpid()
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        f, g = self._groups[i]
        if f not in self._open:
            self._open[f] = pq.ParquetFile(self.files[f])
        table = self._open[f].read_row_group(g, columns=self._columns)
        self._cache[i] = table
        if len(self._cache) > self.CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return table

    def row(self, k: int) -> dict[str, Any]:
        i = bisect.bisect_right(self._starts, k) - 1
        return self._group(i).slice(k - self._starts[i], 1).to_pylist()[0]


def _open_saved(path: Path, split: str | None) -> tuple[_SavedRows, str]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split is None and len(splits) > 1:
            raise HFDatasetError(f"{path} has splits {', '.join(splits)}: name one with 'split'")
        split = splits[0] if split is None else split
        if split not in splits:
            raise HFDatasetError(f"{path} has no split {split!r} (splits: {', '.join(splits)})")
        return _SavedRows(path / split), split
    rows = _SavedRows(path)
    own = str(rows.dataset.split) if rows.dataset.split is not None else "train"
    if split is not None and split != own:
        raise HFDatasetError(
            f"{path} is one saved Dataset, split {own!r}, and has no split {split!r} (splits: {own})"
        )
    return rows, own


def _parquet_splits(path: Path) -> dict[str, list[Path]]:
    """Split -> files under a directory, by the Hub's own naming rules (``data/train-00000-of-00002.parquet``,
    ``train/*.parquet``, ...; files matching none are ``train``), as ``load_dataset`` resolves them."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    patterns = get_data_patterns(str(path))
    found = DataFilesDict.from_patterns(patterns, base_path=str(path))
    splits = {
        str(name): sorted(Path(f) for f in files if f.endswith(".parquet")) for name, files in found.items()
    }
    return {name: files for name, files in splits.items() if files}


def _open_parquet(path: Path, split: str | None) -> tuple[_ParquetRows, str]:
    if path.is_file():
        if split not in (None, "train"):
            raise HFDatasetError(f"{path} is one parquet file, split 'train', and has no split {split!r}")
        return _ParquetRows([path]), "train"
    splits = _parquet_splits(path)
    if split is None and len(splits) > 1:
        raise HFDatasetError(f"{path} has splits {', '.join(splits)}: name one with 'split'")
    split = next(iter(splits)) if split is None else split
    if split not in splits:
        raise HFDatasetError(f"{path} has no split {split!r} (splits: {', '.join(splits)})")
    return _ParquetRows(splits[split]), split


def dataset_format(path: Path) -> str:
    """``"arrow"`` (a ``save_to_disk`` directory) or ``"parquet"`` (a file, or a directory of them)."""
    if not path.exists():
        raise HFDatasetError(f"dataset not found: {path}")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return "arrow"
    if (path.is_file() and path.suffix == ".parquet") or (path.is_dir() and any(path.rglob("*.parquet"))):
        return "parquet"
    raise HFDatasetError(
        f"{path}: neither a datasets save_to_disk directory (dataset_dict.json or state.json) nor parquet files"
    )


# ------------------------------------------------------------------------------------- records


class HFRecords:
    """The records of one split of a dataset: what `data.meta.JsonlFile` is for a jsonl file.

    ``num_records``, ``read(k)`` (the jsonl-shaped record dict; raises SkipSample) and ``source(k)``
    (``"PATH[split]:row k"``): the `data.meta.RecordSource` interface.
    """

    def __init__(
        self, path: Path, split: str | None = None, columns: tuple[tuple[str, str | None], ...] = ()
    ) -> None:
        self.path = Path(path)
        self.format = dataset_format(self.path)
        opened = _open_saved if self.format == "arrow" else _open_parquet
        self._rows, self.split = opened(self.path, split)
        self.columns = self._resolve_columns(dict(columns))
        self._rows.select(sorted(set(self.columns.values())))

    def _resolve_columns(self, given: dict[str, str | None]) -> dict[str, str]:
        """Field -> column, checked against the schema (names and types) before any row is read."""
        schema = self._rows.schema
        available = list(schema.names)
        unknown = sorted(set(given) - set(FIELDS))
        if unknown:
            raise HFDatasetError(
                f"columns: unknown record field {unknown[0]!r} (fields: {', '.join(FIELDS)})"
            )
        mapping = {}
        for field, defaults in FIELDS.items():
            if field in given:
                column = given[field]
                if column is None:
                    continue
                if column not in available:
                    raise HFDatasetError(
                        f"{self.path}[{self.split}]: no column {column!r} (for {field!r}); "
                        f"columns: {', '.join(available)}"
                    )
            else:
                column = next((c for c in defaults if c in available), None)
                if column is None:
                    continue
            try:
                check_column_type(field, column, schema.field(column).type)
            except HFDatasetError as e:
                raise HFDatasetError(f"{self.path}[{self.split}]: {e}") from None
            mapping[field] = column
        if not {"conversations", "text", "question", "chosen", "rejected"} & set(mapping):
            raise HFDatasetError(
                f"{self.path}[{self.split}]: no column holds conversations (or messages), text or a pair's "
                f"question/chosen/rejected; name them with 'columns' (columns: {', '.join(available)})"
            )
        return mapping

    @property
    def num_records(self) -> int:
        return len(self._rows)

    def source(self, k: int) -> str:
        """``"PATH[split]:row k"``: what skip logs and error messages print."""
        return f"{self.path}[{self.split}]:row {k}"

    def read(self, k: int) -> dict[str, Any]:
        """Row ``k`` as the record dict a jsonl line would give; raises SkipSample naming row and column."""
        row = self._rows.row(k)
        record: dict[str, Any] = {}
        for field, column in self.columns.items():
            value = row[column]
            if value is None:
                continue
            where = f"{self.source(k)}: column {column!r}"
            if field == "conversations":
                value = internvl_turns(value, where)
            elif field == "image":
                value = image_refs(value, f"{self.source(k)}:{column}")
            record[field] = value
        return record


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SkipSample(
            "missing_field" if content is None else "bad_conversation", f"{where}: expected text or parts"
        )
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in PART_TEXT:
            pieces.append(PART_TEXT[kind])
        else:
            raise SkipSample(
                "bad_conversation", f"{where}[{j}]: expected a text, image or video part, got {part!r}"
            )
    return "".join(pieces)


def internvl_turns(turns: Any, where: str) -> list[dict[str, Any]]:
    """InternVL turns ``[{"from", "value"}]`` from either form; ``where`` names row and column in errors.

    InternVL turns pass through (their values are checked by `data.conversation.validate_record`,
    as a jsonl line's are); chat messages are mapped role by role.
    """
    if not isinstance(turns, list):
        raise SkipSample("bad_conversation", f"{where}: expected a list of turns, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SkipSample("bad_conversation", f"{where}[{i}]: expected an object")
        if turn.get("from") is not None or turn.get("value") is not None:
            out.append({key: turn[key] for key in ("from", "value") if turn.get(key) is not None})
        elif turn.get("role") is not None:
            role = ROLES.get(turn["role"])
            if role is None:
                raise SkipSample(
                    "bad_conversation", f"{where}[{i}].role: {turn['role']!r} is not {', '.join(ROLES)}"
                )
            out.append({"from": role, "value": _content_text(turn.get("content"), f"{where}[{i}].content")})
        else:
            raise SkipSample("missing_field", f"{where}[{i}]: neither from/value nor role/content")
    return out


def _image_ref(cell: Any, label: str) -> str:
    if isinstance(cell, dict):  # datasets.Image: bytes when embedded, else a path
        if cell.get("bytes") is not None:
            return EmbeddedImage(label, cell["bytes"])
        return cell.get("path") or EmbeddedImage(label, b"")  # neither: an unreadable image
    if isinstance(cell, bytes):
        return EmbeddedImage(label, cell)
    return "" if cell is None else cell  # a path; "" in a list is refused by validate_media


def image_refs(value: Any, label: str) -> str | list[str]:
    """An image cell as the record's ``image``: a path or an `EmbeddedImage`, or a list of them."""
    if isinstance(value, list):
        return [_image_ref(cell, f"{label}[{i}]") for i, cell in enumerate(value)]
    return _image_ref(value, label)


_opened: dict[tuple[Path, str | None, tuple[tuple[str, str | None], ...]], HFRecords] = {}


def hf_records(path: Path, split: str | None, columns: tuple[tuple[str, str | None], ...] = ()) -> HFRecords:
    """The (cached) `HFRecords` of a split, so each dataset is opened once per process (under the split
    asked for and the one it resolved to: the meta check opens it with ``split`` omitted, training
    with the name it found)."""
    key = (Path(path), split, columns)
    if key not in _opened:
        records = HFRecords(path, split, columns)
        _opened[key] = _opened[(Path(path), records.split, columns)] = records
    return _opened[key]
