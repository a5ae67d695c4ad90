"""Preference losses for MPO as pure functions of per-sequence log-probs (no model inside).

Every loss reads the four summed log-probs of a batch of pairs (policy/reference x chosen/rejected,
each shape [B]) and returns per-pair losses [B] plus the implicit rewards beta * (log pi - log pi_ref),
detached, as TRL's DPOTrainer logs them. MPO (InternVL2.5 report, "Mixed Preference Optimization",
arXiv 2411.10442) sums a preference loss (``sigmoid`` = DPO), the quality loss of BCO with its reward
shift delta (``bco_quality_loss`` + ``RewardShift``) and the SFT loss; its ablation table swaps the
preference term for the other variants here. Formulas mirror TRL 1.16 ``DPOTrainer._compute_loss``
(reverse-KL only), except that ``sigmoid`` keeps cDPO's label smoothing (TRL 1.16 dropped it) and
``aot_pair`` keeps its pre-1.16 name (TRL 1.16 calls it ``aot_unpaired``; both names work here).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


class PreferenceOutput(NamedTuple):
    losses: torch.Tensor  # [B] per pair; the objective chooses the reduction
    chosen_rewards: torch.Tensor  # [B] beta * (policy - ref) log-prob of the chosen response, detached
    rejected_rewards: torch.Tensor  # [B] same for the rejected response


class LogProbs(NamedTuple):
    """The four summed response log-probs of a batch of pairs, and the log-ratios every loss is built on."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    @property
    def chosen(self) -> torch.Tensor:
        """log pi(y_c|x) / pi_ref(y_c|x)."""
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected(self) -> torch.Tensor:
        """log pi(y_r|x) / pi_ref(y_r|x)."""
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """Chosen minus rejected log-ratio: the DPO logit before beta."""
        return self.chosen - self.rejected


def _smoothed_logistic(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-eps) log sigma(z) - eps log sigma(-z): logistic loss when the label is flipped with probability eps."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def sigmoid_loss(lp: LogProbs, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): logistic loss on the beta-scaled log-ratio margin.

    ``label_smoothing`` > 0 gives conservative DPO (cDPO, Mitchell 2023): labels flipped with that probability.
    """
    return _smoothed_logistic(beta * lp.margin, label_smoothing)


def hinge_loss(lp: LogProbs, *, beta: float) -> torch.Tensor:
    """SLiC / RSO (Liu et al. 2023, arXiv 2309.06657): hinge on the beta-scaled margin."""
    return torch.relu(1 - beta * lp.margin)


def ipo_loss(
    lp: LogProbs,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): squared distance of the margin to 1/(2 beta).

    IPO is meant on per-token *average* log-ratios: pass the response token counts (TRL 1.16 divides
    the log-ratios by them) or pass averaged log-probs and no lengths (TRL < 1.0 did that).
    """
    chosen, rejected = lp.chosen, lp.rejected
    if chosen_lengths is not None or rejected_lengths is not None:
        chosen, rejected = _per_token(chosen, chosen_lengths), _per_token(rejected, rejected_lengths)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def sigmoid_norm_loss(
    lp: LogProbs, *, beta: float, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor
) -> torch.Tensor:
    """Length-normalised DPO (TRL's ``sigmoid_norm``): DPO on per-token average log-ratios."""
    margin = _per_token(lp.chosen, chosen_lengths) - _per_token(lp.rejected, rejected_lengths)
    return -F.logsigmoid(beta * margin)


def _per_token(logratio: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if lengths is None:
        raise ValueError("pass both chosen_lengths and rejected_lengths (response token counts), or neither")
    return logratio / lengths.to(logratio.dtype).clamp(min=1.0)


def robust_loss(lp: LogProbs, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): unbiased DPO when labels flip with prob. eps < 0.5."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs label_smoothing in [0, 0.5), got {label_smoothing}")
    z = beta * lp.margin
    clean = -(1 - label_smoothing) * F.logsigmoid(z)
    flipped = -label_smoothing * F.logsigmoid(-z)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def _bco(lp: LogProbs, beta: float, delta: float | torch.Tensor) -> torch.Tensor:
    """Binary classifier of Jung et al. 2024: chosen rewards pushed above delta, rejected below."""
    return -F.logsigmoid(beta * lp.chosen - delta) - F.logsigmoid(-(beta * lp.rejected - delta))


def bco_pair_loss(lp: LogProbs, *, beta: float) -> torch.Tensor:
    """BCO on pairs as TRL 1.16 has it (arXiv 2404.04656), i.e. without the reward shift (delta = 0)."""
    return _bco(lp, beta, 0.0)


def sppo_hard_loss(lp: LogProbs, *, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675): log-ratios regressed to +-1/(2 beta)."""
    return (lp.chosen - 0.5 / beta) ** 2 + (lp.rejected + 0.5 / beta) ** 2


def aot_loss(lp: LogProbs, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT paired (Melnyk et al. 2024, arXiv 2406.05882): DPO on the batch-sorted policy vs reference margins.

    Sorting couples the batch: loss i belongs to the i-th order statistic, not to pair i; only the mean means anything.
    """
    policy, _ = torch.sort(lp.policy_chosen - lp.policy_rejected, dim=0)
    ref, _ = torch.sort(lp.ref_chosen - lp.ref_rejected, dim=0)
    return _smoothed_logistic(beta * (policy - ref), label_smoothing)


def aot_pair_loss(lp: LogProbs, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT unpaired (arXiv 2406.05882): DPO on batch-sorted chosen vs batch-sorted rejected log-ratios (see aot)."""
    chosen, _ = torch.sort(lp.chosen, dim=0)
    rejected, _ = torch.sort(lp.rejected, dim=0)
    return _smoothed_logistic(beta * (chosen - rejected), label_smoothing)


def exo_pair_loss(lp: LogProbs, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """EXO (Ji et al. 2024, arXiv 2402.00856, eq. 16): KL from the policy's pair distribution to [1-eps, eps]."""
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"exo_pair needs label_smoothing (epsilon) in (0, 1), e.g. 1e-3; got {label_smoothing}"
        )
    z = beta * lp.margin
    win = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
    lose = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing))
    return win + lose


def nca_pair_loss(lp: LogProbs, *, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv 2402.05369): raises the chosen reward in absolute terms, lowers both otherwise."""
    chosen, rejected = beta * lp.chosen, beta * lp.rejected
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def apo_zero_loss(lp: LogProbs, *, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7): chosen up, rejected down (chosen beats the model)."""
    return 1 - torch.sigmoid(beta * lp.chosen) + torch.sigmoid(beta * lp.rejected)


def apo_down_loss(lp: LogProbs, *, beta: float) -> torch.Tensor:
    """APO-down (arXiv 2408.06266, eq. 8): both down, rejected more (chosen is worse than the model's own output)."""
    return torch.sigmoid(beta * lp.chosen) + 1 - torch.sigmoid(beta * lp.margin)


def discopop_loss(lp: LogProbs, *, beta: float, discopop_tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5): logistic/exponential blend gated by the margin."""
    z = beta * lp.margin
    gate = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1 - gate) + torch.exp(-z) * gate


PREFERENCE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_pair": aot_pair_loss,
    "aot_unpaired": aot_pair_loss,  # TRL >= 1.0 name of aot_pair
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
}


def _rewards(lp: LogProbs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * lp.chosen.detach(), beta * lp.rejected.detach()


def preference_loss(
    name: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    **extra: object,
) -> PreferenceOutput:
    """Per-pair loss of the variant ``name`` and the implicit rewards; inputs are summed response log-probs [B].

    ``extra`` carries variant-specific inputs (``chosen_lengths``/``rejected_lengths`` for ipo and
    sigmoid_norm, ``discopop_tau``). An argument the variant does not use is an error, not ignored.
    """
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid: {sorted(PREFERENCE_LOSSES)}")
    fn = PREFERENCE_LOSSES[name]
    kwargs = {"beta": beta, **extra} | ({"label_smoothing": label_smoothing} if label_smoothing else {})
    accepted = set(inspect.signature(fn).parameters) - {"lp"}
    if unused := sorted(set(kwargs) - accepted):
        raise ValueError(f"preference loss {name!r} does not use {unused}; it takes {sorted(accepted)}")
    lp = LogProbs(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return PreferenceOutput(fn(lp, **kwargs), *_rewards(lp, beta))


def bco_quality_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    delta: float | torch.Tensor,
) -> PreferenceOutput:
    """MPO's quality loss, BCO (Jung et al. 2024, arXiv 2404.04656) with its reward shift delta.

    -log sigma(r_c - delta) - log sigma(-(r_r - delta)), r = beta * log pi/pi_ref: judges each response
    on its own against delta, the running mean of past rewards (``RewardShift.value``), which
    stabilises training. TRL 1.16's ``bco_pair`` is this with delta = 0.
    """
    lp = LogProbs(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return PreferenceOutput(_bco(lp, beta, delta), *_rewards(lp, beta))


class RewardShift:
    """The delta of ``bco_quality_loss``: mean of every implicit reward seen so far, chosen and rejected alike.

    When to ``update`` is the caller's choice. TRL's BCO (``BCOTrainer.bco_loss``, the pre-1.0
    ``DPOTrainer`` bco_pair) updates with the current micro-batch first, so a step's delta includes its
    own rewards; `MPOObjective` updates once per optimizer step, after it (``on_step_end``), so a step's
    delta is the mean of the earlier steps' rewards (0 at the first step) and the same in every
    micro-batch of the step, however the pairs were split. ``update`` sums rewards and counts over data-parallel ranks
    (an all-reduce when torch.distributed is initialised, so every rank must call it equally often)
    and therefore all ranks hold the same delta. Pre-1.0 TRL averaged per-batch means; counting
    every reward instead is the same when micro-batches have equal sizes and right when they don't.
    Do not call ``update`` in evaluation (TRL's ``do_train=False``).
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    @torch.no_grad()
    def update(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
        """Add this micro-batch's rewards (all ranks) to the running mean; returns the new delta."""
        rewards = torch.cat([chosen_rewards.detach().flatten(), rejected_rewards.detach().flatten()]).double()
        stats = torch.stack(
            [rewards.sum(), torch.tensor(float(rewards.numel()), dtype=torch.float64, device=rewards.device)]
        )
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                stats = stats.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(stats)
        total, count = stats.tolist()
        self.total += total
        self.count += round(count)
        return self.value

    def state_dict(self) -> dict[str, float | int]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        if set(state) != {"total", "count"}:
            raise ValueError(f"RewardShift state must have keys 'total' and 'count', got {sorted(state)}")
        self.total, self.count = float(state["total"]), int(state["count"])
