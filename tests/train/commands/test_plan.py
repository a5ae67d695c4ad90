"""vlmtune.train.commands.plan: parameter counts on the meta device against the published totals, model-state memory
against DeepSpeed's own ZeRO estimators, freezing/LoRA against hand counts, the fit/suggestion logic on a
hand-made case, and the `vlmtune plan` CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from tests.train.model.test_build import PUBLISHED_LLM, PUBLISHED_TOTAL, PUBLISHED_VISION, load_model_config
from vlmtune.train.commands.plan import (
    BYTES_PER_PARAM,
    LayerShape,
    Layout,
    ModelShapes,
    ParamCounts,
    Workload,
    activation_bytes,
    candidate_layouts,
    layer_activation_bytes_per_token,
    logits_bytes,
    main,
    model_state_bytes,
    pair_tokens,
    param_counts,
    stack_activation_bytes,
    suggest_layout,
    tiles_per_image,
)
from vlmtune.train.model.build import build_model_on_meta
from vlmtune.train.model.lora import LoRAConfig

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def counts_38b() -> tuple[dict, ParamCounts]:
    return param_counts(build_model_on_meta(load_model_config("internvl3_38b")))


def test_38b_counts_match_published(counts_38b) -> None:
    counts, pc = counts_38b
    assert pc.total == pytest.approx(PUBLISHED_TOTAL["38b"], rel=0.005)
    assert counts["vision"] == pytest.approx(PUBLISHED_VISION["38b"], rel=0.02)
    assert counts["llm"] == pytest.approx(PUBLISHED_LLM["38b"], rel=0.02)
    assert pc.trainable == pc.total
    assert pc.largest_layer == 151674 * 5120  # embed_tokens / lm_head (untied): one module's own weight


def test_largest_layer_and_total_follow_deepspeeds_model_to_params() -> None:
    """On a real (CPU) model DeepSpeed's own `model_to_params` must give our two numbers."""
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import InternVLForConditionalGeneration

    from vlmtune.train.model.build import build_internvl_config
    from vlmtune.train.model.tiny import load_tiny_model_config

    cfg = load_tiny_model_config()
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(build_internvl_config(cfg, require_image_token=False))
    _, pc = param_counts(model)
    assert model_to_params(model) == (pc.total, pc.largest_layer)


LAYOUTS = [(4, 8), (1, 8)]  # (nodes, GPUs per node)


@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
def test_model_states_equal_deepspeed_zero3_estimator(counts_38b, nodes, gpus, capsys) -> None:
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

    _, pc = counts_38b
    ours = {}
    for off_opt, off_par in ((False, False), (True, False), (True, True)):
        for zero_init in (True, False):
            layout = Layout(3, off_opt, off_par, num_nodes=nodes, gpus_per_node=gpus)
            states = model_state_bytes(pc, layout, zero_init=zero_init)
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                pc.total, pc.largest_layer, gpus, nodes, off_opt, off_par, zero_init
            )
            assert states["gpu"]["total"] == pytest.approx(gpu, abs=1)
            assert states["cpu_per_node"]["total"] == pytest.approx(cpu, abs=1)
            ours[(off_par, off_opt, zero_init)] = states
    # The printed table of the `_all_cold` entry point shows the same numbers (GB = 2**30 bytes, 2 decimals).
    estimate_zero3_model_states_mem_needs_all_cold(pc.total, pc.largest_layer, gpus, nodes)
    rows = re.findall(
        r"([\d.]+)GB \|\s+([\d.]+)GB \| offload_param=(\S+), offload_optimizer=(\S+), zero_init=(\d)",
        capsys.readouterr().out,
    )
    assert len(rows) == 6
    for cpu_gb, gpu_gb, par, opt, zi in rows:
        states = ours[("cpu" in par, "cpu" in opt, zi == "1")]
        assert f"{states['gpu']['total'] / 2**30:.2f}" == gpu_gb
        assert f"{states['cpu_per_node']['total'] / 2**30:.2f}" == cpu_gb


@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
def test_model_states_equal_deepspeed_zero2_estimator(counts_38b, nodes, gpus) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, pc = counts_38b
    for off_opt in (False, True):
        states = model_state_bytes(pc, Layout(2, off_opt, num_nodes=nodes, gpus_per_node=gpus))
        cpu, gpu = estimate_zero2_model_states_mem_needs(pc.total, gpus, nodes, off_opt)
        assert states["gpu"]["total"] == pytest.approx(gpu, abs=1)
        assert states["cpu_per_node"]["total"] == pytest.approx(cpu, abs=1)


def test_frozen_vision_has_weights_but_no_grads_or_optimizer(counts_38b) -> None:
    _, full = counts_38b
    counts, pc = param_counts(
        build_model_on_meta(dataclasses.replace(load_model_config("internvl3_38b"), freeze_vision=True))
    )
    assert pc.total == full.total and pc.trainable == full.total - counts["vision"]
    assert counts["trainable_by_part"] == {
        "vision": 0,
        "projector": counts["projector"],
        "llm": counts["llm"],
    }
    n = 32
    s2 = model_state_bytes(pc, Layout(2, num_nodes=4, gpus_per_node=8))["gpu"]
    assert s2["weights"] == 2 * pc.total  # ZeRO-2 keeps every bf16 weight, frozen ones included
    assert s2["grads"] == pytest.approx((2 + 4) * pc.trainable / n)
    assert s2["optimizer"] == pytest.approx(12 * pc.trainable / n)
    s3 = model_state_bytes(pc, Layout(3, num_nodes=4, gpus_per_node=8))["gpu"]
    assert s3["weights"] == pytest.approx(2 * pc.total / n)
    assert s3["grads"] + s3["optimizer"] == pytest.approx(16 * pc.trainable / n)


def _tiny_lora(llm_r: int, vision_r: int) -> LoRAConfig:
    lora = LoRAConfig()
    lora.llm = dataclasses.replace(lora.llm, enabled=llm_r > 0, r=max(llm_r, 1))
    lora.vision = dataclasses.replace(lora.vision, enabled=vision_r > 0, r=max(vision_r, 1))
    return lora


@pytest.mark.parametrize("llm_r,vision_r", [(4, 0), (0, 2), (4, 2)])
def test_lora_trainable_is_r_times_in_plus_out_per_target(llm_r, vision_r) -> None:
    """Tiny config (configs/model/tiny.yaml): LLM h=128, 4 heads / 2 kv heads (kv width 64), MLP 256,
    2 layers; vision h=64, MLP 256, 2 layers. Every other part frozen."""
    from vlmtune.train.model.tiny import load_tiny_model_config

    cfg = dataclasses.replace(
        load_tiny_model_config(), freeze_vision=True, freeze_projector=True, freeze_llm=True
    )
    counts, pc = param_counts(build_model_on_meta(cfg, lora=_tiny_lora(llm_r, vision_r)))
    h, kv, i = 128, 64, 256
    llm_linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    hv, iv = 64, 256
    vision_linears = [(hv, hv)] * 4 + [(hv, iv), (iv, hv)]  # q k v projection_layer fc1 fc2
    expected_llm = 2 * sum(llm_r * (a + b) for a, b in llm_linears)
    expected_vision = 2 * sum(vision_r * (a + b) for a, b in vision_linears)
    assert counts["trainable_by_part"] == {"vision": expected_vision, "projector": 0, "llm": expected_llm}
    assert pc.trainable == counts["adapter"] == expected_llm + expected_vision


def test_38b_lora_llm_r16_trainable(counts_38b) -> None:
    cfg = dataclasses.replace(load_model_config("internvl3_38b"), freeze_vision=True, freeze_projector=True)
    _, pc = param_counts(build_model_on_meta(cfg, lora=_tiny_lora(16, 0)))
    h, kv, i = 5120, 1024, 27648
    per_layer = 16 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    assert pc.trainable == 64 * per_layer == 134_217_728
    assert pc.total == counts_38b[1].total + pc.trainable


def test_activation_formula_by_hand() -> None:
    """Qwen2.5-32B layer, bf16: two RMSNorms (fp32 input copy 4h + normalised 2h each), q/k/v input 2h,
    q 2h, k and v 2*1024 each, attention output 2h, gate/up input 2h, gate, up, silu(gate), product 2*I each."""
    h, kv, i = 5120, 1024, 27648
    shape = LayerShape(h, kv, i, gated_mlp=True)
    by_hand = 2 * 6 * h + 2 * h + 2 * h + 4 * kv + 2 * h + 2 * h + 4 * 2 * i
    assert layer_activation_bytes_per_token(shape, 2) == by_hand == 327_680
    s = 16384
    layer = s * by_hand
    assert stack_activation_bytes(s, 64, shape, 2, checkpointing=True) == 64 * s * 2 * h + layer * 3 // 2
    assert stack_activation_bytes(s, 64, shape, 2, checkpointing=False) == 64 * layer + layer // 2


def test_lm_head_memory_full_and_chunked_by_hand() -> None:
    """A 16k-token fully supervised pack at InternVL3's vocabulary, bf16, hidden 5120 (38B): full logits keep
    the logits (2 B), their fp32 copy and the fp32 log-softmax per position; the chunked head one 1024-row
    chunk of those, the head weight's fp32 gradient and a log-sum-exp + fp32 hidden gradient per position."""
    v, h, n = 151_674, 5120, 16384
    full = n * v * (2 + 4 + 4)
    assert logits_bytes(n, v, 2) == full == logits_bytes(n, v, 2, 0, h) == logits_bytes(n, v, 2, n, h)
    chunked = 1024 * v * 10 + v * h * 4 + n * (4 + 4 * h)
    assert logits_bytes(n, v, 2, 1024, h) == chunked
    assert chunked < 0.21 * full  # 5.0 GB instead of 24.9 GB


@pytest.mark.parametrize("chunk", [0, 1024])
def test_cli_models_the_chunked_head(tmp_path, chunk) -> None:
    out = tmp_path / "plan.json"
    argv = [
        "model=internvl3_38b",
        "deepspeed=zero3",
        "packing.max_tokens=16384",
        f"model.head_chunk_size={chunk}",
    ]
    assert main([*argv, "--supervised-fraction", "1.0", "--images-per-pack", "0", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    sup = plan["workload"]["supervised"]
    assert plan["lm_head"]["full_logits_bytes"] == logits_bytes(sup, 151_674, 2)
    assert (
        plan["activations"]["logits"]
        == plan["lm_head"]["bytes"]
        == logits_bytes(sup, 151_674, 2, chunk, 5120)
    )


def test_tiles_and_pair_tokens() -> None:
    assert (
        tiles_per_image(12, True) == 13 and tiles_per_image(1, True) == 1 and tiles_per_image(6, False) == 6
    )
    assert pair_tokens(3000, 200, "tree") == 3400 and pair_tokens(3000, 200, "separate") == 6400


def test_candidates_skip_what_the_layout_has() -> None:
    start = Layout(3, gradient_checkpointing=True, micro_batch_size=1)
    assert [c for c, _ in candidate_layouts(start)] == [
        "deepspeed.offload_optimizer=true",
        "deepspeed.offload_param=true",
    ]


def test_suggestion_on_a_hand_made_case() -> None:
    """10B parameters all trainable, no gathered layer (L=0), 8 GPUs, activations 30 GB per pack
    (10 GB with checkpointing), micro-batch 2. By hand (GB): ZeRO-1 20+20+160/8 + 60 = 120,
    ZeRO-2 20+180/8 + 60 = 102.5, ZeRO-3 180/8 + 60 = 82.5 (no bf16 gradient), + offload optimizer 20/8 + 60 = 62.5,
    + offload params 0 + 60 = 60, + checkpointing 20, + micro-batch 1 10."""
    pc = ParamCounts(total=10**10, trainable=10**10, largest_layer=0)
    start = Layout(0, gradient_checkpointing=False, micro_batch_size=2, num_nodes=1, gpus_per_node=8)

    def gpu(lay: Layout) -> float:
        act = (10e9 if lay.gradient_checkpointing else 30e9) * lay.micro_batch_size
        return model_state_bytes(pc, lay, BYTES_PER_PARAM["bf16"])["gpu"]["total"] + act

    assert [gpu(lay) / 1e9 for _, lay in candidate_layouts(start)] == pytest.approx(
        [120, 102.5, 82.5, 62.5, 60, 20, 10]
    )
    assert suggest_layout(start, gpu, 300e9) == ([], start)
    changes, best = suggest_layout(start, gpu, 70e9)
    assert changes[-1] == "deepspeed.offload_optimizer=true" and len(changes) == 4
    assert best == Layout(3, True, False, gradient_checkpointing=False, micro_batch_size=2, gpus_per_node=8)
    changes, best = suggest_layout(start, gpu, 50e9)
    assert changes[-1] == "model.gradient_checkpointing=true" and best.micro_batch_size == 2
    assert suggest_layout(start, gpu, 5e9) is None
    # CPU: every one of the 8 ranks loads the model in fp32 (DeepSpeed's zero_init=False rule), x 1.5:
    # 4 x 10B x 8 x 1.5 = 480 GB per node, more than the offloaded states (16 x 10B x 1.5 = 240 GB).
    cpu = lambda lay: model_state_bytes(pc, lay)["cpu_per_node"]["total"]  # noqa: E731
    assert cpu(best) == pytest.approx(480e9)
    assert suggest_layout(start, gpu, 50e9, cpu, 480e9) == (changes, best)
    assert suggest_layout(start, gpu, 50e9, cpu, 479e9) is None


def test_cli_writes_the_plan(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    argv = ["model=internvl3_38b", "deepspeed=zero3", "--nodes", "4", "--gpus", "8", "--out", str(out)]
    assert main(argv) == 0
    plan = json.loads(out.read_text())
    assert {
        "parameters",
        "layout",
        "model_states",
        "activations",
        "per_gpu_bytes",
        "fits",
        "suggestion",
    } <= set(plan)
    assert plan["parameters"]["total"] == pytest.approx(PUBLISHED_TOTAL["38b"], rel=0.005)
    est = plan["model_states"]["estimator"]
    assert est["function"].endswith("estimate_zero3_model_states_mem_needs") and est["matches_exactly"]
    assert plan["model_states"]["gpu"]["total"] == pytest.approx(est["gpu_bytes"], abs=1)
    assert plan["per_gpu_bytes"] == pytest.approx(
        plan["model_states"]["gpu"]["total"] + plan["activations"]["total"]
    )
    assert plan["fits"] == (plan["per_gpu_bytes"] <= 0.9 * 80 * 2**30)
    assert "estimate_zero3_model_states_mem_needs" in capsys.readouterr().out


@pytest.mark.parametrize("reference,shards", [("copy", 32), ("precomputed", None)])
def test_cli_mpo_reference(tmp_path, reference, shards) -> None:
    out = tmp_path / "plan.json"
    argv = ["--mpo", "model=internvl3_38b", "deepspeed=zero3", f"reference={reference}", "loss.layout=tree"]
    assert main([*argv, "--nodes", "4", "--gpus", "8", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    total = plan["parameters"]["total"]
    expected = 0 if shards is None else 2 * total / shards
    assert plan["model_states"]["gpu"]["reference"] == pytest.approx(expected)
    mpo = plan["mpo"]
    p, r = mpo["prompt_tokens"], mpo["response_tokens"]
    assert mpo["tokens_per_pair"] == {"tree": p + 2 * r, "separate": 2 * p + 2 * r}
    assert plan["workload"]["supervised"] == mpo["pairs_per_pack"]["tree"] * 2 * r
    s = plan["workload"]["tokens"]  # bool mask once + its bf16 additive copy in the one recomputed layer
    assert plan["layout"]["gradient_checkpointing"] and plan["activations"]["tree_mask"] == s * s * (1 + 2)


def test_cli_sequence_parallel_divides_llm_vision_and_lm_head_by_hand(tmp_path) -> None:
    """A 64k-token pack (a 64-frame video: 64 tiles) on InternVL3-38B, ZeRO-3 on 8 GPUs, bf16, gradient
    checkpointing, LM head 1024 rows at a time. With `--sequence-parallel 8` each GPU runs the LLM on an
    8192-token slice: 64 layers x 8192 tokens x 2 B x 5120 kept inputs, plus one recomputed layer and half
    a layer of backward working set at 327,680 B/token (test_activation_formula_by_hand), 1/8 of the
    un-split 65536-token figure. The LM head: at most the slice's 8192 positions on the busiest GPU, so a
    quarter supervised (16384 positions, maybe all in one slice) and fully supervised give the same
    8192-row figure: one 1024-row chunk (logits 2 B + fp32 copy + gradient, 10 B per vocab entry), the head
    weight's fp32 gradient and per position a log-sum-exp and an fp32 hidden gradient.

    The vision tower (InternViT-6B: width 3200, MLP 12800, 45 layers, 448-px tiles of 14-px patches: 1025
    tokens a tile) encodes each GPU's 8 of the 64 tiles. Per token and layer, bf16: two norms (fp32 input
    copy 4w + normalised 2w each), q/k/v input 2w, q, k, v 2w each, attention output 2w, q and k norms 6w
    each, fc1 input 2w, fc1 output and GELU output 2*12800 each, the two layer scales' inputs 2w each:
    40w + 4*12800 = 179,200 B. Checkpointed: 45 layers' inputs (2w a token) plus 1.5 layers. The projector
    (pixel-shuffled width 4 x 3200 = 12800 -> 5120, 256 tokens a tile) keeps its LayerNorm's input and
    output and its GELU's and linear_2's inputs; both 1/8. Every GPU then holds all 64 tiles' gathered
    features [64 x 256, 5120] in bf16 and their gradient. Model states are not divided; 16-way would not
    divide the 40 heads."""
    v, h, layer = 151_674, 5120, 327_680
    w, mlp, depth, per_tile = 3200, 12800, 45, (448 // 14) ** 2 + 1
    vision_per_token = 2 * 6 * w + 2 * w + 3 * 2 * w + 2 * w + 2 * 6 * w + 2 * w + 2 * 2 * mlp + 2 * 2 * w
    assert vision_per_token == 179_200 and per_tile == 1025

    def vision_by_hand(tiles: int) -> int:
        tokens = tiles * per_tile
        return depth * tokens * 2 * w + tokens * vision_per_token * 3 // 2

    def projector_by_hand(tiles: int) -> int:
        return tiles * 256 * 2 * (2 * 4 * w + 2 * h)

    def plan(sp: int, fraction: float) -> dict:
        out = tmp_path / f"plan_{sp}_{fraction}.json"
        argv = ["model=internvl3_38b", "deepspeed=zero3", "packing.max_tokens=65536", "packing.max_tiles=64"]
        args = ["--sequence-parallel", str(sp), "--supervised-fraction", str(fraction), "--out", str(out)]
        assert main([*argv, *args]) == 0
        return json.loads(out.read_text())

    one, split, quarter = plan(1, 1.0), plan(8, 1.0), plan(8, 0.25)
    assert split["layout"]["sequence_parallel"] == 8 and split["workload"]["tokens"] == 65536
    assert one["activations"]["llm"] == 64 * 65536 * 2 * h + 65536 * layer * 3 // 2
    assert split["activations"]["llm"] == 64 * 8192 * 2 * h + 8192 * layer * 3 // 2 == 9_395_240_960
    assert one["activations"]["llm"] == 8 * split["activations"]["llm"]
    head_8192 = 1024 * v * 10 + v * h * 4 + 8192 * (4 + 4 * h)
    assert split["lm_head"]["bytes"] == split["activations"]["logits"] == head_8192
    assert quarter["lm_head"]["bytes"] == quarter["activations"]["logits"] == head_8192
    assert one["lm_head"]["bytes"] == 1024 * v * 10 + v * h * 4 + 65536 * (4 + 4 * h)
    assert one["activations"]["vision"] == vision_by_hand(64) == 36_526_080_000
    assert split["activations"]["vision"] == vision_by_hand(8) == 4_565_760_000
    assert one["activations"]["vision"] == 8 * split["activations"]["vision"]
    assert one["activations"]["projector"] == projector_by_hand(64) == 8 * split["activations"]["projector"]
    assert one["activations"]["gathered_features"] == 0  # un-split: the features are the merged embeddings
    assert split["activations"]["gathered_features"] == 2 * 64 * 256 * h * 2 == 335_544_320
    assert split["model_states"] == one["model_states"]
    saved = sum(
        one["activations"][k] - split["activations"][k] for k in ("llm", "logits", "vision", "projector")
    )
    saved -= split["activations"]["gathered_features"]
    assert one["per_gpu_bytes"] - split["per_gpu_bytes"] == pytest.approx(saved)
    with pytest.raises(ValueError, match="does not divide the LLM's 40 attention heads"):
        main(["model=internvl3_38b", "deepspeed=zero3", "--sequence-parallel", "16", "--gpus", "16"])


def test_sequence_parallel_vision_counts_the_largest_share() -> None:
    """13 tiles over 8 GPUs: the first 5 encode 2 (train/model/sequence_parallel.py ``tile_bounds``), so the
    busiest GPU's vision and projector figures are those of 2 tiles un-split; the gathered features are
    all 13 tiles' (features + gradient, bf16)."""
    llm = LayerShape(128, 64, 256, gated_mlp=True)
    shapes = ModelShapes(llm, 2, 1000, LayerShape(64, 64, 256, gated_mlp=False), 2, 17, 4, 256)

    def act(tiles: int, sp: int) -> dict[str, int]:
        work = Workload(tokens=1024, tiles=tiles, supervised=256)
        kw = dict(
            act_bytes=2, checkpointing=True, micro_batch_size=1, vision_trains=True, projector_trains=True
        )
        return activation_bytes(shapes, work, sequence_parallel=sp, **kw)

    split, two = act(13, 8), act(2, 1)
    assert split["vision"] == two["vision"] > 0 and split["projector"] == two["projector"] > 0
    assert split["gathered_features"] == 2 * 13 * 4 * 128 * 2 and two["gathered_features"] == 0
    frozen = activation_bytes(
        shapes,
        Workload(tokens=1024, tiles=13, supervised=256),
        act_bytes=2,
        checkpointing=True,
        micro_batch_size=1,
        vision_trains=False,
        projector_trains=False,
        sequence_parallel=8,
    )
    assert frozen["vision"] == frozen["projector"] == 0 and frozen["gathered_features"] == 13 * 4 * 128 * 2
