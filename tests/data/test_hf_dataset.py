"""Hugging Face datasets as meta entries: each set here has a jsonl twin (the same records as jsonl lines
and image files), and everything downstream of reading must be the twin's, sample for sample."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlmtune.data import hf_dataset
from vlmtune.data.dataset import DataConfig, SampleProcessor, iter_samples, process_position
from vlmtune.data.meta import MetaError, build_index, load_meta, record_source
from vlmtune.data.pairs import PairProcessor
from vlmtune.data.report import SkipReport
from vlmtune.data.stream import Skipped
from vlmtune.data.synthetic import moving_shape_frames, scene, write_video
from vlmtune.train.commands.check_data import main as check_main

TILE, TOKENS = 56, 16
NAME = "twin"  # both metas name the dataset alike: the seeded index depends on the name


def turns(*pairs: str, system: str | None = None) -> list[dict[str, str]]:
    out = [{"from": "system", "value": system}] if system else []
    for i, value in enumerate(pairs):
        out.append({"from": "human" if i % 2 == 0 else "gpt", "value": value})
    return out


#: The SFT records as jsonl lines; row 4's image file holds garbage (corrupt in both twins).
RECORDS = [
    {"image": "images/wide.png", "conversations": turns("<image>\nWhat colour?", "red")},
    {
        "image": ["images/wide.png", "images/small.png"],
        "conversations": turns("Compare.", "same", "Sure?", "yes"),
    },
    {"conversations": turns("Say hi.", "hi", system="Be brief.")},
    {"image": "images/small.png", "conversations": turns("Shape?", "square")},
    {"image": "images/bad.png", "conversations": turns("<image>\nAnd this?", "unknown")},
    {"image": "images/small.png", "conversations": turns("<image>\nCount?", "one", "Colour?", "blue")},
]
BAD_ROW = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Images, a video, and the SFT records' jsonl twin with its meta file."""
    root = tmp_path_factory.mktemp("hf")
    (root / "images").mkdir()
    rng = random.Random(0)
    scene(rng, (150, 200), 2, "circle", "red").save(root / "images/wide.png")
    scene(rng, (40, 50), 1, "square", "blue").save(root / "images/small.png")
    (root / "images/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a png" * 4)
    write_video(root / "clip.mp4", moving_shape_frames(random.Random(1), "green", num_frames=8, size=32))
    write_twin(root, "sft", RECORDS)
    return root


def write_twin(root: Path, name: str, records: list[dict], **entry) -> Path:
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return write_meta(root / f"meta_{name}.json", annotation=f"{name}.jsonl", **entry)


def write_meta(path: Path, **entry) -> Path:
    path.write_text(json.dumps({NAME: {"root": ".", **entry}}))
    return path


def image_list(record: dict) -> list[str]:
    image = record.get("image", [])
    return [image] if isinstance(image, str) else image


def embedded(root: Path, record: dict) -> list[dict]:
    """The record's images as datasets.Image cells holding the files' bytes."""
    return [{"bytes": (root / p).read_bytes(), "path": None} for p in image_list(record)]


def messages(conversation: list[dict], parts: bool = False) -> list[dict]:
    """InternVL turns as chat messages; ``parts``: content as a list, leading ``<image>\\n`` as image parts."""
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    out = []
    for turn in conversation:
        text = turn["value"]
        if not parts:
            out.append({"role": role[turn["from"]], "content": text})
            continue
        content = []
        while text.startswith("<image>\n"):
            content.append({"type": "image", "text": None})
            text = text[len("<image>\n") :]
        content.append({"type": "text", "text": text})
        out.append({"role": role[turn["from"]], "content": content})
    return out


def cfg(meta: Path, **overrides) -> DataConfig:
    base = DataConfig(
        meta_path=str(meta), max_length=4096, image_size=TILE, min_num_frames=4, max_num_frames=4
    )
    for key, value in overrides.items():
        setattr(base, key, value)
    return base


def run_all(meta: Path, tok, processor_cls=SampleProcessor, training: bool = False, seed: int = 0):
    """(index, samples, skip entries) of a whole epoch of ``meta``, in its seeded order."""
    specs = load_meta(meta)
    index = build_index(specs, seed)
    report = SkipReport()
    processor = processor_cls(cfg(meta, seed=seed), tok, TOKENS)
    samples = list(iter_samples(processor, specs, index, 0, report, training=training))
    return index, samples, report.entries


TENSORS = ("input_ids", "labels", "pixel_values")


def assert_same_samples(ours: list[dict], twins: list[dict], keys: tuple[str, ...] = TENSORS) -> None:
    assert len(ours) == len(twins) > 0
    for a, b in zip(ours, twins):
        assert a["index"] == b["index"] and a["num_tiles"] == b["num_tiles"]
        for key in keys:
            assert torch.equal(a[key], b[key]), (key, a["source"], b["source"])


@pytest.fixture(scope="module")
def saved(root) -> Path:
    """A save_to_disk DatasetDict: messages (string content), embedded image bytes; train + test splits."""
    features = datasets.Features(
        {
            "id": datasets.Value("int32"),
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            ),
            "img": datasets.List(datasets.Image()),
        }
    )
    rows = {
        "id": list(range(len(RECORDS))),
        "messages": [messages(r["conversations"]) for r in RECORDS],
        "img": [embedded(root, r) for r in RECORDS],
    }
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": train, "test": train.select([0, 1])}).save_to_disk(str(root / "saved"))
    return write_meta(
        root / "meta_saved.json",
        hf_dataset="saved",
        split="train",
        columns={"conversations": "messages", "image": "img"},
        repeat_time=2.5,
    )


def test_saved_dataset_gives_the_jsonl_twins_samples_index_and_skips(root, saved, tok):
    """messages-form conversations + embedded bytes = InternVL jsonl + image files, with repeat_time 2.5:
    the same seeded index, the same tensors at every position (training: augmentation RNG included),
    and the corrupt image skipped at the same positions, sourced by its row."""
    twin = write_twin(root, "sft_rep", RECORDS, repeat_time=2.5, data_augment=True)
    saved_aug = write_meta(
        root / "meta_saved_aug.json", **{**json.loads(saved.read_text())[NAME], "data_augment": True}
    )
    index, ours, skips = run_all(saved_aug, tok, training=True, seed=3)
    twin_index, twins, twin_skips = run_all(twin, tok, training=True, seed=3)
    assert index == twin_index and len(index) == 15  # 2 copies of 6 + a seeded half
    assert_same_samples(ours, twins)
    assert {s["kind"] for s in ours} == {"conversation"} and any(s["num_tiles"] > 2 for s in ours)
    assert [e["reason"] for e in skips] == [e["reason"] for e in twin_skips] == ["corrupt_image"] * len(skips)
    assert len(skips) == sum(1 for _, k in index if k == BAD_ROW) >= 2
    assert {e["file"] for e in skips} == {f"{root / 'saved'}[train]:row {BAD_ROW}"}
    assert {e["line"] for e in twin_skips} == {BAD_ROW + 1}
    assert "row 4:img[0]" in skips[0]["detail"]  # the image named by row and column
    assert ours[0]["source"] == f"{root / 'saved'}[train]:row {index[ours[0]['index']][1]}"


def test_token_counts_and_mixture_estimate_equal_the_twin(root, saved, tok):
    """`count_tokens` (image headers only, from the embedded bytes) and the mixture's mean-length
    estimate are the twin's, so `weight` plans the same epoch."""
    from vlmtune.data.mixture import estimate_mean_tokens

    [spec], [twin] = load_meta(saved), load_meta(root / "meta_sft.json")
    processor = SampleProcessor(cfg(saved), tok, TOKENS)
    counts = [processor.count_tokens(spec, k) for k in range(len(RECORDS)) if k != BAD_ROW]
    assert counts == [processor.count_tokens(twin, k) for k in range(len(RECORDS)) if k != BAD_ROW]
    assert counts[0] == len(processor(spec, 0, random.Random(0), training=False)["input_ids"])
    assert estimate_mean_tokens(processor, spec, 0) == estimate_mean_tokens(processor, twin, 0) > 0


@pytest.fixture(scope="module")
def parquet(root) -> Path:
    """A Hub-style parquet directory (train in two files, small row groups; a validation file):
    InternVL-form conversations, image *paths* (a list column), a video path, a text record."""
    records = [*RECORDS, {"video": "clip.mp4", "conversations": turns("What moves?", "a shape")}]
    records.append({"text": "A document with <image> inside.", "image": "images/small.png"})
    write_twin(root, "pq_twin", records)
    table = pa.table(
        {
            "conversations": [r.get("conversations") for r in records],
            "text": [r.get("text") for r in records],
            "image": [image_list(r) for r in records],
            "video": [r.get("video") for r in records],
            "extra": [b"unused" * 10] * len(records),
        }
    )
    (root / "pq/data").mkdir(parents=True)
    pq.write_table(table.slice(0, 5), root / "pq/data/train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(table.slice(5), root / "pq/data/train-00001-of-00002.parquet", row_group_size=2)
    pq.write_table(table.slice(0, 2), root / "pq/data/validation-00000-of-00001.parquet")
    return write_meta(root / "meta_pq.json", hf_dataset="pq", split="train")


def test_parquet_with_image_paths_video_and_text_equals_its_twin(root, parquet, tok):
    """Columns named like the record fields need no mapping; null cells leave the field out, so one
    table holds conversation, video and text records; rows span files and row groups."""
    [spec] = load_meta(parquet)
    assert spec.annotation_format == "parquet" and spec.num_records == 8
    _, ours, skips = run_all(parquet, tok)
    _, twins, twin_skips = run_all(root / "meta_pq_twin.json", tok)
    assert_same_samples(ours, twins)
    kinds = {s["source"].rsplit(" ", 1)[1]: s["kind"] for s in ours}
    assert kinds["7"] == "text" and kinds["6"] == "conversation"
    video = next(s for s in ours if s["source"].endswith("row 6"))
    assert video["num_images"] == 4  # frames
    assert [e["file"] for e in skips] == [f"{root / 'pq'}[train]:row {BAD_ROW}"]
    assert [e["reason"] for e in twin_skips] == ["corrupt_image"]
    # the unused column is never read
    assert "extra" not in record_source(spec).read(0)


def test_content_parts_equal_internvl_placeholders(root, tok):
    """Chat messages whose content is a list of parts (image parts where <image>\\n was), from a single
    saved Dataset (no split named), equal the InternVL records."""
    keep = [0, 2, 3, 5]
    records = [RECORDS[i] for i in keep]
    ds = datasets.Dataset.from_dict(
        {
            "messages": [messages(r["conversations"], parts=True) for r in records],
            "images": [embedded(root, r) for r in records],
        },
        features=datasets.Features(
            {
                "messages": datasets.List(
                    {
                        "role": datasets.Value("string"),
                        "content": datasets.List(
                            {"type": datasets.Value("string"), "text": datasets.Value("string")}
                        ),
                    }
                ),
                "images": datasets.List(datasets.Image()),
            }
        ),
    )
    ds.save_to_disk(str(root / "parts"))
    meta = write_meta(root / "meta_parts.json", hf_dataset="parts")  # messages, images: found by name
    [spec] = load_meta(meta)
    assert spec.split == "train" and spec.annotation_format == "arrow"
    assert record_source(spec).read(0)["conversations"][0] == {
        "from": "human",
        "value": "<image>\nWhat colour?",
    }
    _, ours, skips = run_all(meta, tok)
    _, twins, _ = run_all(write_twin(root, "parts_twin", records), tok)
    assert not skips
    assert_same_samples(ours, twins)


def test_check_data_reports_the_twins_counts(root, saved, parquet, tmp_path):
    def report(meta: Path, name: str) -> tuple[dict, list[dict]]:
        out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        assert check_main([str(meta), "--out", str(out), "--log", str(log)]) == 0
        result = json.loads(out.read_text())["datasets"][NAME]
        result.pop("annotation")
        return result, [json.loads(line) for line in log.read_text().splitlines()]

    for meta, twin in ((saved, root / "meta_sft_rep.json"), (parquet, root / "meta_pq_twin.json")):
        ours, our_log = report(meta, "ours")
        theirs, their_log = report(twin, "twin")
        assert ours == theirs
        assert ours["skipped"] == {"corrupt_image": 1} and ours["ok"] == ours["lines"] - 1
        assert [e["file"].rsplit(":", 1)[1] for e in our_log] == [f"row {BAD_ROW}"]
        assert [e["line"] for e in their_log] == [BAD_ROW + 1]


def test_opening_reads_no_pixels(root, saved, monkeypatch):
    """At start only the schema is read: an image decoder that fails does not stop load_meta."""
    from PIL import Image

    hf_dataset._opened.clear()

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened at start")

    monkeypatch.setattr(Image, "open", no_decoding)
    [spec] = load_meta(saved)
    assert spec.num_records == len(RECORDS)
    record = record_source(spec).read(0)
    assert record["image"][0].data == (root / "images/wide.png").read_bytes()  # bytes, still encoded


def test_missing_column_split_and_path_are_refused_at_start(root, saved):
    entry = json.loads(saved.read_text())[NAME]

    def refused(**change) -> str:
        meta = write_meta(root / "meta_bad.json", **{**entry, **change})
        with pytest.raises(MetaError) as e:
            load_meta(meta)
        assert str(meta) in str(e.value) and f"'{NAME}'" in str(e.value)
        return str(e.value)

    msg = refused(columns={"conversations": "msgs", "image": "img"})
    assert "no column 'msgs'" in msg and "columns: id, messages, img" in msg
    msg = refused(split="validation")
    assert "no split 'validation'" in msg and "train, test" in msg
    assert "name one with 'split'" in refused(split=None)
    assert "dataset not found" in refused(hf_dataset="nowhere")
    msg = refused(columns={"conversations": "id"})
    assert "'id' (conversations)" in msg and "{from, value}" in msg and "int32" in msg
    assert "unknown record field 'convo'" in refused(columns={"convo": "messages"})
    assert "holds conversations" in refused(columns={"conversations": None, "image": "img"})
    assert "an entry names one" in refused(annotation="sft.jsonl")
    twin = json.loads((root / "meta_sft.json").read_text())[NAME]
    meta = write_meta(root / "meta_bad.json", **twin, split="train")
    with pytest.raises(MetaError, match="'split' applies to 'hf_dataset' entries only"):
        load_meta(meta)


def test_unmappable_turns_are_skipped_naming_row_and_column(root, tok):
    """A role outside user/assistant/system (row 1) is skipped as bad_conversation, naming the dataset's
    row and column; a table whose turns are neither form is refused at start."""
    rows = [
        messages(RECORDS[2]["conversations"]),
        [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
    ]
    pq.write_table(pa.table({"messages": rows}), root / "roles.parquet")
    meta = write_meta(root / "meta_roles.json", hf_dataset="roles.parquet")
    specs = load_meta(meta)
    processor = SampleProcessor(cfg(meta), tok, TOKENS)
    ok = process_position(processor, specs, [(0, 0), (0, 1)], 0, 0, 0, False)
    bad = process_position(processor, specs, [(0, 0), (0, 1)], 1, 0, 0, False)
    assert not isinstance(ok, Skipped) and isinstance(bad, Skipped)
    assert bad.reason == "bad_conversation" and bad.source == f"{root / 'roles.parquet'}[train]:row 1"
    assert "row 1: column 'messages'[0].role: 'tool'" in bad.detail
    pq.write_table(pa.table({"conversations": [[{"speaker": "a", "said": "b"}]]}), root / "odd.parquet")
    with pytest.raises(
        MetaError, match=r"'conversations' \(conversations\).*found a list of \{said, speaker\}"
    ):
        load_meta(write_meta(root / "meta_odd.json", hf_dataset="odd.parquet"))


def test_mpo_pairs_from_a_dataset_equal_the_jsonl_twin(root, tok, tmp_path):
    """question/chosen/rejected rows (question from a ``prompt`` column, embedded image) make the same
    pairs as the MMPR jsonl twin; check-data recognises them as pairs and counts them alike."""
    pairs = [
        {"image": "images/wide.png", "question": "What colour?", "chosen": "red", "rejected": "blue"},
        {"question": "Two plus two?", "chosen": "four", "rejected": "five"},
        {
            "image": "images/small.png",
            "question": "<image>\nShape?",
            "chosen": "square",
            "rejected": "square",
        },
        {"image": "images/small.png", "question": "How many?", "chosen": "one", "rejected": "two"},
    ]
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "prompt": [p["question"] for p in pairs],
            "chosen": [p["chosen"] for p in pairs],
            "rejected": [p["rejected"] for p in pairs],
            "image": [embedded(root, p)[0] if "image" in p else None for p in pairs],
        },
        features=features,
    )
    ds.save_to_disk(str(root / "pairs"))
    meta = write_meta(root / "meta_pairs.json", hf_dataset="pairs", columns={"question": "prompt"})
    twin = write_twin(root, "pairs_twin", pairs)
    _, ours, skips = run_all(meta, tok, PairProcessor)
    _, twins, twin_skips = run_all(twin, tok, PairProcessor)
    keys = ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "pixel_values")
    assert_same_samples(ours, twins, keys)
    assert len(ours) == 3 and [e["reason"] for e in skips] == [e["reason"] for e in twin_skips] == [
        "identical_pair"
    ]
    out = {}
    for name, path in (("ours", meta), ("twin", twin)):
        assert check_main([str(path), "--out", str(tmp_path / f"{name}.json")]) == 0
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())["datasets"][NAME]
        out[name].pop("annotation")
    assert out["ours"] == out["twin"] and out["ours"]["ok"] == 3


def test_forked_worker_reads_the_same_records(root, parquet, tok):
    """A DataLoader worker forked after the parent read (open files, cached row groups) reads its own."""
    specs = load_meta(parquet)
    processor = SampleProcessor(cfg(parquet, video_decode_timeout_s=0), tok, TOKENS)
    index = [(0, k) for k in (0, 3, 5, 7)]
    here = [process_position(processor, specs, index, p, 0, 0, False) for p in range(len(index))]

    class Positions(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(index)

        def __getitem__(self, p: int):
            return process_position(processor, specs, index, p, 0, 0, False)

    loader = torch.utils.data.DataLoader(
        Positions(), batch_size=None, num_workers=1, multiprocessing_context="fork", collate_fn=lambda x: x
    )
    there = list(loader)
    assert [s["source"] for s in there] == [s["source"] for s in here]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(here, there))


def test_serving_engines_questions_and_reference_key_from_a_dataset(root, saved, tmp_path):
    """What `vlmtune eval --engine transformers|vllm` (and the sampler) send equals the twin's: the same
    messages and answers, the embedded images written out as files with the twin's bytes. The precomputed
    reference's cache key hashes the dataset's files, so it moves when a row changes."""
    from vlmtune.train.objectives.reference import cache_key
    from vlmtune.train.runtime.eval_engines import eval_items

    twin = write_twin(root, "sft_rep_eval", RECORDS, repeat_time=2.5)
    ours, theirs = eval_items(str(saved), 0, None), eval_items(str(twin), 0, None)
    assert len(ours) == len(theirs) == 15  # 2.5 x 6 rows, the corrupt image included (it fails when read)
    for a, b in zip(ours, theirs):
        assert (a.messages, a.answer, a.record) == (b.messages, b.answer, b.record)
        assert [Path(p).read_bytes() for p in a.images] == [Path(p).read_bytes() for p in b.images]

    copy = tmp_path / "saved"
    datasets.load_from_disk(str(root / "saved")).save_to_disk(str(copy))
    meta = write_meta(
        tmp_path / "meta.json",
        hf_dataset=str(copy),
        split="train",
        columns={"conversations": "messages", "image": "img"},
    )
    key = cache_key(str(meta), None, {})
    edited = datasets.load_from_disk(str(copy))["train"].map(lambda r: {"id": r["id"] + 1})
    datasets.DatasetDict({"train": edited}).save_to_disk(str(tmp_path / "edited"))
    meta.write_text(meta.read_text().replace(str(copy), str(tmp_path / "edited")))
    assert cache_key(str(meta), None, {}) != key
