"""Run metrics: metrics.jsonl in the output dir (rank 0), wandb when enabled, a tqdm bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLogger:
    """Writes one JSON line per logged step; on resume, lines past the resumed step are dropped."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        wandb_cfg: Any,
        run_config: dict,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        if self.path.exists():  # keep only what the resumed state has seen
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if wandb_cfg.enabled:
            import wandb

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                name=wandb_cfg.name,
                mode=wandb_cfg.mode,
                dir=str(out_dir),
                config=run_config,
            )

    def log(self, record: dict[str, Any], *, advance: int = 1) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record.get("step"))
        if self.bar is not None:
            if advance:
                self.bar.update(advance)
            if "loss" in record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
