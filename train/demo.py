"""Everything the demo needs that a fresh machine lacks: synthetic data and the tiny random checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("vlmtune")

#: The demo's task mix: what a model this small learns from pixels in a few CPU minutes (counting
#: scattered shapes is left out: it takes far longer); multi-image and pure-text samples keep those
#: paths exercised.
DEMO_TASKS = {"color": 0.47, "shape": 0.47, "multi_image": 0.03, "text": 0.03}
#: Near-square images: squeezing a wide image into a square tile turns circles into ellipses and
#: squares into bars, which a model this small cannot untangle in minutes.
DEMO_MAX_ASPECT = 1.25


def prepare_demo(cfg: Any, num_train: int = 6000, num_eval: int = 200) -> None:
    """Generate the demo dataset and tiny checkpoint where the config expects them, if missing."""
    from data.synthetic import generate_sft_dataset
    from train.tiny import build_tiny_checkpoint

    meta = Path(cfg.data.meta_path)
    if not meta.exists():
        log.info("generating the synthetic demo data in %s", meta.parent)
        generate_sft_dataset(
            meta.parent,
            num_train=num_train,
            num_eval=num_eval,
            seed=0,
            task_weights=DEMO_TASKS,
            max_aspect=DEMO_MAX_ASPECT,
        )
    if cfg.model.pretrained is not None and not (Path(cfg.model.pretrained) / "config.json").exists():
        log.info("building the tiny random checkpoint in %s", cfg.model.pretrained)
        build_tiny_checkpoint(cfg.model.pretrained)


def prepare_mpo_demo(cfg: Any, sft_steps: int = 100, num_pairs: int = 3000) -> None:
    """The MPO demo's inputs: the SFT demo data (its held-out split is the eval set), colour/shape
    preference pairs on the same kind of images, and a briefly trained (weak) SFT checkpoint.

    Paths follow the config: pairs beside ``data.meta_path``, the SFT demo data in the same folder,
    the tiny initial checkpoint in ``<that folder>/../tiny_init``, the weak model at ``model.pretrained``.
    """
    import subprocess
    import sys

    from data.synthetic import generate_pair_dataset

    meta = Path(cfg.data.meta_path)
    if not meta.exists():
        log.info("generating the synthetic preference pairs in %s", meta.parent)
        generate_pair_dataset(
            meta.parent,
            num_train=num_pairs,
            num_eval=100,
            seed=0,
            tasks=("color", "shape"),
            max_aspect=DEMO_MAX_ASPECT,
        )
    weak = Path(cfg.model.pretrained)
    if not (weak / "config.json").exists():
        out = weak.parent
        log.info("training the weak SFT starting point (%d steps) in %s", sft_steps, out)
        cmd = [
            sys.executable,
            "-m",
            "train.sft",
            "experiment=demo",
            f"train.max_steps={sft_steps}",
            f"train.output_dir={out}",
            "train.save_every=0",
            "eval_data=null",
            f"data.meta_path={meta.parent / 'meta_train.json'}",
            f"model.pretrained={meta.parent.parent / 'tiny_init'}",
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
        }
        subprocess.run(cmd, check=True, env=env)
