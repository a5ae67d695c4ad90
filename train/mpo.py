"""`vlmtune mpo`: Mixed Preference Optimization through the same runner and loop as SFT.

Also `python -m train.mpo [hydra overrides]`; ablations: `vlmtune mpo -m experiment=mpo_ablation
loss.preference=sigmoid,ipo,hinge` (one output dir per variant).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from train.sft import _hydra_entry, run_training


@dataclass
class PairWithLength:
    """The pair processor plus each pair's packed length for the chosen layout (picklable for workers)."""

    processor: Any
    layout: str

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        pair = self.processor(*args, **kwargs)
        p, c, r = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
        pair["length"] = p + c + r if self.layout == "tree" else 2 * p + c + r
        return pair


class MPOMethod:
    """Pairs in, the MPO objective out; everything else is the SFT runner."""

    def __init__(self) -> None:
        self.layout: str | None = None

    def _layout(self, cfg: Any) -> str:
        from train.models import resolve_attn_implementation
        from train.objectives.mpo import resolve_layout

        if self.layout is None:
            self.layout = resolve_layout(
                cfg.loss.layout, resolve_attn_implementation(cfg.model.attn_implementation)
            )
        return self.layout

    def prepare_demo(self, cfg: Any) -> None:
        from train.demo import prepare_mpo_demo

        prepare_mpo_demo(cfg)

    def processor(self, cfg: Any, tokenizer: Any, tokens_per_tile: int) -> Any:
        from data.pairs import PairProcessor

        return PairWithLength(PairProcessor(cfg.data, tokenizer, tokens_per_tile), self._layout(cfg))

    def collate(self, cfg: Any, tokenizer: Any, model: Any):
        from data.collate import collate_pairs

        layout, reduction = self._layout(cfg), cfg.loss.generation_reduction
        return lambda pairs: collate_pairs(pairs, layout, reduction)

    def objective(self, cfg: Any, model: Any, ds_config: dict) -> Any:
        from train.objectives.mpo import MPOObjective
        from train.reference import frozen_copy_reference

        if cfg.reference != "copy":
            raise ValueError(f"reference={cfg.reference!r} is not available yet; use reference=copy")
        needs = cfg.loss.preference_weight or cfg.loss.quality_weight
        reference = frozen_copy_reference(model, ds_config) if needs else None
        share = cfg.model.freeze_vision and cfg.model.freeze_projector
        return MPOObjective(cfg.loss, reference, share_vision=share)


def run_mpo(cfg: Any) -> dict[str, Any]:
    from train.objectives.mpo import check_mpo_config

    check_mpo_config(cfg.loss)
    return run_training(cfg, MPOMethod())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return _hydra_entry(list(sys.argv[1:] if argv is None else argv), "mpo", run_mpo)


if __name__ == "__main__":
    sys.exit(main())
