"""`vlmtune plan`: per-GPU memory of a training layout, before renting the GPUs (issue #6).

The model is built on the meta device (no weight memory at any size), so parameter counts are exact
for the configured freezing and LoRA. Model-state memory follows DeepSpeed's own ZeRO estimators
(``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` and
``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``, the functions behind
the ``..._all_cold`` / ``..._all_live`` printers): equal to them when every parameter trains, and the
same per-byte rules applied to trainable parameters only when some are frozen or LoRA'd. Activations
are an *estimate* (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", Sec. 4.1, adapted to what vlmtune runs: see ``layer_activation_bytes_per_token``).

    vlmtune plan model=internvl3_38b deepspeed=zero3 packing.max_tokens=16384 --nodes 4 --gpus 8
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
FIT_MARGIN = 0.9
"""Usable share of a GPU's memory: the rest goes to the CUDA context, NCCL and DeepSpeed's
communication buckets and allocator fragmentation, none of which the estimate models."""

DEEPSPEED_BUFFER_FACTOR = 1.5  # DeepSpeed's `additional_buffer_factor` default on CPU memory


# --------------------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class Layout:
    """What the plan varies: the ZeRO layout, the GPUs, and the knobs that trade activations."""

    zero_stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    gradient_checkpointing: bool = True
    micro_batch_size: int = 1
    num_nodes: int = 1
    gpus_per_node: int = 8
    sequence_parallel: int = 1  # GPUs splitting each pack along the sequence (train.sequence_parallel_size)

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def describe(self) -> str:
        offload = [
            n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_param)) if on
        ]
        return (
            f"ZeRO-{self.zero_stage}, offload {'+'.join(offload) or 'none'}, gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}, micro-batch {self.micro_batch_size}, "
            f"{self.num_nodes} node(s) x {self.gpus_per_node} GPUs"
            + (f", sequence parallel {self.sequence_parallel}" if self.sequence_parallel > 1 else "")
        )


@dataclass(frozen=True)
class ParamCounts:
    """The three numbers model-state memory depends on."""

    total: int  # every parameter held (a tied tensor once; LoRA adapters and full trained copies included)
    trainable: int  # those with requires_grad: they alone carry gradients and optimizer states
    largest_layer: int  # most parameters held directly by one module (DeepSpeed's `largest_layer_params`)


@dataclass(frozen=True)
class BytesPerParam:
    """Mixed-precision accounting per parameter, as DeepSpeed's estimators count it.

    bf16 mixed (``bf16.enabled``): a 2-byte weight and 2-byte working gradient, a 4-byte fp32 gradient
    (the partition the optimizer steps from; under ZeRO-3 the only gradient store,
    ``gradient_accumulation_dtype=float32`` in stage3.py) and 12 bytes of optimizer state (fp32 master 4
    + Adam m, v 8). The ZeRO paper's 16 bytes/param is 2 weight + 2 grad + 12 optimizer; DeepSpeed's
    estimators also count the fp32 gradient ("18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit +
    8_optimizer_states_32bit" on top of the 2-byte weight): 20 in all, and the plan agrees with them.
    fp32: 4 weight + 4 gradient + 8 Adam (the weight is its own master copy): 16.
    """

    weight: int
    grad: int  # working gradient in the compute dtype (none in fp32: the fp32 gradient is it)
    grad_fp32: int
    optimizer: int  # fp32 master weight (mixed precision only) + Adam m and v


BYTES_PER_PARAM = {"bf16": BytesPerParam(2, 2, 4, 12), "fp32": BytesPerParam(4, 0, 4, 8)}


def check_layout(layout: Layout) -> None:
    """The combinations DeepSpeed (and train/runtime/engine.py) refuse."""
    if layout.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {layout.zero_stage}")
    if layout.offload_param and layout.zero_stage != 3:
        raise ValueError("deepspeed.offload_param needs zero_stage 3")
    if layout.offload_optimizer and layout.zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1 (ZeRO-Offload)")
    if layout.num_nodes < 1 or layout.gpus_per_node < 1 or layout.micro_batch_size < 1:
        raise ValueError("nodes, GPUs per node and micro-batch size must be >= 1")
    from vlmtune.train.model.sequence_parallel import check_world

    check_world(layout.sequence_parallel, layout.num_gpus)


def model_state_bytes(
    counts: ParamCounts,
    layout: Layout,
    bpp: BytesPerParam = BYTES_PER_PARAM["bf16"],
    *,
    zero_init: bool = False,
    buffer_factor: float = DEEPSPEED_BUFFER_FACTOR,
) -> dict[str, dict[str, float]]:
    """Weights, gradients and optimizer states per GPU, and CPU memory per node, by DeepSpeed's rules.

    ZeRO partitions over all N GPUs: stage 1 the optimizer states and the fp32 gradients, stage 2 also
    the working gradients, stage 3 also the weights; stage 3 keeps no working gradient (each layer's is
    reduce-scattered into the fp32 partition) but holds one gathered layer (weights and full gradient:
    DeepSpeed's ``4 * largest_layer_params`` in bf16). Frozen parameters have weights only. Offloading
    the optimizer moves its states and the fp32 gradients to CPU (and, from stage 2, the working
    gradients: they stream to CPU); offloading parameters moves the weights.

    CPU per node is DeepSpeed's formula: the larger of the offloaded states and the transient of every
    process loading the model in fp32 (``zero_init=False``, ZeRO-0/1/2: each rank loads the whole
    model; ZeRO-3 builds it inside ``deepspeed.zero.Init``, train/runtime/engine.py: only a layer), times
    ``buffer_factor``. Its ZeRO-1/2 offload term is kept as DeepSpeed writes it (the whole optimizer
    state per node and 4 bytes x all GPUs), so the numbers agree with its estimator.
    """
    check_layout(layout)
    P, T, L = counts.total, counts.trainable, counts.largest_layer
    N, n, g = layout.num_gpus, layout.num_nodes, layout.gpus_per_node
    stage, off_opt, off_par = layout.zero_stage, layout.offload_optimizer, layout.offload_param
    shard = N if stage >= 1 else 1  # optimizer states and fp32 gradients
    working_grads = {0: bpp.grad * T, 1: bpp.grad * T, 2: 0 if off_opt else bpp.grad * T / N, 3: 0}[stage]
    gpu = {
        "weights": 0.0 if off_par else bpp.weight * P / (N if stage == 3 else 1),
        "gathered_layer": float(2 * bpp.weight * L) if stage == 3 else 0.0,
        "grads": float(working_grads) + (0.0 if off_opt else bpp.grad_fp32 * T / shard),
        "optimizer": 0.0 if off_opt else bpp.optimizer * T / shard,
    }
    offloaded_opt = (bpp.grad_fp32 + bpp.optimizer) * T if off_opt else 0
    if stage == 3:
        states = (offloaded_opt + (bpp.weight * P if off_par else 0)) / n
        loading = 4 * (L if zero_init else P) * g
        cpu_total = (states if zero_init and (off_opt or off_par) else max(loading, states)) * buffer_factor
    else:
        states = offloaded_opt
        loading = 4 * P * (N if off_opt else g)
        cpu_total = max(loading, states) * buffer_factor
    gpu["total"] = sum(gpu.values())
    cpu = {"offloaded_states": float(states), "loading": float(loading), "total": float(cpu_total)}
    return {"gpu": gpu, "cpu_per_node": cpu}


def deepspeed_estimate(
    counts: ParamCounts, layout: Layout, *, zero_init: bool = False
) -> dict[str, Any] | None:
    """DeepSpeed's own estimate for this layout with every parameter trainable (ZeRO-2/3 only)."""
    import os

    if not torch.cuda.is_available():  # as train/runtime/engine.py: no accelerator probing on a CPU machine
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if layout.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=counts.total,
            largest_layer_params=counts.largest_layer,
            num_gpus_per_node=layout.gpus_per_node,
            num_nodes=layout.num_nodes,
            cpu_offload=layout.offload_optimizer,
            cpu_offload_params=layout.offload_param,
            zero_init=zero_init,
        )
        name = "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
    elif layout.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=counts.total,
            num_gpus_per_node=layout.gpus_per_node,
            num_nodes=layout.num_nodes,
            cpu_offload=layout.offload_optimizer,
        )
        name = "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs"
    else:
        return None
    return {
        "function": name,
        "behind": name + "_all_cold",
        "inputs": {"total_params": counts.total, "largest_layer_params": counts.largest_layer},
        "zero_init": zero_init,
        "gpu_bytes": gpu,
        "cpu_bytes_per_node": cpu,
        "assumes": "every parameter trainable, bf16 mixed precision",
    }


# -------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class LayerShape:
    """One transformer layer, as far as its stored activations go."""

    hidden: int
    kv_hidden: int  # key/value width (GQA: kv heads x head dim)
    intermediate: int
    gated_mlp: bool  # SwiGLU (Qwen2/Llama) vs fc1 -> GELU -> fc2 (InternViT)
    qk_norm: bool = False  # InternViT-6B normalises q and k over the full width
    layer_scale: bool = False  # InternViT's lambda_1 / lambda_2


def layer_activation_bytes_per_token(shape: LayerShape, act_bytes: int) -> int:
    """Bytes one layer keeps for its backward pass, per token.

    Korthikanti et al.'s 34*s*h + 5*a*s^2 (GPT, 4h MLP, dropout, LayerNorm) re-counted for these
    layers: no dropout masks; FlashAttention/varlen keeps q, k, v and the output, not the s^2 scores;
    transformers' unfused RMSNorm keeps an fp32 copy of its input and the normalised output; GQA's k, v
    are ``kv_hidden`` wide; SwiGLU keeps gate, up, act(gate) and their product (4 x intermediate) where
    a GELU MLP keeps 2. Each linear keeps its input.
    """
    h, kv, i, a = shape.hidden, shape.kv_hidden, shape.intermediate, act_bytes
    norm = (4 + a) * h
    attention = norm + a * (h + h + 2 * kv + h)  # q/k/v input, q, k, v, attention output (o_proj input)
    if shape.qk_norm:
        attention += (4 + a) * (h + kv)
    mlp = norm + a * (h + (4 if shape.gated_mlp else 2) * i)
    return attention + mlp + (2 * a * h if shape.layer_scale else 0)


def stack_activation_bytes(
    tokens: int, layers: int, shape: LayerShape, act_bytes: int, *, checkpointing: bool
) -> int:
    """A stack of layers on ``tokens`` tokens at the peak of the backward pass.

    Without checkpointing every layer's activations are kept; with it (per layer, as
    ``activation_checkpointing_enable`` does) only each layer's input, plus one layer recomputed. Either
    way the backward's working set (gradients of a layer's intermediates) adds about half a layer.
    Measured on an H100 (bf16, sdpa; forward then backward of 4 Qwen2.5-32B layers on 16384 tokens and
    2 InternViT-6B layers on 13 tiles): kept activations within 3-4% of ``layer_activation_bytes_per_token``
    and the backward's extra about half a layer (the SwiGLU's intermediate gradients).
    """
    full = tokens * layer_activation_bytes_per_token(shape, act_bytes)
    if checkpointing:
        return layers * tokens * act_bytes * shape.hidden + full + full // 2
    return layers * full + full // 2


def logits_bytes(positions: int, vocab: int, act_bytes: int, chunk_size: int = 0, hidden: int = 0) -> int:
    """The LM head on the supervised positions only (train/model/forward.py: ``logits_to_keep``).

    Full logits (``chunk_size`` 0, or no more positions than a chunk): the logits, their fp32 copy and the
    fp32 log-softmax kept for the backward pass. Chunked (train/model/lm_head.py): one chunk's logits,
    fp32 copy and gradient at a time, the head weight's fp32 gradient summed over the chunks, and per
    position its log-sum-exp and fp32 hidden-state gradient."""
    if chunk_size <= 0 or positions <= chunk_size:
        return positions * vocab * (act_bytes + 4 + 4)
    return chunk_size * vocab * (act_bytes + 4 + 4) + vocab * hidden * 4 + positions * (4 + 4 * hidden)


def tiles_per_image(max_dynamic_patch: int, use_thumbnail: bool) -> int:
    """Most tiles one image becomes (InternVL's dynamic_preprocess): the grid plus the thumbnail,
    which is added only when the grid has more than one tile."""
    return max_dynamic_patch + (1 if use_thumbnail and max_dynamic_patch > 1 else 0)


def pair_tokens(prompt: int, response: int, layout: str) -> int:
    """Tokens a preference pair takes in a pack (train/commands/mpo.py: ``PairWithLength``): the tree layout
    holds the prompt once and both answers; the separate one holds the prompt twice."""
    if layout == "tree":
        return prompt + 2 * response
    if layout == "separate":
        return 2 * prompt + 2 * response
    raise ValueError(f"mpo layout must be 'tree' or 'separate', got {layout!r}")


@dataclass(frozen=True)
class Workload:
    """What one micro-batch puts through the model (per pack; the micro-batch multiplies it)."""

    tokens: int  # LLM tokens per pack
    tiles: int  # image tiles per pack (vision tower batch)
    supervised: int  # positions where the LM head runs
    tree_mask: bool = False  # MPO tree layout: a dense [s, s] mask through sdpa


@dataclass(frozen=True)
class ModelShapes:
    """The shapes the activation estimate reads from the model config."""

    llm: LayerShape
    llm_layers: int
    vocab: int
    vision: LayerShape
    vision_layers: int
    vision_tokens_per_tile: int  # patches + CLS
    llm_tokens_per_tile: int  # after the pixel shuffle
    projector_in: int  # vision width x (1 / downsample_ratio)^2


def model_shapes(config: Any) -> ModelShapes:
    """Read the shapes from an ``InternVLConfig``."""
    from vlmtune.train.model.build import num_image_tokens_per_tile

    t, v = config.text_config, config.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    return ModelShapes(
        llm=LayerShape(t.hidden_size, kv_heads * head_dim, t.intermediate_size, gated_mlp=True),
        llm_layers=t.num_hidden_layers,
        vocab=t.vocab_size,
        vision=LayerShape(
            v.hidden_size,
            v.hidden_size,
            v.intermediate_size,
            gated_mlp=False,
            qk_norm=bool(getattr(v, "use_qk_norm", False)),
            layer_scale=True,
        ),
        vision_layers=v.num_hidden_layers,
        vision_tokens_per_tile=(size // patch) ** 2 + 1,
        llm_tokens_per_tile=num_image_tokens_per_tile(config),
        projector_in=int(v.hidden_size / config.downsample_ratio**2),
    )


def activation_bytes(
    shapes: ModelShapes,
    work: Workload,
    *,
    act_bytes: int,
    checkpointing: bool,
    micro_batch_size: int,
    vision_trains: bool,
    projector_trains: bool,
    reference_forward: bool = False,
    head_chunk_size: int = 0,
    sequence_parallel: int = 1,
) -> dict[str, int]:
    """Per-GPU activation estimate for one micro-batch (an estimate: see the module docstring).

    ``sequence_parallel`` P > 1 (train/model/sequence_parallel.py): the LLM runs on each pack's 1/P slice
    (padded to a multiple of P; Ulysses' attention holds the whole sequence for 1/P of the heads: as many
    bytes), and the LM head on the supervised positions of the slice, counted for the busiest GPU: at most
    the slice's length (an answer after a long video may lie in one slice). The vision tower and projector
    encode a contiguous share of each pack's tiles (``tile_bounds``; train/model/forward.py
    ``encode_images``), counted for the largest, ceil(tiles / P). Their projected features are then
    all-gathered: every GPU holds all tiles' [tiles x tokens per tile, LLM hidden] and, in the backward,
    their gradient when the tower or projector trains (``gathered_features``; at P = 1 the features are
    the merged embeddings, already the LLM's first input, and it is 0). The tree layout's mask is the
    whole row's: not divided.

    The LLM always keeps activations (gradients reach every trained part through it). The vision tower
    keeps them only when it trains (a frozen tower's forward stores nothing); the projector when it or
    the tower trains. The tree layout's dense mask is held once as bool and, converted to an additive
    mask, by each layer holding activations (memory-efficient sdpa keeps it for the backward pass:
    measured s^2 x 2 bytes per layer in bf16). ``reference_forward``: MPO's reference runs without
    gradients while the policy's activations are alive (one layer and its own logits).
    """
    b = micro_batch_size
    slice_tokens = -(-work.tokens // sequence_parallel)
    share = -(-work.tiles // sequence_parallel)  # the largest share of a pack's tiles
    tokens, tiles, sup = slice_tokens * b, share * b, min(work.supervised, slice_tokens) * b
    llm = stack_activation_bytes(
        tokens, shapes.llm_layers, shapes.llm, act_bytes, checkpointing=checkpointing
    )
    vision = 0
    if vision_trains:
        vision = stack_activation_bytes(
            tiles * shapes.vision_tokens_per_tile,
            shapes.vision_layers,
            shapes.vision,
            act_bytes,
            checkpointing=checkpointing,
        )
    projector = 0
    if vision_trains or projector_trains:  # LayerNorm (input, output), GELU input, linear_2 input
        projector = (
            tiles * shapes.llm_tokens_per_tile * act_bytes * 2 * (shapes.projector_in + shapes.llm.hidden)
        )
    out = {
        "llm": llm,
        "vision": vision,
        "projector": projector,
        "logits": logits_bytes(sup, shapes.vocab, act_bytes, head_chunk_size, shapes.llm.hidden),
    }
    gathered = work.tiles * b * shapes.llm_tokens_per_tile * shapes.llm.hidden * act_bytes
    with_grad = 2 if vision_trains or projector_trains else 1  # the gradient only when something trains
    out["gathered_features"] = with_grad * gathered if sequence_parallel > 1 else 0
    holding = 1 if checkpointing else shapes.llm_layers
    out["tree_mask"] = b * work.tokens**2 * (1 + act_bytes * holding) if work.tree_mask else 0
    out["reference_forward"] = 0
    if reference_forward:
        one_layer = tokens * layer_activation_bytes_per_token(shapes.llm, act_bytes)
        ref_mask = b * work.tokens**2 * act_bytes if work.tree_mask else 0
        ref_rows = min(sup, head_chunk_size) if head_chunk_size > 0 else sup  # no gradient: one chunk alive
        out["reference_forward"] = one_layer + ref_mask + ref_rows * shapes.vocab * (act_bytes + 4)
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------- fit and suggestion


def candidate_layouts(layout: Layout) -> list[tuple[str, Layout]]:
    """Ever more memory-saving layouts, each adding one change to the previous, in the fixed order of
    issue #6: ZeRO-1, 2, 3 (communication only), offload the optimizer, offload the weights (PCIe
    traffic), gradient checkpointing (about a third more compute), micro-batch 1. Steps the layout
    already has are skipped."""
    steps: list[tuple[str, Layout]] = []
    cur = layout
    for stage in (1, 2, 3):
        if cur.zero_stage < stage:
            cur = replace(cur, zero_stage=stage)
            steps.append((f"deepspeed.zero_stage={stage}", cur))
    for name, field_name in (
        ("deepspeed.offload_optimizer=true", "offload_optimizer"),
        ("deepspeed.offload_param=true", "offload_param"),
        ("model.gradient_checkpointing=true", "gradient_checkpointing"),
    ):
        if not getattr(cur, field_name):
            cur = replace(cur, **{field_name: True})
            steps.append((name, cur))
    if cur.micro_batch_size > 1:
        cur = replace(cur, micro_batch_size=1)
        steps.append(("train.micro_batch_size=1", cur))
    return steps


def suggest_layout(
    layout: Layout,
    gpu_bytes: Callable[[Layout], float],
    gpu_budget: float,
    cpu_bytes: Callable[[Layout], float] | None = None,
    cpu_budget: float | None = None,
) -> tuple[list[str], Layout] | None:
    """The first layout, starting with ``layout`` itself, whose per-GPU total (and per-node CPU total,
    when a CPU budget is given) fits; with the overrides that lead to it. None: nothing fits."""

    def fits(candidate: Layout) -> bool:
        cpu_ok = cpu_budget is None or cpu_bytes is None or cpu_bytes(candidate) <= cpu_budget
        return gpu_bytes(candidate) <= gpu_budget and cpu_ok

    if fits(layout):
        return [], layout
    changes: list[str] = []
    for change, candidate in candidate_layouts(layout):
        changes.append(change)
        if fits(candidate):
            return changes, candidate
    return None


# ------------------------------------------------------------------------------------ the whole plan


def param_counts(model: torch.nn.Module) -> tuple[dict[str, int], ParamCounts]:
    """``count_parameters`` plus trainable per part, and the numbers DeepSpeed's estimators take.

    The largest layer is DeepSpeed's ``model_to_params`` rule (parameters held directly by one module);
    its total deduplicates by ``data_ptr``, which is 0 for every tensor on the meta device, so the
    total comes from ``named_parameters`` (each shared tensor once), which agrees on a real model.
    """
    from vlmtune.train.model.build import count_parameters, part_of

    counts = count_parameters(model)
    by_part = {"vision": 0, "projector": 0, "llm": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_part[part_of(name)] += p.numel()
    counts["trainable_by_part"] = by_part  # type: ignore[assignment]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    counts["largest_layer"] = largest
    return counts, ParamCounts(counts["total"], counts["trainable"], largest)


@dataclass(frozen=True)
class Hardware:
    """The GPUs the plan is for (plan-only flags: nothing in the run config says this)."""

    num_nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    cpu_memory_gib: float | None = None  # per node; None: not checked
    sequence_parallel: int | None = None  # None: the config's train.sequence_parallel_size


@dataclass(frozen=True)
class Assumptions:
    """What the config does not say about the data; every one is written into the plan."""

    images_per_pack: int = 1  # SFT: images per pack when packing.max_tiles is unset
    supervised_fraction: float = 0.25  # SFT: share of a pack's tokens that carry a target
    prompt_tokens: int | None = None  # MPO: prompt length (None: one image at max tiles + 64 text tokens)
    response_tokens: int = 256  # MPO: each answer's length


def resolve_mpo_layout(layout: str, attn_implementation: str) -> str:
    """train/objectives/mpo.py's rule; "auto" attention means flash-attention where flash_attn is installed."""
    import importlib.util

    from vlmtune.train.objectives.mpo import resolve_layout

    if attn_implementation == "auto":
        attn_implementation = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    return resolve_layout(layout, attn_implementation)


def sft_workload(
    cfg: Any, shapes: ModelShapes, assumptions: Assumptions, pack_tokens: int, image_tiles: int
) -> tuple[Workload, str, str]:
    """A full pack; tiles from ``packing.max_tiles``, else images per pack x the data config's tiles
    per image (never more than the pack's tokens can hold); the LM head on an assumed share of tokens."""
    if cfg.packing.max_tiles is not None:
        tiles, tiles_from = cfg.packing.max_tiles, "packing.max_tiles"
    else:
        tiles = assumptions.images_per_pack * image_tiles
        thumbnail = " + thumbnail" if image_tiles > cfg.data.max_dynamic_patch else ""
        tiles_from = (
            f"{assumptions.images_per_pack} image(s) per pack x {image_tiles} tiles "
            f"(data.max_dynamic_patch={cfg.data.max_dynamic_patch}{thumbnail})"
        )
    work = Workload(
        tokens=pack_tokens,
        tiles=min(tiles, pack_tokens // shapes.llm_tokens_per_tile),
        supervised=round(assumptions.supervised_fraction * pack_tokens),
    )
    return work, tiles_from, f"{assumptions.supervised_fraction:.0%} of the pack's tokens (assumed)"


def reference_mode(cfg: Any) -> str:
    """Which reference `vlmtune mpo` holds (train/commands/mpo.py ``MPOMethod.objective``)."""
    if not (cfg.loss.preference_weight or cfg.loss.quality_weight):
        return "none (preference and quality weights are 0)"
    if cfg.reference == "precomputed":
        return "precomputed (cached log-probs: no model in memory)"
    if cfg.lora.enabled:
        return "adapter-disabled policy (LoRA: no copy)"
    return "copy (frozen, no gradients or optimizer states; sharded like the policy)"


def mpo_workload(
    cfg: Any, shapes: ModelShapes, assumptions: Assumptions, pack_tokens: int, image_tiles: int
) -> tuple[Workload, dict[str, Any]]:
    """As many pairs as the pack holds in the layout the run will use (tree: prompt once; separate:
    twice); images encoded once per pair either way; the LM head on both answers of every pair."""
    prompt = assumptions.prompt_tokens or image_tiles * shapes.llm_tokens_per_tile + 64
    resp = assumptions.response_tokens
    layout = resolve_mpo_layout(cfg.loss.layout, cfg.model.attn_implementation)
    per_pair = {lay: pair_tokens(prompt, resp, lay) for lay in ("tree", "separate")}
    pairs = {lay: max(1, pack_tokens // n) for lay, n in per_pair.items()}
    n_pairs = pairs[layout]
    tiles = n_pairs * image_tiles
    if cfg.packing.max_tiles is not None:
        tiles = min(tiles, cfg.packing.max_tiles)
    work = Workload(
        tokens=min(pack_tokens, n_pairs * per_pair[layout]),
        tiles=tiles,
        supervised=n_pairs * 2 * resp,
        tree_mask=layout == "tree",
    )
    return work, {
        "layout": layout,
        "prompt_tokens": prompt,
        "response_tokens": resp,
        "tokens_per_pair": per_pair,
        "pairs_per_pack": pairs,
        "reference": reference_mode(cfg),
        "tiles_from": f"{n_pairs} pair(s) per pack x {image_tiles} tiles (images encoded once per pair)",
    }


def make_plan(cfg: Any, method: str, hardware: Hardware, assumptions: Assumptions = Assumptions()) -> dict:
    """Build the model on the meta device and plan memory for ``cfg`` (an SFTRunConfig / MPORunConfig)."""
    from vlmtune.train.model.build import build_model_on_meta

    if method not in ("sft", "mpo"):
        raise ValueError(f"method must be sft or mpo, got {method!r}")
    precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {cfg.train.precision!r}")
    bpp, act_bytes = BYTES_PER_PARAM[precision], BYTES_PER_PARAM[precision].weight
    model = build_model_on_meta(cfg.model, lora=cfg.lora)
    counts, pc = param_counts(model)
    if pc.trainable == 0:
        raise ValueError("nothing trains: every part is frozen and no LoRA adapter is enabled")
    shapes = model_shapes(model.config)
    ds = cfg.deepspeed
    layout = Layout(
        zero_stage=ds.zero_stage,
        offload_optimizer=ds.offload_optimizer,
        offload_param=ds.offload_param,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        micro_batch_size=cfg.train.micro_batch_size,
        num_nodes=hardware.num_nodes,
        gpus_per_node=hardware.gpus_per_node,
        sequence_parallel=hardware.sequence_parallel or cfg.train.sequence_parallel_size,
    )
    check_layout(layout)
    if layout.sequence_parallel > 1:
        from vlmtune.train.model.sequence_parallel import check_heads

        text = model.config.text_config
        heads = text.num_attention_heads
        check_heads(layout.sequence_parallel, heads, getattr(text, "num_key_value_heads", None) or heads)
    pack_tokens = (
        cfg.packing.max_tokens if cfg.packing.enabled else (cfg.data.max_length or cfg.packing.max_tokens)
    )
    image_tiles = tiles_per_image(cfg.data.max_dynamic_patch, cfg.data.use_thumbnail)
    notes = [
        f"activations are an estimate (Korthikanti et al. 2022, adapted: train/commands/plan.py); fit = total <= "
        f"{FIT_MARGIN:.0%} of GPU memory (the rest: CUDA context, NCCL/DeepSpeed buffers, fragmentation)",
        "CPU per node follows DeepSpeed's rules: ZeRO-0/1/2 load the whole model on every rank "
        "(zero_init=False); ZeRO-3 builds it partitioned (zero.Init, zero_init=True)"
        + (
            f", though global rank 0 also holds the checkpoint's tensors once while loading "
            f"(+{bpp.weight * pc.total / GIB:.1f} GiB on the first node at {bpp.weight} bytes/parameter)"
            if ds.zero_stage == 3
            else ""
        ),
    ]
    if layout.sequence_parallel > 1:
        notes.append(
            f"sequence parallel {layout.sequence_parallel}: the LLM's activations are a 1/"
            f"{layout.sequence_parallel} slice of each pack and the LM head at most the slice's positions; "
            "the vision tower and projector encode at most ceil(tiles / "
            f"{layout.sequence_parallel}) of each pack's tiles, and every GPU holds the gathered features of "
            "all tiles and their gradient"
        )
    if cfg.lora.enabled and cfg.lora.quantize:
        notes.append("lora.quantize=4bit is not modelled: base weights are counted at 16 bits")
    model_size = model.config.vision_config.image_size
    model_size = model_size if isinstance(model_size, int) else model_size[0]
    if cfg.data.image_size != model_size:
        notes.append(
            f"data.image_size={cfg.data.image_size} differs from the model's vision image_size={model_size}; "
            "tokens per tile follow the model"
        )
    if method == "sft":
        work, tiles_from, sup_from = sft_workload(cfg, shapes, assumptions, pack_tokens, image_tiles)
        mpo, reference = None, "none"
    else:
        work, mpo = mpo_workload(cfg, shapes, assumptions, pack_tokens, image_tiles)
        tiles_from, sup_from = mpo.pop("tiles_from"), "both answers of every pair"
        reference = mpo["reference"]
    ref_copy = reference.startswith("copy")
    ref_forward = reference.startswith(("copy", "adapter"))

    def states(lay: Layout) -> dict[str, dict[str, float]]:
        out = model_state_bytes(pc, lay, bpp, zero_init=lay.zero_stage == 3)  # train/runtime/engine.py
        gpu_ref = cpu_ref = 0.0
        if (
            ref_copy
        ):  # train/objectives/reference.py: same ZeRO-3 partitioning (and param offload), no optimizer
            if lay.offload_param:
                cpu_ref = bpp.weight * pc.total / lay.num_nodes
            else:
                gpu_ref = bpp.weight * pc.total / (lay.num_gpus if lay.zero_stage == 3 else 1)
        for side, extra in (("gpu", gpu_ref), ("cpu_per_node", cpu_ref)):
            total = out[side].pop("total")
            out[side].update(reference=extra, total=total + extra)
        return out

    def activations(lay: Layout) -> dict[str, int]:
        return activation_bytes(
            shapes,
            work,
            act_bytes=act_bytes,
            checkpointing=lay.gradient_checkpointing,
            micro_batch_size=lay.micro_batch_size,
            vision_trains=counts["trainable_by_part"]["vision"] > 0,
            projector_trains=counts["trainable_by_part"]["projector"] > 0,
            reference_forward=ref_forward,
            head_chunk_size=cfg.model.head_chunk_size,
            sequence_parallel=lay.sequence_parallel,
        )

    def gpu_total(lay: Layout) -> float:
        return states(lay)["gpu"]["total"] + activations(lay)["total"]

    def cpu_total(lay: Layout) -> float:
        return states(lay)["cpu_per_node"]["total"]

    budget = FIT_MARGIN * hardware.gpu_memory_gib * GIB
    cpu_budget = None if hardware.cpu_memory_gib is None else hardware.cpu_memory_gib * GIB
    found = suggest_layout(layout, gpu_total, budget, cpu_total, cpu_budget)
    suggestion = None
    if found is not None:
        changes, best = found
        suggestion = {"overrides": changes, "layout": asdict(best), "per_gpu_bytes": gpu_total(best)}
    model_states = states(layout)
    model_states["estimator"] = deepspeed_estimate(pc, layout, zero_init=layout.zero_stage == 3) or {
        "function": None,
        "note": f"DeepSpeed has no estimator for ZeRO-{layout.zero_stage}; the same per-byte rules apply",
    }
    model_states["estimator"]["matches_exactly"] = (
        model_states["estimator"]["function"] is not None and pc.trainable == pc.total and precision == "bf16"
    )
    per_gpu = gpu_total(layout)
    slice_tokens = -(-work.tokens // layout.sequence_parallel)  # as activation_bytes: the busiest GPU's
    sup = min(work.supervised, slice_tokens) * layout.micro_batch_size
    head = {
        "chunk_size": cfg.model.head_chunk_size,
        "bytes": logits_bytes(sup, shapes.vocab, act_bytes, cfg.model.head_chunk_size, shapes.llm.hidden),
        "full_logits_bytes": logits_bytes(sup, shapes.vocab, act_bytes),
    }
    return {
        "method": method,
        "model": cfg.model.name,
        "precision": precision,
        "parameters": counts,
        "layout": asdict(layout),
        "hardware": asdict(hardware),
        "workload": {
            **asdict(work),
            "tiles_from": tiles_from,
            "supervised_from": sup_from,
            "tiles_per_image": image_tiles,
            "llm_tokens_per_tile": shapes.llm_tokens_per_tile,
            "vision_tokens_per_tile": shapes.vision_tokens_per_tile,
        },
        "mpo": mpo,
        "model_states": model_states,
        "activations": activations(layout),
        "lm_head": head,
        "per_gpu_bytes": per_gpu,
        "gpu_budget_bytes": budget,
        "fits": per_gpu <= budget
        and (cpu_budget is None or model_states["cpu_per_node"]["total"] <= cpu_budget),
        "suggestion": suggestion,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def _b(n: int) -> str:
    return f"{n / 1e9:8.3f} B"


def format_plan(plan: dict) -> str:
    """The plan as a table for the terminal (the JSON holds the same numbers in bytes)."""
    p, hw = plan["parameters"], plan["hardware"]
    lines = [
        f"vlmtune plan: {plan['model']} {plan['method'].upper()}, {plan['precision']}, "
        f"{hw['num_nodes']} node(s) x {hw['gpus_per_node']} GPUs of {hw['gpu_memory_gib']:g} GiB",
        "",
        f"{'parameters':<28}{'held':>11}  {'trainable':>11}",
    ]
    for part in ("vision", "projector", "llm"):
        lines.append(f"  {part:<26}{_b(p[part])}  {_b(p['trainable_by_part'][part])}")
    lines.append(f"  {'(adapters, trained copies)':<26}{_b(p['adapter'])}")
    lines.append(f"  {'total':<26}{_b(p['total'])}  {_b(p['trainable'])}")
    lines.append(f"  {'largest layer':<26}{_b(p['largest_layer'])}")
    lines += ["", f"layout: {Layout(**plan['layout']).describe()}", ""]
    gpu, cpu = plan["model_states"]["gpu"], plan["model_states"]["cpu_per_node"]
    act = plan["activations"]
    lines.append(f"{'per GPU':<40}{'GiB':>8}")
    for key, label in (
        ("weights", "weights"),
        ("gathered_layer", "gathered largest layer (ZeRO-3)"),
        ("grads", "gradients (working + fp32)"),
        ("optimizer", "optimizer (fp32 master, Adam m, v)"),
        ("reference", "MPO reference copy"),
        ("total", "model states"),
    ):
        if key == "reference" and plan["method"] != "mpo":
            continue
        lines.append(f"  {label:<38}{_gib(gpu[key])}")
    est = plan["model_states"]["estimator"]
    if est.get("function"):
        exact = "equal: all parameters train" if est["matches_exactly"] else "all parameters trainable"
        lines.append(
            f"    DeepSpeed {est['function'].rsplit('.', 1)[1]}: {_gib(est['gpu_bytes']).strip()} ({exact})"
        )
    w = plan["workload"]
    lines.append(
        f"  activations (estimate){'':<16}{_gib(act['total'])}   per pack: {w['tokens']} tokens, "
        f"{w['tiles']} tiles, LM head on {w['supervised']} positions"
    )
    for key in (
        "llm",
        "vision",
        "projector",
        "gathered_features",
        "logits",
        "tree_mask",
        "reference_forward",
    ):
        if act[key]:
            lines.append(f"    {key:<36}{_gib(act[key])}")
    head = plan["lm_head"]
    if head["bytes"] < head["full_logits_bytes"]:
        lines.append(
            f"    (LM head {head['chunk_size']} rows at a time, model.head_chunk_size; full logits would take "
            f"{_gib(head['full_logits_bytes']).strip()} GiB)"
        )
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(
        f"  {'total':<38}{_gib(plan['per_gpu_bytes'])}   {verdict} in {_gib(plan['gpu_budget_bytes']).strip()} GiB "
        f"({FIT_MARGIN:.0%} of {hw['gpu_memory_gib']:g})"
    )
    lines.append(
        f"CPU per node: {_gib(cpu['total']).strip()} GiB (offloaded {_gib(cpu['offloaded_states']).strip()}, "
        f"model building on every rank {_gib(cpu['loading']).strip()}, x{DEEPSPEED_BUFFER_FACTOR} as DeepSpeed)"
    )
    if plan["mpo"]:
        m = plan["mpo"]
        lines.append(
            f"MPO: layout {m['layout']}; pair = {m['prompt_tokens']} prompt + 2 x {m['response_tokens']} answer "
            f"tokens: tree {m['tokens_per_pair']['tree']} tokens ({m['pairs_per_pack']['tree']} pairs/pack), "
            f"separate {m['tokens_per_pair']['separate']} ({m['pairs_per_pack']['separate']} pairs/pack); "
            f"reference: {m['reference']}"
        )
    s = plan["suggestion"]
    if s is None:
        lines.append("suggestion: no layout fits; add GPUs, lower packing.max_tokens or freeze/LoRA more")
    elif not s["overrides"]:
        lines.append("suggestion: the configured layout fits")
    else:
        lines.append(
            f"suggestion: {' '.join(s['overrides'])}  ->  {_gib(s['per_gpu_bytes']).strip()} GiB per GPU "
            f"({Layout(**s['layout']).describe()})"
        )
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="vlmtune plan",
        description="Per-GPU memory of a training layout (model on the meta device); the rest are Hydra overrides.",
    )
    parser.add_argument(
        "--mpo", action="store_true", help="plan `vlmtune mpo` (configs/mpo.yaml); also method=mpo"
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--cpu-memory", type=float, default=None, help="GiB per node (checked when given)")
    parser.add_argument(
        "--sequence-parallel",
        type=int,
        default=None,
        help="GPUs splitting each pack along the sequence (default: train.sequence_parallel_size)",
    )
    parser.add_argument("--images-per-pack", type=int, default=1, help="SFT, when packing.max_tiles is unset")
    parser.add_argument(
        "--supervised-fraction", type=float, default=0.25, help="SFT: share of tokens with a target"
    )
    parser.add_argument("--prompt-tokens", type=int, default=None, help="MPO: prompt length")
    parser.add_argument("--response-tokens", type=int, default=256, help="MPO: each answer's length")
    parser.add_argument("--out", type=Path, default=None, help="write the plan as JSON here")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; Hydra overrides look like key=value")
    if "method=mpo" in overrides:
        args.mpo = True
    overrides = [o for o in overrides if o not in ("method=mpo", "method=sft")]
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    method = "mpo" if args.mpo else "sft"
    from vlmtune.train.runtime.config import compose_config

    cfg = compose_config(method, overrides)
    plan = make_plan(
        cfg,
        method,
        Hardware(args.nodes, args.gpus, args.gpu_memory, args.cpu_memory, args.sequence_parallel),
        Assumptions(args.images_per_pack, args.supervised_fraction, args.prompt_tokens, args.response_tokens),
    )
    print(format_plan(plan))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(plan, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
