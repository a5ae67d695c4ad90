"""Run by test_mpo_loss_invariance_two_ranks under torchrun (2 ranks, gloo): the MPO counterpart of
dist_grad_check.py. Preference pairs split unevenly across 2 ranks x 2 accumulation steps (rank 1's
first micro-batch holds only text pairs) take one step of the real loop with SGD(lr=1); the weight
change must be the one-process gradient of the same MPO loss (preference + quality + generation,
the same weights) over all pairs as one batch.

Both sides read the same reference log-probs (a fixed table keyed by the pairs' sources: the starting
policy's, shifted per pair so that the implicit rewards are not all zero) and start from the same BCO
reward shift, set by hand (delta = 0.15, as if from past steps), so the comparison is of one step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.train.dist_grad_check import one_step_versus_reference  # noqa: E402
from tests.train.helpers import make_pair, tiny_model  # noqa: E402
from vlmtune.data.collate import collate_pairs  # noqa: E402
from vlmtune.train.objectives.mpo import MPOLossConfig, MPOObjective  # noqa: E402
from vlmtune.train.objectives.reference import cached_reference, precompute_reference  # noqa: E402
from vlmtune.train.runtime.engine import init_distributed, shutdown_distributed  # noqa: E402

SHIFT_TOTAL, SHIFT_COUNT = 0.6, 4  # delta = 0.15


def objective(cfg: MPOLossConfig, reference) -> MPOObjective:
    made = MPOObjective(cfg, reference, share_vision=False)
    made.shift.total, made.shift.count = SHIFT_TOTAL, SHIFT_COUNT
    return made


def main(out: Path, preference: str, reduction: str, zero_stage: int) -> None:
    init_distributed()
    # eval: no dropout, so both sides compute the same function; the run's LM head 8 rows at a time
    model = tiny_model(seed=0, head_chunk_size=8).eval()
    shapes = [  # (images, tiles per image, prompt, chosen, rejected)
        (1, 2, 5, 4, 2),
        (0, 0, 9, 6, 3),
        (2, 1, 3, 1, 5),
        (1, 1, 7, 3, 3),
        (1, 3, 2, 9, 1),
        (0, 0, 4, 2, 6),
        (1, 1, 6, 5, 4),
        (2, 2, 3, 3, 7),
        (0, 0, 5, 7, 2),
    ]
    pairs = [make_pair(model, *s, seed=i) for i, s in enumerate(shapes)]
    collate = lambda ps: collate_pairs(ps, "tree", reduction)  # noqa: E731
    start = precompute_reference(model, pairs, collate, batch_pairs=len(pairs))
    g = torch.Generator().manual_seed(7)
    table = {
        src: [c + float(dc), r + float(dr)]
        for (src, (c, r)), (dc, dr) in zip(start.items(), torch.randn(len(pairs), 2, generator=g) * 3)
    }
    cfg = MPOLossConfig(preference=preference, beta=0.1, generation_reduction=reduction)
    layout = {0: [pairs[0:3], pairs[3:4]], 1: [[pairs[5], pairs[8]], pairs[4:5] + pairs[6:8]]}
    assert all(p["num_tiles"] == 0 for p in layout[1][0]) and any(p["num_tiles"] for p in layout[0][0])
    one_step_versus_reference(
        out,
        model,
        objective(cfg, cached_reference(table)),
        objective(cfg, cached_reference(table)),
        pairs,
        layout,
        collate,
        zero_stage,
    )
    del model
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
