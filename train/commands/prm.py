"""`vlmtune prm [hydra overrides]`: train a process reward model, VisualPRM-style, with the SFT runner.

A PRM is the policy's architecture trained as a chat whose assistant turns are the verdicts ``+`` /
``-`` on each step (data/prm.py; `vlmtune prm-data` writes such data). VisualPRM trains it with plain
next-token loss on those verdicts (arXiv 2503.10291, section 3.2); here the loss is the softmax over
the two verdicts alone, the very quantity the scorer reads (train/objectives/verdict.py: why, measured).
The datasets' ``supervision: assistant_content`` puts the targets on the verdict tokens alone (not their
``<|im_end|>``, which the scorer never reads, nor the prompt), and the rest is SFT: the same config
(configs/sft.yaml), packing, LoRA, ZeRO, export. Scoring: train/runtime/prm_score.py.
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


class PRMMethod(SFTMethod):
    """SFT's data path with the two-way verdict loss (train/objectives/verdict.py)."""

    def processor(self, cfg: Any, tokenizer: Any, tokens_per_tile: int) -> Any:
        from vlmtune.train.runtime.prm_score import verdict_ids

        check_prm_meta(cfg.data.meta_path)  # here, after a demo preset has written it, before any step
        self.ids = verdict_ids(tokenizer)  # refused here, at start, when '+' or '-' is not one token
        return super().processor(cfg, tokenizer, tokens_per_tile)

    def objective(self, cfg: Any, model: Any, ds_config: dict, rebuild: Any = None) -> Any:
        from vlmtune.train.objectives.verdict import PRMObjective

        return PRMObjective(cfg.train.loss_reduction, *self.ids)


def run_prm(cfg: Any) -> dict[str, Any]:
    return run_training(cfg, PRMMethod())


def main(argv: list[str] | None = None) -> int:
    return command_main(argv, "sft", run_prm)


if __name__ == "__main__":
    sys.exit(main())
