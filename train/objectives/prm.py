"""The maths of a process reward model at test time: step scores from logits, a response's score
from its steps', and what Best-of-N reports beside it (majority vote, pass@N). Pure functions.

A step's score is P(``+``) at its assistant turn (VisualPRM, arXiv 2503.10291, section 3.2): the
softmax over the ``+`` and ``-`` tokens' logits alone, at the position that predicts the turn's
content (the last token of ``<|im_start|>assistant\\n``). Restricting to the two tokens makes the
score independent of whatever mass the model puts elsewhere; a PRM trained on ``+``/``-`` only puts
nearly all of it on those two anyway. A response's score aggregates its steps' (the paper's
ablation: mean 41.1, min 40.4, max 35.9; ``last`` is the outcome-style reading).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

AGGREGATIONS = ("mean", "min", "max", "last")


def step_probabilities(logits: torch.Tensor, positive_id: int, negative_id: int) -> torch.Tensor:
    """P(``+``) = softmax([logit_+, logit_-])[0] for each row of ``logits`` [..., vocab] (float64)."""
    pair = torch.stack([logits[..., positive_id], logits[..., negative_id]], dim=-1).double()
    return torch.softmax(pair, dim=-1)[..., 0]


def aggregate(scores: Sequence[float], how: str = "mean") -> float:
    """A response's score from its steps' (``mean``, ``min``, ``max`` or ``last``)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
    if not scores:
        raise ValueError("a response without steps has no score")
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "min":
        return min(scores)
    if how == "max":
        return max(scores)
    return scores[-1]


def best_of_n(scores: Sequence[float]) -> int:
    """The index of the highest score; a tie goes to the earliest sample (the first drawn), so the
    choice does not depend on anything but the scores' order."""
    if not scores:
        raise ValueError("best-of-N needs at least one sample")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """The index of the first sample giving the most frequent answer (None answers do not vote);
    a tie goes to the answer that appeared first. None when no sample gave an answer."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def pass_at(correct: Sequence[bool], n: int) -> bool:
    """Whether any of the first ``n`` samples is right (pass@N with N samples drawn: no estimator)."""
    return any(correct[:n])
