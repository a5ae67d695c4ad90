"""MPO: prompt sharing and shared vision give the naive path's log-probs and gradients; the loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.helpers import make_sample, tiny_model, tiny_tokenizer
from vlmtune.data.collate import collate_pairs
from vlmtune.train.objectives.mpo import MPOLossConfig, MPOObjective, response_logps


def make_pairs(model):
    tok = tiny_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pairs = []
    for i, (n_img, tiles, c, r) in enumerate([(1, 2, 3, 5), (0, 0, 4, 2), (2, 1, 1, 6)]):
        base = make_sample(model, n_img, tiles, prompt_len=4, answer_len=0, seed=i)
        prompt = base["input_ids"][:-1]  # drop the sample's <|im_end|>: the prompt ends before the answer
        g = torch.Generator().manual_seed(100 + i)
        chosen = torch.cat([torch.randint(300, 1000, (c,), generator=g), torch.tensor([end])])
        rejected = torch.cat([torch.randint(300, 1000, (r,), generator=g), torch.tensor([end])])
        pairs.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": chosen,
                "chosen_labels": chosen.clone(),
                "rejected_ids": rejected,
                "rejected_labels": rejected.clone(),
                "pixel_values": base["pixel_values"],
                "num_tiles": base["num_tiles"],
            }
        )
    return pairs


def _naive_logps(model, pairs):
    """Two independent forwards per pair, each encoding its images: what the peers do."""
    out = torch.zeros(len(pairs), 2)
    for i, pair in enumerate(pairs):
        for b, key in enumerate(("chosen", "rejected")):
            ids = torch.cat([pair["prompt_ids"], pair[f"{key}_ids"]])[None]
            kwargs = {"pixel_values": pair["pixel_values"]} if pair["num_tiles"] else {}
            logits = model(input_ids=ids, **kwargs).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            out[i, b] = logp[len(pair["prompt_ids"]) - 1 :].sum()
    return out


class _VisionCounter:
    def __init__(self, model):
        self.calls = 0
        model.model.vision_tower.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


@pytest.mark.parametrize("layout", ["tree", "separate"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layouts_equal_naive_logps_and_grads_with_one_vision_pass(layout, attn):
    model = tiny_model(attn_implementation=attn).eval()
    pairs = make_pairs(model)
    counter = _VisionCounter(model)
    naive = _naive_logps(model, pairs)
    naive.sum().backward()
    grads_naive = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    naive_calls, counter.calls = counter.calls, 0
    model.zero_grad()

    batch = collate_pairs(pairs, layout, "token")
    seq, _, _ = response_logps(model, batch)
    torch.testing.assert_close(seq, naive, rtol=1e-4, atol=1e-4)
    seq.sum().backward()
    assert counter.calls == 1  # every pair's images encoded once, for both answers
    assert naive_calls == 4  # two pairs with images x chosen/rejected
    for name, grad in grads_naive.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-5, msg=name
        )


def test_mpo_loss_by_hand_and_delta_from_past_steps():
    model = tiny_model().eval()
    pairs = make_pairs(model)
    batch = collate_pairs(pairs, "tree", "token")
    ref = torch.tensor([[-20.0, -25.0], [-18.0, -12.0], [-9.0, -30.0]])
    cfg = MPOLossConfig(beta=0.1, preference_weight=0.8, quality_weight=0.2, generation_weight=1.0)
    objective = MPOObjective(cfg, reference=lambda b, shared: ref, share_vision=True)
    objective.shift.total, objective.shift.count = 0.6, 4  # delta = 0.15 from "past steps"
    totals = objective.weight_totals(batch)
    loss, metrics = objective(model, batch, totals)

    with torch.no_grad():
        pol, _, _ = response_logps(model, batch)
    beta, delta = 0.1, 0.15
    expected = 0.0
    for i in range(3):
        rc, rr = beta * (pol[i, 0] - ref[i, 0]), beta * (pol[i, 1] - ref[i, 1])
        dpo = -math.log(1 / (1 + math.exp(-(rc - rr))))
        bco = -math.log(1 / (1 + math.exp(-(rc - delta)))) - math.log(
            1 / (1 + math.exp(rc * 0 + (rr - delta)))
        )
        expected += (0.8 * dpo + 0.2 * bco) / 3
    n_chosen = sum(len(p["chosen_ids"]) for p in pairs)
    expected += -pol[:, 0].sum().item() / n_chosen  # token-averaged NLL of the chosen answers
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["bco/delta"] == pytest.approx(0.15)
    assert metrics["rewards/accuracy"] == pytest.approx(
        sum(float(pol[i, 0] - ref[i, 0] > pol[i, 1] - ref[i, 1]) for i in range(3)) / 3
    )

    # delta moves only at the step's end, to the mean of all rewards seen
    rewards = torch.cat([beta * (pol[:, 0] - ref[:, 0]), beta * (pol[:, 1] - ref[:, 1])])
    objective.on_step_end()
    assert objective.shift.value == pytest.approx((0.6 + rewards.sum().item()) / (4 + 6), rel=1e-6)
    state = objective.state_dict()
    fresh = MPOObjective(cfg, reference=None, share_vision=True)
    fresh.load_state_dict(state)
    assert fresh.shift.value == objective.shift.value


def test_generation_only_needs_no_reference():
    model = tiny_model().eval()
    batch = collate_pairs(make_pairs(model), "tree", "square")
    objective = MPOObjective(
        MPOLossConfig(preference_weight=0.0, quality_weight=0.0, generation_reduction="square"), None, True
    )
    loss, metrics = objective(model, batch, objective.weight_totals(batch))
    assert "rewards/chosen" not in metrics and loss.item() > 0


def test_precomputed_reference_equals_live_reference(tmp_path):
    from vlmtune.train.objectives.reference import (
        cache_key,
        cached_reference,
        frozen_copy_reference,
        precompute_reference,
    )

    model = tiny_model().eval()
    pairs = make_pairs(model)
    for i, p in enumerate(pairs):
        p["source"] = f"pairs.jsonl:{i + 1}"
    live = frozen_copy_reference(model, {"zero_optimization": {"stage": 0}})
    cache = precompute_reference(model, pairs, lambda ps: collate_pairs(ps, "tree", "token"), batch_pairs=2)
    batch = collate_pairs([pairs[2], pairs[0]], "separate", "token")  # another grouping and layout
    torch.testing.assert_close(cached_reference(cache)(batch, None), live(batch, None), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="does not match"):
        cached_reference({})(batch, None)
    # the key moves with the data
    meta = tmp_path / "meta.json"
    (tmp_path / "a.jsonl").write_text('{"question": "q", "chosen": "a", "rejected": "b"}\n')
    meta.write_text('{"d": {"root": ".", "annotation": "a.jsonl"}}')
    key = cache_key(str(meta), None, {"max_length": 10})
    (tmp_path / "a.jsonl").write_text('{"question": "q", "chosen": "a", "rejected": "c"}\n')
    assert cache_key(str(meta), None, {"max_length": 10}) != key
