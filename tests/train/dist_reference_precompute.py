"""Run by test_reference_cache under torchrun (2 ranks, gloo): ``reference=precomputed`` set up exactly as
`vlmtune mpo` does before its first step (the runner's phases up to ``MPOMethod.on_engine``), which
computes the reference log-probs over the ranks and saves them to OUT/reference_logps.json.

Arguments: OUT, then Hydra overrides of the mpo config (model.pretrained, data.meta_path, deepspeed...).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vlmtune.train.commands import runner  # noqa: E402
from vlmtune.train.commands.mpo import MPOMethod  # noqa: E402
from vlmtune.train.runtime.config import compose_config  # noqa: E402
from vlmtune.train.runtime.engine import (  # noqa: E402
    build_ds_config,
    create_engine,
    init_distributed,
    partitioned_construction,
    shutdown_distributed,
)


def main(out: Path, overrides: list[str]) -> None:
    cfg = compose_config("mpo", [f"train.output_dir={out}", "reference=precomputed", *overrides])
    rank, world = init_distributed()
    ds_config = build_ds_config(cfg.deepspeed, cfg.train, cfg.optim, world)
    method = MPOMethod()
    with partitioned_construction(ds_config) as partitioned:
        out_dir = runner.setup_output_dir(cfg, rank)
        tokenizer = runner.load_tokenizer(cfg)
        built = runner.build_starting_model(cfg, tokenizer, partitioned, rank, world)
        data = runner.build_data(cfg, method, tokenizer, built.tokens_per_tile, out_dir)
        collate = method.collate(cfg, tokenizer, built.model)
        objective = method.objective(cfg, built.model, ds_config, rebuild=built.rebuild)
        engine, _, _ = create_engine(built.model, ds_config, cfg.optim, cfg.train.max_steps)
        method.on_engine(cfg, engine, objective, data.processor, data.specs, collate, out_dir)
        data.report.close()
        del engine, objective, built, data
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
