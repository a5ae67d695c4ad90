"""Mixed Preference Optimization: w_p * preference + w_q * quality (BCO with its reward shift) + w_g * NLL.

The policy reads every response log-prob from one forward over a packed row of pairs
(data/collate.py: ``collate_pairs``), images encoded once per pair; the reference does the same
without gradients and, when the vision tower and projector are frozen, reuses the policy's image
features (they are the same function of the same pixels). The reward shift delta is the running
mean of the rewards of all *past* optimizer steps (updated once per step, all ranks): using the
current micro-batch's rewards as TRL does would make delta depend on how a step is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmtune.data.token_weights import loss_normaliser
from vlmtune.train.model.forward import batch_to_device, encode_images
from vlmtune.train.model.sequence_parallel import (
    active_sequence_parallel,
    sequence_parallel_forward,
    sp_all_reduce,
)
from vlmtune.train.objectives.logps import forward_token_logps
from vlmtune.train.objectives.preference import RewardShift, bco_quality_loss, preference_loss

LENGTH_NORMALISED = ("ipo", "sigmoid_norm")


@dataclass
class MPOLossConfig:
    """The ``loss`` group for `vlmtune mpo` (defaults: the MPO paper / InternVL's launch scripts)."""

    preference: str = (
        "sigmoid"  # train/objectives/preference.py: sigmoid (DPO), ipo, hinge, robust, bco_pair, ...
    )
    beta: float = 0.1  # strength of the KL anchor to the reference
    label_smoothing: float = 0.0  # conservative DPO (sigmoid) / robust / exo / aot
    preference_weight: float = 0.8  # w_p
    quality_weight: float = 0.2  # w_q (BCO with reward shift)
    generation_weight: float = 1.0  # w_g (NLL of the chosen response; InternVL's rpo_alpha)
    generation_reduction: str = "token"  # token | sample | square, as SFT
    layout: str = "auto"  # tree (prompt shared, sdpa/eager) | separate (flash-attention) | auto


def check_mpo_config(cfg: MPOLossConfig) -> None:
    """Refuse at start what would fail at the first step."""
    from vlmtune.data.token_weights import reduction_exponent
    from vlmtune.train.objectives.preference import PREFERENCE_LOSSES

    if cfg.preference not in PREFERENCE_LOSSES:
        raise ValueError(f"loss.preference={cfg.preference!r} is unknown; valid: {sorted(PREFERENCE_LOSSES)}")
    if cfg.preference == "exo_pair" and cfg.label_smoothing <= 0:
        raise ValueError("loss.preference=exo_pair needs loss.label_smoothing > 0 (TRL used 1e-3)")
    for name in ("preference_weight", "quality_weight", "generation_weight", "beta"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"loss.{name} must be >= 0, got {getattr(cfg, name)}")
    reduction_exponent(cfg.generation_reduction)
    if cfg.layout not in ("auto", "tree", "separate"):
        raise ValueError(f"loss.layout={cfg.layout!r} is unknown; valid: auto, tree, separate")


def resolve_layout(layout: str, attn_implementation: str) -> str:
    if layout == "auto":  # varlen kernels beat a dense tree mask on a GPU (H200, InternVL3-1B: 1.3x)
        varlen = attn_implementation.startswith("flash") or attn_implementation == "packed_varlen"
        return "separate" if varlen else "tree"
    if layout == "tree" and attn_implementation.startswith("flash"):
        raise ValueError("loss.layout=tree needs sdpa or eager attention (flash-attention has no tree masks)")
    return layout


def response_logps(
    model: torch.nn.Module, batch: dict[str, Any], image_outputs: Any = None
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Summed log-probs per pair and branch [B, 2], per response token log-probs [N], and the image encoding.

    Under sequence parallelism the token log-probs are this rank's slice's (0 elsewhere) and the sums are
    all-reduced over the SP group, with a gradient: the preference terms are not linear in them.
    """
    encoded = image_outputs if image_outputs is not None else encode_images(model, batch["pixel_values"])
    keep, index = torch.unique(batch["resp_pos"], return_inverse=True)
    token = forward_token_logps(model, batch, keep, index, batch["resp_target"], encoded)
    token = token * batch["resp_supervised"]
    seq = torch.zeros(batch["num_pairs"], 2, dtype=token.dtype, device=token.device)
    seq = seq.index_put((batch["resp_pair"], batch["resp_branch"]), token, accumulate=True)
    return sp_all_reduce(seq, active_sequence_parallel()), token, encoded


class MPOObjective:
    """Turns a batch of pairs into the MPO loss share and metrics (see train/objectives/__init__.py)."""

    def __init__(self, cfg: MPOLossConfig, reference: Any, share_vision: bool) -> None:
        self.cfg = cfg
        self.reference = reference
        self.share_vision = share_vision
        self.shift = RewardShift()
        self._step_rewards: list[torch.Tensor] = []

    @property
    def needs_reference(self) -> bool:
        return bool(self.cfg.preference_weight or self.cfg.quality_weight)

    def weight_totals(self, batch: dict[str, Any]) -> torch.Tensor:
        gen = loss_normaliser(batch["chosen_counts"], self.cfg.generation_reduction)
        return torch.stack([torch.tensor(float(batch["num_pairs"]), dtype=torch.float64), gen])

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, Any], totals: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        batch = batch_to_device(batch, model)
        with sequence_parallel_forward(model) as sp:  # the policy's forward and the reference's
            policy, token, encoded = response_logps(model, batch)
            if self.needs_reference:
                with torch.no_grad():
                    ref = self.reference(batch, encoded if self.share_vision else None)
        # Terms of the group's (all-reduced) pair sums are the same on every SP rank: each carries 1/size
        # of them, so that the shares add up over the group like the generation term's, a sum over tokens.
        n_pairs = totals[0].item() * (sp.size if sp is not None else 1)
        gen_norm = totals[1].item()
        gen_sum = -(token * batch["gen_weights"]).sum()  # this rank's tokens (all of them without SP)
        loss = cfg.generation_weight * gen_sum / gen_norm
        metrics = {"loss/generation": gen_sum.item() / gen_norm}
        if self.needs_reference:
            delta = self.shift.value
            four = (policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1])
            extra = {}
            if cfg.preference in LENGTH_NORMALISED:
                lengths = batch["response_lengths"].to(policy.device).clamp(min=1)
                extra = {"chosen_lengths": lengths[:, 0], "rejected_lengths": lengths[:, 1]}
            pref = preference_loss(
                cfg.preference, *four, beta=cfg.beta, label_smoothing=cfg.label_smoothing, **extra
            )
            quality = bco_quality_loss(*four, beta=cfg.beta, delta=delta)
            if cfg.preference_weight:
                loss = loss + cfg.preference_weight * pref.losses.sum() / n_pairs
            if cfg.quality_weight:
                loss = loss + cfg.quality_weight * quality.losses.sum() / n_pairs
            if sp is None or sp.rank == 0:  # the group's rewards once
                self._step_rewards.append(
                    torch.cat([pref.chosen_rewards, pref.rejected_rewards]).detach().double().cpu()
                )
            chosen, rejected = pref.chosen_rewards, pref.rejected_rewards
            metrics.update(
                {
                    "loss/preference": pref.losses.sum().item() / n_pairs,
                    "loss/quality": quality.losses.sum().item() / n_pairs,
                    "rewards/chosen": chosen.sum().item() / n_pairs,
                    "rewards/rejected": rejected.sum().item() / n_pairs,
                    "rewards/accuracy": (chosen > rejected).float().sum().item() / n_pairs,
                    "rewards/margin": (chosen - rejected).sum().item() / n_pairs,
                    "bco/delta": delta * batch["num_pairs"] / n_pairs,
                }
            )
        metrics.update(
            {
                "logps/chosen": policy[:, 0].sum().item() / n_pairs,
                "logps/rejected": policy[:, 1].sum().item() / n_pairs,
                "loss": loss.item(),
            }
        )
        return loss, metrics

    def on_step_end(self, applied: bool = True) -> None:
        """Fold this step's rewards into delta (a collective: every rank calls it once per step); a
        skipped step's (non-finite) rewards are dropped, on every rank alike."""
        if not self.needs_reference:
            return
        if not applied:
            self._step_rewards = []
            return
        rewards = torch.cat(self._step_rewards) if self._step_rewards else torch.zeros(0, dtype=torch.float64)
        self.shift.update(rewards, rewards[:0])
        self._step_rewards = []

    def state_dict(self) -> dict[str, Any]:
        return {"reward_shift": self.shift.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shift.load_state_dict(state["reward_shift"])
