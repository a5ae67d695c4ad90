"""The model card's layout in and out of a training run: `model.pretrained=` an original-format directory,
`train.export_format=original`, and the export read back by `vlmtune eval` (converted in memory) with the
figures the run wrote at its end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.e2e import REPO, base_overrides, run_sft, sft_env


def test_original_in_original_out_and_eval_reads_it_with_the_runs_figures(tmp_path: Path) -> None:
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.original_format import convert
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    meta = Path(generate_sft_dataset(tmp_path / "data", num_train=32, num_eval=12, seed=3))
    eval_meta = meta.with_name("meta_eval.json")
    original_base = tmp_path / "card_layout"
    convert(build_tiny_checkpoint(tmp_path / "tiny"), original_base, "original")
    out = tmp_path / "run"
    overrides = base_overrides(
        original_base,
        meta,
        out,
        **{
            "train.max_steps": 3,
            "train.export_format": "original",
            "eval_data.meta_path": eval_meta,
            "train.serving_check": 4,
        },
    )
    run_sft(overrides)

    assert not (out / "hf").exists()  # read by the end-of-run eval and serving check, then removed
    config = json.loads((out / "original" / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    assert (out / "original" / "vlmtune.json").exists()  # the trained settings travel with it
    written = json.loads((out / "eval.json").read_text())
    assert written["num_samples"] == 12

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmtune.train.commands.eval",
            "--model",
            str(out / "original"),
            "--meta",
            str(eval_meta),
            "--out",
            str(tmp_path / "reeval.json"),
        ],
        cwd=REPO,
        env=sft_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "reeval.json").read_text())
    for key in ("accuracy", "blank_image_accuracy", "majority_baseline", "num_samples"):
        assert again[key] == pytest.approx(written[key]), key
