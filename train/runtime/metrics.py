"""Run metrics: metrics.jsonl in the output dir (rank 0), wandb when enabled, a tqdm bar.

The realised data mixture is read from the per-dataset ``tokens/<dataset>`` counts the loop logs
(each line: tokens since the previous line); the logger adds ``share/<dataset>``, each dataset's
share of all tokens trained so far, resumed runs included (the lines kept on resume are counted).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("vlmtune")
TOKENS_PREFIX, SHARE_PREFIX = "tokens/", "share/"


def dataset_token_totals(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Total tokens per dataset over metrics records (the sum of their ``tokens/<dataset>`` fields)."""
    totals: dict[str, int] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(TOKENS_PREFIX):
                name = key[len(TOKENS_PREFIX) :]
                totals[name] = totals.get(name, 0) + int(value)
    return totals


def shares(totals: dict[str, int]) -> dict[str, float]:
    """Each dataset's share of the total tokens."""
    total = sum(totals.values())
    return {name: (n / total if total else 0.0) for name, n in totals.items()}


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
        self.dataset_tokens: dict[str, int] = {}
        if not enabled:
            return
        if self.path.exists():  # keep only what the resumed state has seen
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
            self.dataset_tokens = dataset_token_totals(json.loads(line) for line in kept)
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
        if any(k.startswith(TOKENS_PREFIX) for k in record):
            for name, n in dataset_token_totals([record]).items():
                self.dataset_tokens[name] = self.dataset_tokens.get(name, 0) + n
            record = {**record, **{SHARE_PREFIX + k: v for k, v in shares(self.dataset_tokens).items()}}
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
        if self.enabled and len(self.dataset_tokens) > 1:
            log.info(
                "realised token shares: %s",
                ", ".join(f"{k} {v:.3f}" for k, v in shares(self.dataset_tokens).items()),
            )
        if self.wandb is not None:
            self.wandb.finish()
