"""`vlmtune prm [hydra overrides]`: train a process reward model, VisualPRM-style, with the SFT runner.

A PRM is the policy's architecture trained as a chat whose assistant turns are the verdicts ``+`` /
``-`` on each step (data/prm.py; `vlmtune prm-data` writes such data). VisualPRM trains it with plain
next-token loss on those verdicts (arXiv 2503.10291, section 3.2), so nothing here is a new
objective: the datasets' ``supervision: assistant_content`` puts the targets on the verdict tokens
alone (not their ``<|im_end|>``, which the scorer never reads, nor the prompt), and the rest is SFT:
the same config (configs/sft.yaml), packing, LoRA, ZeRO, export. Scoring: train/runtime/prm_score.py.
"""

from __future__ import annotations

import sys
from typing import Any

from vlmtune.data.meta import load_meta
from vlmtune.train.commands.runner import command_main, run_training
from vlmtune.train.commands.sft import SFTMethod

PRM_SUPERVISION = "assistant_content"


def check_prm_meta(meta_path: str) -> None:
    """Refuse a meta file with a dataset not supervised on the verdicts alone: trained under SFT's
    default, the PRM would also learn each ``<|im_end|>`` and a text record's every token."""
    for spec in load_meta(meta_path):
        if spec.supervision != PRM_SUPERVISION:
            raise ValueError(
                f"{meta_path}: dataset {spec.name!r} has supervision {spec.supervision!r}; a PRM trains on the "
                f"'+'/'-' verdicts alone: set \"supervision\": \"{PRM_SUPERVISION}\" (vlmtune prm-data writes it)"
            )


def run_prm(cfg: Any) -> dict[str, Any]:
    check_prm_meta(cfg.data.meta_path)
    return run_training(cfg, SFTMethod())


def main(argv: list[str] | None = None) -> int:
    return command_main(argv, "sft", run_prm)


if __name__ == "__main__":
    sys.exit(main())
