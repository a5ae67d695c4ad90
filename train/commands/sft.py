"""`vlmtune sft` (also `python -m vlmtune.train.commands.sft [hydra overrides]`): supervised
fine-tuning and pre-training through the shared runner."""

from __future__ import annotations

import sys
from typing import Any

from vlmtune.train.commands.runner import command_main, run_training
from vlmtune.train.runtime.config import SFTRunConfig


class SFTMethod:
    """What SFT plugs into the shared runner: its sample processor, collate and objective."""

    def processor(self, cfg: Any, tokenizer: Any, tokens_per_tile: int) -> Any:
        from vlmtune.data.dataset import SampleProcessor

        return SampleProcessor(cfg.data, tokenizer, tokens_per_tile)

    def collate(self, cfg: Any, tokenizer: Any, model: Any):
        from vlmtune.data.collate import collate_packed, collate_padded

        reduction = cfg.train.loss_reduction
        if cfg.packing.enabled:
            return lambda samples: collate_packed(samples, reduction)
        return lambda samples: collate_padded(samples, reduction, tokenizer.pad_token_id)

    def objective(self, cfg: Any, model: Any, ds_config: dict, rebuild: Any = None) -> Any:
        from vlmtune.train.objectives.sft import SFTObjective

        return SFTObjective(cfg.train.loss_reduction)

    def on_engine(self, *args: Any) -> None:
        """SFT needs nothing set up once the engine exists."""


def run_sft(cfg: SFTRunConfig) -> dict[str, Any]:
    return run_training(cfg, SFTMethod())


def main(argv: list[str] | None = None) -> int:
    return command_main(argv, "sft", run_sft)


if __name__ == "__main__":
    sys.exit(main())
