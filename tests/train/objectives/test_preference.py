"""Preference losses against TRL 1.16 itself, hand formulas, and the BCO reward shift's bookkeeping.

TRL 1.16 has no standalone ``dpo_loss``: the maths sits inside ``DPOTrainer._compute_loss(self, model,
inputs, return_outputs)``. We call that unbound method on a stub ``self`` carrying only the attributes
it reads, a fake ``model`` whose output carries per-token log-probs that sum to our sequence log-probs,
and precomputed reference log-probs. It returns the *batch mean* loss, so per-pair losses come from
one call per pair (except AOT, whose sorting couples the batch: there we compare the batch mean).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlmtune.train.objectives.preference import (
    PREFERENCE_LOSSES,
    RewardShift,
    bco_quality_loss,
    preference_loss,
)

B = 6
BETA = 0.3
# variant -> extra arguments; label_smoothing is 0 unless listed (TRL 1.16's sigmoid ignores it: cDPO is hand-checked)
TRL_CASES = {
    "sigmoid": {},
    "hinge": {},
    "ipo": {},
    "sigmoid_norm": {},
    "robust": {"label_smoothing": 0.1},
    "bco_pair": {},
    "sppo_hard": {},
    "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1},
    "exo_pair": {"label_smoothing": 1e-3},
    "nca_pair": {},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {"discopop_tau": 0.05},
}
LENGTH_NORMALISED = {"ipo", "sigmoid_norm"}
BATCH_COUPLED = {"aot", "aot_unpaired"}


def random_logps(seed: int = 0, n: int = B) -> tuple[torch.Tensor, ...]:
    """Summed response log-probs in float64, reference near policy so the log-ratios are O(1)."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2, n, generator=g, dtype=torch.float64) * 40 - 5
    ref = policy + torch.randn(2, n, generator=g, dtype=torch.float64) * 3
    return policy[0], policy[1], ref[0], ref[1]


def random_lengths(seed: int = 0, n: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, 20, (2, n), generator=g)
    return lengths[0], lengths[1]


def trl_dpo(loss_type, pc, pr, rc, rr, *, beta, label_smoothing=0.0, discopop_tau=0.05, lengths=None):
    """TRL 1.16's DPO loss (batch mean) and logged metrics, driven without a model."""
    from trl import DPOTrainer

    logps = torch.cat([pc, pr])  # TRL's batch is [chosen; rejected]
    n = logps.shape[0]
    lengths = torch.cat(lengths) if lengths is not None else torch.ones(n, dtype=torch.long)
    t = int(lengths.max()) + 1
    pos = torch.arange(t)
    completion_mask = ((pos >= 1) & (pos <= lengths[:, None])).long()  # same count shifted or not
    shifted = completion_mask[:, 1:].bool()
    per_token = torch.where(shifted, (logps / lengths)[:, None], torch.zeros((), dtype=logps.dtype))
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(shifted),
    )
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, False)
    return loss, stub._metrics["train"]


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl")


@pytest.mark.parametrize("name", sorted(TRL_CASES))
def test_matches_trl(trl, name):
    pc, pr, rc, rr = random_logps(seed=len(name))
    extra = dict(TRL_CASES[name])
    ours_extra, trl_extra = dict(extra), dict(extra)
    if name in LENGTH_NORMALISED:
        lc, lr = random_lengths(seed=len(name))
        ours_extra |= {"chosen_lengths": lc, "rejected_lengths": lr}
        trl_extra["lengths"] = (lc, lr)
    out = preference_loss(name, pc, pr, rc, rr, beta=BETA, **ours_extra)

    trl_mean, metrics = trl_dpo(name, pc, pr, rc, rr, beta=BETA, **trl_extra)
    torch.testing.assert_close(out.losses.mean(), trl_mean)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-12)
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-12)
    if name in BATCH_COUPLED:
        return
    per_pair = []
    for i in range(B):
        one = {**trl_extra}
        if name in LENGTH_NORMALISED:
            one["lengths"] = (lc[i : i + 1], lr[i : i + 1])
        per_pair.append(
            trl_dpo(name, pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], beta=BETA, **one)[0]
        )
    torch.testing.assert_close(out.losses, torch.stack(per_pair))


def test_every_variant_is_checked():
    assert set(PREFERENCE_LOSSES) - set(TRL_CASES) == {
        "aot_pair"
    }  # checked as aot_unpaired, its TRL 1.16 name
    pc, pr, rc, rr = random_logps(seed=3)
    a = preference_loss("aot_pair", pc, pr, rc, rr, beta=BETA, label_smoothing=0.2).losses
    b = preference_loss("aot_unpaired", pc, pr, rc, rr, beta=BETA, label_smoothing=0.2).losses
    torch.testing.assert_close(a, b)


def test_cdpo_label_smoothing_by_hand():
    pc, pr, rc, rr = random_logps(seed=4)
    eps = 0.15
    out = preference_loss("sigmoid", pc, pr, rc, rr, beta=BETA, label_smoothing=eps)
    for i in range(B):
        z = BETA * ((pc[i] - pr[i]) - (rc[i] - rr[i])).item()
        p = 1 / (1 + math.exp(-z))
        assert out.losses[i].item() == pytest.approx(
            -(1 - eps) * math.log(p) - eps * math.log(1 - p), rel=1e-12
        )


def test_aot_pair_sorts_each_side_by_hand():
    pc = torch.tensor([-1.0, -5.0, -2.0])
    pr = torch.tensor([-4.0, -3.0, -6.0])
    rc = torch.zeros(3)
    rr = torch.zeros(3)
    # sorted chosen ratios [-5, -2, -1], sorted rejected [-6, -4, -3] -> margins [1, 2, 2]
    out = preference_loss("aot_pair", pc, pr, rc, rr, beta=1.0)
    expected = [math.log1p(math.exp(-m)) for m in (1.0, 2.0, 2.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_ipo_lengths_equal_averaged_inputs():
    pc, pr, rc, rr = random_logps(seed=5)
    lc, lr = random_lengths(seed=5)
    with_lengths = preference_loss("ipo", pc, pr, rc, rr, beta=BETA, chosen_lengths=lc, rejected_lengths=lr)
    averaged = preference_loss("ipo", pc / lc, pr / lr, rc / lc, rr / lr, beta=BETA)
    torch.testing.assert_close(with_lengths.losses, averaged.losses)
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        preference_loss("ipo", pc, pr, rc, rr, beta=BETA, chosen_lengths=lc)


def test_bad_arguments_are_errors():
    pc, pr, rc, rr = random_logps()
    with pytest.raises(ValueError, match=r"unknown preference loss 'dpo'.*'sigmoid'"):
        preference_loss("dpo", pc, pr, rc, rr, beta=BETA)
    with pytest.raises(ValueError, match=r"'hinge' does not use \['label_smoothing'\]"):
        preference_loss("hinge", pc, pr, rc, rr, beta=BETA, label_smoothing=0.1)
    with pytest.raises(ValueError, match="discopop_tau"):
        preference_loss("sigmoid", pc, pr, rc, rr, beta=BETA, discopop_tau=0.1)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        preference_loss("exo_pair", pc, pr, rc, rr, beta=BETA)
    with pytest.raises(ValueError, match="robust loss needs"):
        preference_loss("robust", pc, pr, rc, rr, beta=BETA, label_smoothing=0.5)


def test_sigmoid_gradient_matches_hand_formula():
    pc, pr, rc, rr = random_logps(seed=7)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    eps = 0.1
    out = preference_loss("sigmoid", pc, pr, rc, rr, beta=BETA, label_smoothing=eps)
    out.losses.sum().backward()
    z = BETA * ((pc - rc) - (pr - rr)).detach()
    # d/dz [-(1-eps) log s(z) - eps log s(-z)] = -(1-eps) s(-z) + eps s(z); dz/dpc = beta, dz/dpr = -beta
    dz = -(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)
    torch.testing.assert_close(pc.grad, BETA * dz)
    torch.testing.assert_close(pr.grad, -BETA * dz)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_bco_quality_loss_by_hand():
    # chosen log-ratio 1, rejected log-ratio -1, beta 0.5 -> rewards 0.5 and -0.5
    pc, rc = torch.tensor([-3.0]), torch.tensor([-4.0])
    pr, rr = torch.tensor([-5.0]), torch.tensor([-4.0])
    out = bco_quality_loss(pc, pr, rc, rr, beta=0.5, delta=0.2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out.losses.item() == pytest.approx(
        -math.log(sig(0.5 - 0.2)) - math.log(sig(-(-0.5 - 0.2))), rel=1e-6
    )
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (0.5, -0.5)


def test_bco_without_shift_is_trl_bco_pair(trl):
    pc, pr, rc, rr = random_logps(seed=8)
    ours = bco_quality_loss(pc, pr, rc, rr, beta=BETA, delta=0.0).losses
    trl_per_pair = [
        trl_dpo("bco_pair", pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], beta=BETA)[0]
        for i in range(B)
    ]
    torch.testing.assert_close(ours, torch.stack(trl_per_pair))


def test_reward_shift_is_mean_of_all_rewards_and_round_trips():
    shift = RewardShift()
    assert shift.value == 0.0
    seen = []
    for seed, n in [(0, 3), (1, 5), (2, 1)]:  # unequal batch sizes: every reward weighs the same
        c, r = torch.randn(n, generator=torch.Generator().manual_seed(seed)), torch.randn(n) + 1
        seen += c.tolist() + r.tolist()
        assert shift.update(c, r) == pytest.approx(sum(seen) / len(seen), rel=1e-12)
    restored = RewardShift()
    restored.load_state_dict(shift.state_dict())
    assert (restored.value, restored.count) == (shift.value, len(seen))
    with pytest.raises(ValueError, match="keys 'total' and 'count'"):
        restored.load_state_dict({"mean": 0.0})


def test_update_then_use_reproduces_old_trl_bco_pair():
    """Pre-1.0 TRL bco_pair (what MPO ran): running.update(batch mean reward); delta = running.mean; then the loss."""
    beta, shift = 0.2, RewardShift()
    old_mean, old_count = 0.0, 1e-24  # trl.trainer.utils.RunningMoments, fed one scalar per batch
    for step in range(3):
        pc, pr, rc, rr = random_logps(seed=10 + step)
        rewards = torch.cat([beta * (pc - rc), beta * (pr - rr)]).mean()
        old_count_new = old_count + 1
        old_mean = old_mean + (rewards.item() - old_mean) * 1 / old_count_new
        old_count = old_count_new
        old_losses = -F.logsigmoid(beta * (pc - rc) - old_mean) - F.logsigmoid(-(beta * (pr - rr) - old_mean))

        out = bco_quality_loss(
            pc, pr, rc, rr, beta=beta, delta=shift.value
        )  # rewards only; loss recomputed below
        delta = shift.update(out.chosen_rewards, out.rejected_rewards)
        torch.testing.assert_close(
            bco_quality_loss(pc, pr, rc, rr, beta=beta, delta=delta).losses, old_losses
        )


def _reward_shift_rank(rank: int, init: str, out: str) -> None:
    """One of two gloo ranks: each sees other rewards, in batches of other sizes."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        shift = RewardShift()
        if rank == 0:
            delta = shift.update(torch.tensor([1.0, 2.0]), torch.tensor([6.0]))
        else:
            delta = shift.update(torch.tensor([10.0]), torch.tensor([20.0, 30.0, 40.0]))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"delta": delta, "count": shift.count}))
    finally:
        dist.destroy_process_group()


def test_reward_shift_all_reduces_across_two_real_ranks(tmp_path):
    """Two gloo processes with different rewards (3 and 4 of them): both hold the mean of all 7,
    109 / 7, which neither rank's own rewards give (3.0 and 25.0)."""
    import torch.multiprocessing as mp

    mp.spawn(_reward_shift_rank, args=(f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["count"] == 7 and got["delta"] == pytest.approx(109 / 7)
