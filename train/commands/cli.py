"""The `vlmtune` console entry point: one subcommand per job, each a thin wrapper."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). Modules are imported lazily so that
# `vlmtune --help` and `vlmtune check-data` don't pay for torch/deepspeed imports they don't use.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": (
        "vlmtune.train.commands.sft",
        "main",
        "supervised fine-tuning (Hydra overrides, e.g. experiment=demo)",
    ),
    "mpo": (
        "vlmtune.train.commands.mpo",
        "main",
        "Mixed Preference Optimization on MMPR-style pairs (Hydra overrides)",
    ),
    "eval": (
        "vlmtune.train.commands.eval",
        "main",
        "held-out exact-match accuracy of an exported model (+ blank-image control)",
    ),
    "merge-lora": (
        "vlmtune.train.commands.merge_lora",
        "main",
        "fold a LoRA adapter into its base model (refuses if the merged logits differ)",
    ),
    "convert": ("vlmtune.train.commands.convert", "main", "original InternVL <-> -hf checkpoint layout"),
    "plan": (
        "vlmtune.train.commands.plan",
        "main",
        "per-GPU memory of a layout (meta device, DeepSpeed ZeRO estimators), and a layout that fits",
    ),
    "report": (
        "vlmtune.train.commands.report",
        "main",
        "markdown table + plot of a sweep's runs (e.g. the MPO ablation)",
    ),
    "make-pairs": ("vlmtune.train.commands.make_pairs", "main", "MPO pairs from a model's samples"),
    "prm-data": ("vlmtune.train.commands.prm_data", "main", "PRM step labels by Monte-Carlo completions"),
    "prm": ("vlmtune.train.commands.prm", "main", "train a process reward model (SFT on +/- verdicts)"),
    "best-of-n": ("vlmtune.train.commands.best_of_n", "main", "Best-of-N by a PRM vs greedy, majority vote"),
    "check-data": (
        "vlmtune.train.commands.check_data",
        "main",
        "validate an InternVL meta file: counts per reason, lengths, tiles",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print("usage: vlmtune <command> [args]\n\ncommands:")
        for name, (_, _, help_text) in COMMANDS.items():
            print(f"  {name:<12} {help_text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlmtune: unknown command {name!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
