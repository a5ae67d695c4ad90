"""Run by tests/train/model/test_sequence_parallel.py under torchrun (2 ranks, gloo, one SP group of 2).

Model level (``sp_result.json``): for each case, the loss and every parameter gradient of one batch
through an objective, un-split in this process, against the same batch split over the SP group
(Ulysses attention, `train.model.sequence_parallel`; each rank encodes its share of the tiles): the
group's summed losses, gradients (the vision tower's included) and metric shares must be the un-split
ones. Cases: SFT packs with images (V2PE off and on, a KV head replicated, packed_varlen, gradient
checkpointing), a ``supervision: all`` text record of odd length (padding), a pack where one rank holds no
target and the other no image token, a pack of 5 tiles (shares of 3 and 2), a pack of one tile (rank 1's
share empty: a blank tile), LoRA adapters on the LLM and the vision tower, MPO pairs in the tree and
separate layouts (V2PE off and on), one where a rank holds no response token. The un-split side takes the
full logits, the split side the chunked head. Each case records the real tiles each rank's vision tower ran
on (a blank tile, for an empty share or a text-only batch, not counted).

Loop level (``result.json``, ``metrics.jsonl``; MPO's in ``mpo/``): `dist_grad_check.one_step_versus_reference`
over a DeepSpeed engine at the ZeRO stage in argv whose model is split over the SP group, both ranks
drawing the same micro-batches: the weight change after one SGD(lr=1) step must be the one-process gradient.
A third (``tiles/``): SFT micro-batches of one tile (rank 1 encodes a blank tile) and of 3 tiles (2 and 1).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.train.dist_grad_check import one_step_versus_reference  # noqa: E402
from tests.train.helpers import make_pair, make_sample, tiny_model, tiny_model_config, tiny_tokenizer  # noqa: E402
from vlmtune.data.collate import collate_packed, collate_pairs  # noqa: E402
from vlmtune.train.model.build import build_model  # noqa: E402
from vlmtune.train.model.lm_head import HEAD_CHUNK_ATTR  # noqa: E402
from vlmtune.train.model.lora import LoRAConfig  # noqa: E402
from vlmtune.train.model.sequence_parallel import enable_sequence_parallel  # noqa: E402
from vlmtune.train.model.unwrap import unwrap  # noqa: E402
from vlmtune.train.model.v2pe import V2PEConfig, apply_v2pe_config  # noqa: E402
from vlmtune.train.objectives.mpo import MPOLossConfig, MPOObjective  # noqa: E402
from vlmtune.train.objectives.reference import frozen_copy_reference  # noqa: E402
from vlmtune.train.objectives.sft import SFTObjective  # noqa: E402
from vlmtune.train.runtime.engine import init_distributed, shutdown_distributed  # noqa: E402

SP = 2
ZERO0 = {"zero_optimization": {"stage": 0}}


def build(delta: float = 1.0, sp: bool = False, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny model with V2PE's δ; with ``sp``, split over the group, its LM head 8 rows at a time;
    without, through the full logits. Eval mode (no dropout), but training mode under gradient
    checkpointing, which only training mode applies (the tiny model's dropout rates are all 0): its
    backward recomputes the layers, all-to-alls included, on every rank in the same order."""
    model = tiny_model(seed=seed, head_chunk_size=8 if sp else 0, **overrides)
    model.train(bool(overrides.get("gradient_checkpointing")))
    apply_v2pe_config(model, V2PEConfig(delta=delta))
    if sp:
        enable_sequence_parallel(model, SP)
    return model


def build_lora(sp: bool) -> torch.nn.Module:
    """The tiny model with LoRA adapters on the LLM (r 4) and the vision tower (r 2), the projector trained in
    full (tests/train/e2e.py's ``LORA``), no adapter dropout; B drawn at random (not peft's zeros), so that
    every adapter matrix gets a gradient."""
    lora = LoRAConfig(dropout=0.0)
    lora.llm.enabled, lora.llm.r = True, 4
    lora.vision.enabled, lora.vision.r = True, 2
    torch.manual_seed(0)
    cfg = tiny_model_config(head_chunk_size=8 if sp else 0, freeze_vision=True)
    model = build_model(cfg, tiny_tokenizer(), lora).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    if sp:
        enable_sequence_parallel(model, SP)
    return model


def run(
    model: torch.nn.Module, objective: Any, batch: dict
) -> tuple[float, dict[str, torch.Tensor], dict, int]:
    """Loss, gradients, metrics, and how many real (not blank) tiles the vision tower ran on here."""
    tiles = []
    hook = unwrap(model).model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: tiles.append(int(kwargs["pixel_values"].flatten(1).any(1).sum())),
        with_kwargs=True,
    )
    loss, metrics = objective(model, batch, objective.weight_totals(batch))
    hook.remove()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, metrics, sum(tiles)


def group_sum(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone().double()
    dist.all_reduce(value)
    return value


def compare(
    name: str,
    make_model: Callable[[bool], torch.nn.Module],
    make_objective: Callable[[bool], Any],
    batch: dict,
) -> dict[str, Any]:
    """The un-split run vs the group's sums of the split run."""
    ref_loss, ref_grads, ref_metrics, ref_tiles = run(make_model(False), make_objective(False), batch)
    sp_loss, sp_grads, sp_metrics, sp_tiles = run(make_model(True), make_objective(True), batch)
    assert set(sp_grads) == set(ref_grads), set(sp_grads) ^ set(ref_grads)
    diffs = {n: (group_sum(sp_grads[n]) - ref_grads[n].double()).abs().max().item() for n in ref_grads}
    scale = max(g.abs().max().item() for g in ref_grads.values())
    vision = [n for n in ref_grads if "vision_tower" in n]
    tiles = [0] * SP
    dist.all_gather_object(tiles, sp_tiles)
    keys = sorted(ref_metrics)
    summed = group_sum(torch.tensor([float(sp_metrics[k]) for k in keys])).tolist()
    return {
        "case": name,
        "ref_loss": ref_loss,
        "sp_loss": group_sum(torch.tensor(sp_loss)).item(),
        "max_abs_diff": max(diffs.values()),
        "max_grad": scale,
        "vision_max_abs_diff": max(diffs[n] for n in vision),
        "vision_max_grad": max(ref_grads[n].abs().max().item() for n in vision),
        "vision_grads": len(vision),
        "tiles": {"unsplit": ref_tiles, "per_rank": tiles},
        "metrics": {k: [float(ref_metrics[k]), s] for k, s in zip(keys, summed)},
    }


def sft_case(name: str, samples: list[dict], delta: float = 1.0, **overrides: Any) -> dict[str, Any]:
    batch = collate_packed(samples, "square")
    return compare(name, lambda sp: build(delta, sp, **overrides), lambda sp: SFTObjective("square"), batch)


def mpo_case(name: str, pairs: list[dict], layout: str, delta: float = 1.0) -> dict[str, Any]:
    """Preference + quality + generation against a frozen reference of other weights (seed 1), itself
    run split over the group on the split side, so the rewards are not 0."""
    batch = collate_pairs(pairs, layout, "square")

    def objective(sp: bool) -> MPOObjective:
        reference = frozen_copy_reference(build(delta, sp, seed=1), ZERO0)
        made = MPOObjective(MPOLossConfig(preference="sigmoid", beta=0.1), reference, share_vision=False)
        made.shift.total, made.shift.count = 0.6, 4  # delta = 0.15, as if from past steps
        return made

    return compare(name, lambda sp: build(delta, sp), objective, batch)


def model_checks(out: Path) -> None:
    model = tiny_model(seed=0)
    tok = model.config.image_token_id
    shapes = [(1, 2, 5, 4), (0, 0, 9, 6), (2, 1, 3, 1)]
    samples = [make_sample(model, *s, seed=i) for i, s in enumerate(shapes)]
    text = make_sample(model, 0, 0, 21, 0, seed=10)  # a `supervision: all` record: labels = input_ids
    text["labels"] = text["input_ids"].clone()
    assert len(text["input_ids"]) % SP == 1  # the row is padded
    # rank 0's half is the image and its prompt (no target), rank 1's the answer (no image token)
    lopsided = make_sample(model, 1, 2, 2, 32, seed=11)
    half = len(lopsided["input_ids"]) // 2
    assert (lopsided["input_ids"][half:] != tok).all() and (lopsided["labels"][: half + 1] == -100).all()
    pairs = [
        make_pair(model, *s, seed=i)
        for i, s in enumerate([(1, 2, 5, 4, 2), (0, 0, 9, 6, 3), (2, 1, 3, 1, 5)])
    ]
    long_prompt = [make_pair(model, 1, 2, 9, 3, 4, seed=20)]  # rank 0: prompt only, no response position
    # 5 tiles (shares 3 and 2), text first: rank 0's third tile has image tokens in rank 1's slice
    odd = [
        make_sample(model, *s, seed=30 + i) for i, s in enumerate([(0, 0, 9, 6), (1, 3, 5, 4), (2, 1, 3, 1)])
    ]
    one_tile = [make_sample(model, 1, 1, 6, 5, seed=33)]
    assert sum(s["num_tiles"] for s in odd) == 5 and one_tile[0]["num_tiles"] == 1
    results = [
        sft_case("sft_images", samples),
        sft_case("sft_images_v2pe", samples, delta=0.25),
        sft_case("sft_text_all", [text]),
        sft_case("sft_one_rank_no_target", [lopsided], delta=0.5),
        sft_case("sft_kv_replicated", samples, text={"num_key_value_heads": 1}),
        sft_case("sft_packed_varlen", samples, attn_implementation="packed_varlen"),
        sft_case("sft_gradient_checkpointing", samples, delta=0.25, gradient_checkpointing=True),
        sft_case("sft_odd_tiles", odd),
        sft_case("sft_one_tile", one_tile),
        compare("sft_lora", build_lora, lambda sp: SFTObjective("square"), collate_packed(odd, "square")),
        mpo_case("mpo_tree", pairs, "tree"),
        mpo_case("mpo_tree_v2pe", pairs, "tree", delta=0.25),
        mpo_case("mpo_separate", pairs, "separate"),
        mpo_case("mpo_separate_v2pe", pairs, "separate", delta=0.25),
        mpo_case("mpo_one_rank_no_response", long_prompt, "tree"),
    ]
    if dist.get_rank() == 0:
        (out / "sp_result.json").write_text(json.dumps(results, indent=1))


def loop_check(out: Path, zero_stage: int) -> None:
    """One step of the loop over an engine whose model is split over the SP group, SFT (``out``) and MPO
    (``out/mpo``, tree layout, a frozen reference of other weights, itself split); both ranks draw the
    same micro-batches: one text-only, one where rank 0 holds no target (MPO: no response; SFT: and rank 1
    no image token), so that under ZeRO-3 a rank runs the LM head on no row (and the vision tower for no
    token of its slice); the reference gradient is of all of them as one batch in this process. Then SFT
    (``out/tiles``) over a micro-batch of one tile (rank 1's share empty: a blank tile) and one of 3 tiles
    (shares of 2 and 1)."""
    model = tiny_model(seed=0, head_chunk_size=8).eval()
    text = [make_sample(model, 0, 0, 9, 6, seed=1), make_sample(model, 0, 0, 4, 2, seed=3)]
    micro = [text, [make_sample(model, 1, 2, 2, 32, seed=11)]]
    one_step_versus_reference(
        out,
        model,
        SFTObjective("token"),
        SFTObjective("token"),
        micro[0] + micro[1],
        {0: micro, 1: micro},
        lambda mb: collate_packed(mb, "token"),
        zero_stage,
        SP,
    )
    assert getattr(model, HEAD_CHUNK_ATTR) == 8
    del model

    model = tiny_model(seed=0, head_chunk_size=8).eval()
    pairs = [make_pair(model, 0, 0, 9, 6, 3, seed=1), make_pair(model, 0, 0, 4, 2, 6, seed=5)]
    pairs.append(make_pair(model, 1, 2, 9, 3, 4, seed=20))
    micro = [pairs[:2], pairs[2:]]

    def objective(sp: bool) -> MPOObjective:
        made = MPOObjective(
            MPOLossConfig(preference="sigmoid", beta=0.1, generation_reduction="token"),
            frozen_copy_reference(build(sp=sp, seed=1), ZERO0),
            share_vision=False,
        )
        made.shift.total, made.shift.count = 0.6, 4
        return made

    (out / "mpo").mkdir(exist_ok=True)
    one_step_versus_reference(
        out / "mpo",
        model,
        objective(True),
        objective(False),
        pairs,
        {0: micro, 1: micro},
        lambda ps: collate_pairs(ps, "tree", "token"),
        zero_stage,
        SP,
    )
    del model

    model = tiny_model(seed=0, head_chunk_size=8).eval()
    one = [make_sample(model, 1, 1, 6, 5, seed=40)]
    odd = [make_sample(model, 1, 3, 5, 4, seed=41), make_sample(model, 0, 0, 7, 3, seed=42)]
    (out / "tiles").mkdir(exist_ok=True)
    one_step_versus_reference(
        out / "tiles",
        model,
        SFTObjective("square"),
        SFTObjective("square"),
        one + odd,
        {0: [one, odd], 1: [one, odd]},
        lambda mb: collate_packed(mb, "square"),
        zero_stage,
        SP,
    )


def main(out: Path, zero_stage: int) -> None:
    init_distributed()
    assert dist.get_world_size() == SP
    model_checks(out)
    loop_check(out, zero_stage)
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
