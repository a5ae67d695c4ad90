"""`vlmtune report <sweep dir>`: one row per run of a sweep (the MPO ablation, the V2PE δ sweep) and a plot.

Reads each run's ``config.yaml``, ``metrics.jsonl`` and ``eval.json`` (when present), names the run
by the config values that differ between runs, and writes ``report.md`` (a markdown table) and
``report.png`` (loss and reward-accuracy curves per run, and held-out accuracy when evaluated).
Held-out accuracy comes with its 95% Wilson interval on the run's n (`wilson_interval`), and with the
repetition figures of eval.json (share of answers cut at ``max_new_tokens``, share with a repeated
n-gram: train/runtime/evaluate.py).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def load_runs(sweep: Path) -> list[dict[str, Any]]:
    """Every directory under ``sweep`` holding a metrics.jsonl: its config, metrics and eval results."""
    runs = []
    for metrics_file in sorted(sweep.rglob("metrics.jsonl")):
        run_dir = metrics_file.parent
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        config_file = run_dir / "config.yaml"
        config = _flatten(OmegaConf.to_container(OmegaConf.load(config_file))) if config_file.exists() else {}
        eval_file = run_dir / "eval.json"
        runs.append(
            {
                "dir": run_dir,
                "config": config,
                "train": [r for r in records if "loss" in r],
                "eval": json.loads(eval_file.read_text()) if eval_file.exists() else None,
            }
        )
    if not runs:
        raise SystemExit(f"vlmtune report: no metrics.jsonl under {sweep}")
    return runs


def run_names(runs: list[dict[str, Any]]) -> list[str]:
    """Name runs by the config keys whose values differ across the sweep (output paths excluded)."""
    keys = sorted({k for r in runs for k in r["config"]})
    varying = [
        k
        for k in keys
        if len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1
        and not k.endswith("output_dir")
    ]
    if not varying:
        return [r["dir"].name for r in runs]
    return [", ".join(f"{k.split('.', 1)[-1]}={r['config'].get(k)}" for k in varying) for r in runs]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96).

    Chosen over the normal approximation p +- z sqrt(p(1-p)/n) because held-out accuracies here sit
    near the ends (blank-image controls ~0.3, trained models > 0.9), where the normal interval
    under-covers and can leave [0, 1]; Wilson's stays inside and keeps close to its nominal coverage.
    """
    if n <= 0:
        raise ValueError(f"an interval needs n > 0, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(run: dict[str, Any], tail: float = 0.1) -> dict[str, Any]:
    """Final loss, reward accuracy/margin averaged over the last ``tail`` of steps, held-out accuracy
    with its 95% Wilson interval and n, and the repetition figures (those eval.json has)."""
    train = run["train"]
    last = train[-max(1, int(len(train) * tail)) :] if train else []

    def mean(key: str) -> float | None:
        values = [r[key] for r in last if key in r]
        return sum(values) / len(values) if values else None

    ev = run["eval"] or {}
    n, accuracy = ev.get("num_samples"), ev.get("accuracy")
    interval = wilson_interval(accuracy * n, n) if n and accuracy is not None else None
    ngram = ev.get("repeated_ngram_n")
    return {
        "steps": train[-1]["step"] if train else 0,
        "loss": train[-1]["loss"] if train else None,
        "reward_accuracy": mean("rewards/accuracy"),
        "reward_margin": mean("rewards/margin"),
        "eval_accuracy": accuracy,
        "eval_ci95": f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else None,
        "eval_n": n,
        "eval_blank_accuracy": ev.get("blank_image_accuracy"),
        "eval_before": (ev.get("before") or {}).get("accuracy"),
        "truncated": ev.get("truncated_rate"),
        f"repeated_{ngram or 4}gram": ev.get("repeated_ngram_rate"),
    }


def markdown_table(names: list[str], rows: list[dict[str, Any]]) -> str:
    """One row per run; a column no run has (rewards in an SFT sweep, eval when none ran) is left out."""
    cols = [c for c in rows[0] if c in ("steps", "loss") or any(row.get(c) is not None for row in rows)]

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [
        f"| {name} | " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for name, row in zip(names, rows)
    ]
    return "\n".join(lines) + "\n"


def plot(names: list[str], runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, run in zip(names, runs):
        steps = [r["step"] for r in run["train"]]
        axes[0].plot(steps, [r["loss"] for r in run["train"]], label=name)
        if any("rewards/accuracy" in r for r in run["train"]):
            axes[1].plot(steps, [r.get("rewards/accuracy") for r in run["train"]], label=name)
    evaluated = [(n, r["eval"]["accuracy"]) for n, r in zip(names, runs) if r["eval"]]
    if evaluated:
        axes[2].barh([n for n, _ in evaluated], [a for _, a in evaluated])
    for ax, title in zip(axes, ("loss", "reward accuracy", "held-out accuracy")):
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune report", description=__doc__)
    parser.add_argument("sweep", help="a directory holding runs (e.g. a Hydra multirun dir)")
    parser.add_argument(
        "--out", default=None, help="where to write report.md / report.png (default: the sweep dir)"
    )
    args = parser.parse_args(argv)
    sweep = Path(args.sweep)
    out = Path(args.out) if args.out else sweep
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(sweep)
    names = run_names(runs)
    table = markdown_table(names, [summarise(r) for r in runs])
    (out / "report.md").write_text(f"# {sweep}\n\n{table}")
    plot(names, runs, out / "report.png")
    print(table)
    print(f"wrote {out / 'report.md'} and {out / 'report.png'}")
    return 0
