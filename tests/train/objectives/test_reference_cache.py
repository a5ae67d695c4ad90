"""``reference=precomputed``: the cached reference log-probs are refused when anything they depend on has
changed (the starting weights, the meta file, an annotation line, a data setting, the layout, V2PE's δ),
reused when nothing has, and computed over two ranks (ZeRO-3) exactly as over one.

The cache is made the way `vlmtune mpo` makes it before its first step (tests/train/
dist_reference_precompute.py: the runner's phases up to ``MPOMethod.on_engine``, over a DeepSpeed
engine), in this process for one rank (ZeRO-0) and under torchrun for two (ZeRO-3); the refusal is
``on_engine`` finding a cache with another key in the output dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.train.e2e import REPO, sft_env, torchrun
from tests.train.helpers import world_of_one

STALE = "was computed for other data, model or settings; delete it to recompute"
NUM_PAIRS = 17  # 2 ranks x 8 pairs per batch: rank 0 has 2 batches, rank 1 one (it repeats it under ZeRO-3)


def precompute(out: Path, overrides: list[str]) -> dict:
    """The reference cache `vlmtune mpo reference=precomputed` would save in ``out``, made in this process."""
    from tests.train import dist_reference_precompute

    with world_of_one():
        dist_reference_precompute.main(out, overrides)
    return json.loads((out / "reference_logps.json").read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Pairs without augmentation, a tiny checkpoint, and the one-rank cache of both."""
    from vlmtune.data.synthetic import generate_pair_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("reference_cache")
    meta = generate_pair_dataset(
        root / "data", num_train=NUM_PAIRS, num_eval=1, seed=3, image_size_range=(40, 120)
    )
    entries = json.loads(meta.read_text())
    plain = meta.parent / "meta_plain.json"
    plain.write_text(json.dumps({k: {**v, "data_augment": False} for k, v in entries.items()}))
    ckpt = build_tiny_checkpoint(root / "tiny")
    overrides = [f"model.pretrained={ckpt}", f"data.meta_path={plain}"]
    cache = precompute(root / "one_rank", overrides)
    return root, Path(ckpt), plain, overrides, cache


def compose(overrides: list[str], out: Path):
    from vlmtune.train.runtime.config import compose_config

    return compose_config("mpo", [f"train.output_dir={out}", "reference=precomputed", *overrides])


def load_cache(cfg, out: Path, engine: torch.nn.Module):
    """``MPOMethod.on_engine`` on an output dir holding a cache: the objective it leaves (or its error)."""
    from tests.train.helpers import tiny_tokenizer
    from vlmtune.data.meta import load_meta
    from vlmtune.train.commands.mpo import MPOMethod

    method = MPOMethod()
    tok = tiny_tokenizer()
    objective = method.objective(cfg, engine, {})
    processor = method.processor(cfg, tok, 16)
    collate = method.collate(cfg, tok, engine)
    method.on_engine(cfg, engine, objective, processor, load_meta(cfg.data.meta_path), collate, out)
    return objective, processor, collate


@pytest.fixture(scope="module")
def engine():
    """What on_engine reads from the engine is the model's config (V2PE's δ); the cache path needs no more."""
    from tests.train.helpers import tiny_model

    return tiny_model().eval()


def with_cache(tmp_path: Path, cache_file: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(cache_file, out / "reference_logps.json")
    return out


def test_one_rank_cache_holds_every_pair(setup):
    _, _, plain, _, cache = setup
    annotation = plain.parent / "pairs_train.jsonl"
    assert sorted(cache["logps"]) == sorted(f"{annotation}:{i}" for i in range(1, NUM_PAIRS + 1))
    values = torch.tensor(list(cache["logps"].values()))
    assert values.shape == (NUM_PAIRS, 2) and bool((values < 0).all())  # summed log-probs of real answers


def test_unchanged_inputs_reuse_the_cache(setup, engine, tmp_path):
    """Same data, same settings, the same weights in another directory (the key is content, not paths):
    the cache is used, and the reference it gives is the cached numbers."""
    root, ckpt, _, overrides, cache = setup
    copy = shutil.copytree(ckpt, tmp_path / "same_weights")
    out = with_cache(tmp_path, root / "one_rank" / "reference_logps.json")
    cfg = compose([*overrides, f"model.pretrained={copy}"], out)
    objective, processor, collate = load_cache(cfg, out, engine)
    from vlmtune.data.meta import load_meta

    spec = load_meta(cfg.data.meta_path)[0]
    pairs = [processor(spec, line, None, False) for line in (4, 0, 9)]
    batch = collate(pairs)
    expected = torch.tensor([cache["logps"][s] for s in batch["sources"]], dtype=torch.float32)
    assert torch.equal(objective.reference(batch, None), expected)


def _perturbed_weights(ckpt: Path, tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    target = Path(shutil.copytree(ckpt, tmp_path / "other_weights"))
    weights = load_file(str(target / "model.safetensors"))
    name = sorted(weights)[-1]
    weights[name] = weights[name] + 1e-3  # one tensor of the vision tower moved a little
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _copied_data(plain: Path, tmp_path: Path) -> Path:
    target = Path(shutil.copytree(plain.parent, tmp_path / "data"))
    return target / plain.name


def _edit_annotation(plain: Path, tmp_path: Path) -> Path:
    meta = _copied_data(plain, tmp_path)
    annotation = meta.parent / "pairs_train.jsonl"
    lines = annotation.read_text().splitlines()
    record = json.loads(lines[5])
    record["rejected"] = record["rejected"] + " Maybe."
    lines[5] = json.dumps(record)
    annotation.write_text("\n".join(lines) + "\n")
    return meta


def _edit_meta(plain: Path, tmp_path: Path) -> Path:
    meta = _copied_data(plain, tmp_path)
    entries = json.loads(meta.read_text())
    meta.write_text(json.dumps({k: {**v, "max_dynamic_patch": 2} for k, v in entries.items()}))
    return meta


CHANGES = {
    "weights": lambda s, t: [f"model.pretrained={_perturbed_weights(s[1], t)}"],
    "annotation_line": lambda s, t: [f"data.meta_path={_edit_annotation(s[2], t)}"],
    "meta_entry_tiling": lambda s, t: [f"data.meta_path={_edit_meta(s[2], t)}"],
    "max_length": lambda s, t: ["data.max_length=900"],
    "max_dynamic_patch": lambda s, t: ["data.max_dynamic_patch=4"],
    "use_thumbnail": lambda s, t: ["data.use_thumbnail=false"],
    "system_prompt": lambda s, t: ["data.system_prompt=Answer briefly."],
    "video_frames": lambda s, t: ["data.max_num_frames=6"],
    "layout": lambda s, t: ["loss.layout=separate"],
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_stale_cache_is_refused(setup, engine, tmp_path, change):
    root, _, _, overrides, _ = setup
    out = with_cache(tmp_path, root / "one_rank" / "reference_logps.json")
    cfg = compose([*overrides, *CHANGES[change](setup, tmp_path)], out)
    with pytest.raises(ValueError, match=STALE):
        load_cache(cfg, out, engine)


def test_stale_cache_is_refused_after_a_v2pe_change(setup, engine, tmp_path):
    root, _, _, overrides, _ = setup
    out = with_cache(tmp_path, root / "one_rank" / "reference_logps.json")
    engine.config.v2pe_delta = 0.5
    try:
        with pytest.raises(ValueError, match=STALE):
            load_cache(compose(overrides, out), out, engine)
    finally:
        engine.config.v2pe_delta = None


@pytest.mark.parametrize("change", ["train.seed=2", "model.text.intermediate_size=128"])
def test_random_init_cache_is_refused_for_other_starting_weights(setup, engine, tmp_path, change):
    """model.pretrained=null: the starting weights are the seed's and the shapes' (no file to hash);
    another seed or another shape is another reference model."""
    _, ckpt, plain, _, _ = setup
    out = tmp_path / "out"
    random_init = [
        "model.pretrained=null",
        f"model.tokenizer={ckpt}",
        f"data.meta_path={plain}",
        "train.seed=1",
    ]
    precompute(out, random_init)
    load_cache(compose(random_init, out), out, engine)  # the same random init again: the same reference
    with pytest.raises(ValueError, match=STALE):
        load_cache(compose([*random_init, change], out), out, engine)


def test_two_ranks_precompute_the_one_rank_cache(setup, tmp_path):
    """ZeRO-3 over 2 gloo ranks, every parameter partitioned, each rank a strided share of the pairs
    (9 and 8: rank 1 repeats a batch so both call the sharded model equally often): the same key, the
    same pairs, the same log-probs as one rank computing them all."""
    _, _, _, overrides, one = setup
    zero3 = ["deepspeed=zero3", "deepspeed.stage3_param_persistence_threshold=0"]
    script = REPO / "tests" / "train" / "dist_reference_precompute.py"
    cmd = torchrun(script, tmp_path, *overrides, *zero3)
    proc = subprocess.run(cmd, cwd=REPO, env=sft_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "reference_logps.json").read_text())
    assert two["key"] == one["key"]
    assert sorted(two["logps"]) == sorted(one["logps"])
    a = torch.tensor([one["logps"][k] for k in sorted(one["logps"])], dtype=torch.float64)
    b = torch.tensor([two["logps"][k] for k in sorted(one["logps"])], dtype=torch.float64)
    # float32 log-probs summed over up to ~100 tokens: agreement to a few ulps
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_the_cache_is_json_read_without_unpickling(tmp_path):
    """Whoever can write the output dir cannot make a rank run code through the cache: it is JSON, and an
    older vlmtune's pickle is refused unread (the file here would run code if unpickled)."""
    from vlmtune.train.commands.mpo import read_reference_cache, write_reference_cache

    path = tmp_path / "reference_logps.json"
    assert read_reference_cache(path, "k") is None
    logps = {"a.jsonl:1": [-1.25, -3.0000001192092896]}
    write_reference_cache(path, "k", logps)
    assert read_reference_cache(path, "k") == logps  # floats exactly
    assert "computed for other data" in read_reference_cache(path, "other")
    path.write_text("{not json")
    assert "not a readable cache" in read_reference_cache(path, "k")
    path.unlink()

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"key": "k", "logps": RunsCode()}, tmp_path / "reference_logps.pt")
    assert "pickled cache of an older vlmtune, not loaded" in read_reference_cache(path, "k")
    assert not (tmp_path / "pwned").exists()
