"""Meta file validation, lazy jsonl access, repeat_time expansion and the shuffled index."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from vlmtune.data.meta import JsonlFile, MetaError, build_index, expand_repeat, load_meta
from vlmtune.data.report import SkipSample


def write_meta(tmp: Path, entries: dict) -> Path:
    path = tmp / "meta.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    (tmp_path / "ann").mkdir()
    path = tmp_path / "ann" / "a.jsonl"
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(10)))
    return path


def test_relative_paths_resolve_against_meta_dir(tmp_path, jsonl):
    meta = write_meta(tmp_path, {"a": {"root": "imgs", "annotation": "ann/a.jsonl", "repeat_time": 0.5}})
    with pytest.raises(MetaError, match=r"'a': root directory not found: .*imgs"):
        load_meta(meta)  # a typo in root is refused at start, not skipped image by image
    (tmp_path / "imgs").mkdir()
    [spec] = load_meta(meta)
    assert spec.annotation == jsonl
    assert spec.root == tmp_path / "imgs"
    assert spec.repeat_time == 0.5 and spec.max_dynamic_patch is None and spec.data_augment is False
    assert spec.num_records == 10


def test_null_root_is_meta_dir_and_known_keys_accepted(tmp_path, jsonl):
    entry = {
        "root": None,
        "annotation": str(jsonl),
        "repeat_time": 2,
        "max_dynamic_patch": 6,
        "data_augment": True,
        "length": 10,
    }
    [spec] = load_meta(write_meta(tmp_path, {"b": entry}))
    assert spec.root == tmp_path and spec.max_dynamic_patch == 6 and spec.data_augment and spec.length == 10


def test_length_that_disagrees_with_the_annotation_is_refused_at_start(tmp_path, jsonl):
    """InternVL's `length` is the record count: a mismatch (a truncated file) names file, dataset, key."""
    meta = write_meta(tmp_path, {"short": {"annotation": "ann/a.jsonl", "length": 12}})
    with pytest.raises(MetaError) as e:
        load_meta(meta)
    assert str(meta) in str(e.value) and "'short'" in str(e.value) and "'length' is 12" in str(e.value)
    assert "holds 10 records" in str(e.value)


def test_unknown_key_names_file_dataset_and_key(tmp_path, jsonl):
    meta = write_meta(
        tmp_path,
        {"good": {"annotation": "ann/a.jsonl"}, "typo": {"annotation": "ann/a.jsonl", "repeat_tme": 1}},
    )
    with pytest.raises(MetaError) as e:
        load_meta(meta)
    assert str(meta) in str(e.value) and "'typo'" in str(e.value) and "'repeat_tme'" in str(e.value)


def test_missing_files_fail_at_start(tmp_path):
    with pytest.raises(MetaError, match="meta file not found"):
        load_meta(tmp_path / "nope.json")
    meta = write_meta(tmp_path, {"a": {"annotation": "missing.jsonl"}})
    with pytest.raises(MetaError, match=r"dataset 'a': annotation file not found: .*missing.jsonl"):
        load_meta(meta)


@pytest.mark.parametrize("entry", [{"repeat_time": -1}, {"max_dynamic_patch": 0}, {"data_augment": "yes"}])
def test_bad_values_fail_at_start(tmp_path, jsonl, entry):
    with pytest.raises(MetaError, match="dataset 'a'"):
        load_meta(write_meta(tmp_path, {"a": {"annotation": "ann/a.jsonl", **entry}}))


def test_jsonl_reads_lines_lazily_and_reports_file_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(
        '{"a": 1}\n\n{"a": 2\n[1, 2]\n{"a": "\u00e9"}'
    )  # blank line, bad json, non-object, no final \n
    jf = JsonlFile(path)
    assert jf.num_records == 4
    assert [jf.line_number(k) for k in range(4)] == [1, 3, 4, 5]
    assert jf.read(0) == {"a": 1} and jf.read(3) == {"a": "\u00e9"}
    with pytest.raises(SkipSample) as e:
        jf.read(1)
    assert e.value.reason == "malformed_json" and f"{path}:3" in e.value.detail
    with pytest.raises(SkipSample, match=f"{path}:4"):
        jf.read(2)


@pytest.mark.parametrize(
    ("n", "repeat", "expected_len"),
    [(10, 1, 10), (10, 0.3, 3), (100, 0.29, 29), (10, 2, 20), (10, 2.5, 25), (7, 0, 0)],
)
def test_expand_repeat_counts(n, repeat, expected_len):
    out = expand_repeat(n, repeat, random.Random(0))
    assert len(out) == expected_len
    counts = Counter(out)
    whole = int(repeat)
    # every line exactly `whole` times, plus the fractional subset once more, with no duplicates in it
    assert all(whole <= counts[i] <= whole + 1 for i in range(n))
    assert sum(c - whole for c in counts.values() if c > whole) == expected_len - whole * n


def test_expand_repeat_subset_is_seeded_and_not_the_file_head():
    a = expand_repeat(1000, 0.1, random.Random(1))
    assert a == expand_repeat(1000, 0.1, random.Random(1))
    assert a != expand_repeat(1000, 0.1, random.Random(2))
    assert a != list(range(100))


def test_build_index_mixes_datasets_with_repeats(tmp_path, jsonl):
    meta = write_meta(
        tmp_path,
        {
            "a": {"annotation": "ann/a.jsonl", "repeat_time": 2},
            "b": {"annotation": "ann/a.jsonl", "repeat_time": 0.5},
        },
    )
    specs = load_meta(meta)
    index = build_index(specs, seed=3)
    assert Counter(ds for ds, _ in index) == {0: 20, 1: 5}
    assert sorted(line for ds, line in index if ds == 0) == sorted(list(range(10)) * 2)
    assert index == build_index(specs, seed=3)
    assert index != build_index(specs, seed=4)


def test_mixture_keys_accepted(tmp_path, jsonl):
    meta = write_meta(
        tmp_path,
        {
            "t": {"annotation": "ann/a.jsonl", "supervision": "all", "weight": 0.4},
            "c": {"annotation": "ann/a.jsonl", "supervision": "assistant", "weight": 3},
        },
    )
    t, c = load_meta(meta)
    assert (t.supervision, t.weight, c.supervision, c.weight) == ("all", 0.4, "assistant", 3.0)
    assert t.samples_per_epoch is None  # set only by data.mixture from the weights
    [plain] = load_meta(write_meta(tmp_path, {"p": {"annotation": "ann/a.jsonl"}}))
    assert plain.supervision is None and plain.weight is None


@pytest.mark.parametrize(
    "entry, key",
    [
        ({"supervision": "everything"}, "'supervision'"),
        ({"supervision": True}, "'supervision'"),
        ({"weight": 0}, "'weight'"),
        ({"weight": -0.5}, "'weight'"),
        ({"weight": "40%"}, "'weight'"),
    ],
)
def test_bad_mixture_values_name_file_dataset_and_key(tmp_path, jsonl, entry, key):
    meta = write_meta(
        tmp_path, {"ok": {"annotation": "ann/a.jsonl"}, "bad": {"annotation": "ann/a.jsonl", **entry}}
    )
    with pytest.raises(MetaError) as e:
        load_meta(meta)
    assert str(meta) in str(e.value) and "dataset 'bad'" in str(e.value) and key in str(e.value)


def test_weights_on_every_dataset_or_none(tmp_path, jsonl):
    meta = write_meta(
        tmp_path, {"a": {"annotation": "ann/a.jsonl", "weight": 1}, "b": {"annotation": "ann/a.jsonl"}}
    )
    with pytest.raises(MetaError) as e:
        load_meta(meta)
    assert (
        str(meta) in str(e.value) and "dataset 'b'" in str(e.value) and "'weight' is missing" in str(e.value)
    )
