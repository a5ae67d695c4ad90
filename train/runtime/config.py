"""Structured (dataclass) schemas for the Hydra config tree; a typo'd key or a wrong type fails at start.

Groups mirror the code's seams (configs/model, data, optim, deepspeed, packing, experiment);
every field is documented where it is declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II

from vlmtune.configs import CONFIG_DIR
from vlmtune.data.dataset import DataConfig
from vlmtune.train.model.build import ModelConfig
from vlmtune.train.model.lora import LoRAConfig
from vlmtune.train.model.v2pe import V2PEConfig
from vlmtune.train.objectives.mpo import MPOLossConfig


@dataclass
class EvalDataConfig(DataConfig):
    """The ``eval_data`` block: every sample setting follows ``data.*`` unless set, so held-out questions
    are prompted and tiled as the training data was (a preset or a user sets only ``meta_path``, e.g.
    ``eval_data.meta_path=held_out.json`` on the command line). No ``meta_path``: no held-out eval."""

    meta_path: str | None = None
    max_length: int | None = II("data.max_length")
    image_size: int = II("data.image_size")
    max_dynamic_patch: int = II("data.max_dynamic_patch")
    min_dynamic_patch: int = II("data.min_dynamic_patch")
    use_thumbnail: bool = II("data.use_thumbnail")
    min_num_frames: int = II("data.min_num_frames")
    max_num_frames: int = II("data.max_num_frames")
    video_decode_timeout_s: float = II("data.video_decode_timeout_s")
    jpeg_quality_range: tuple[int, int] = II("data.jpeg_quality_range")
    system_prompt: str | None = II("data.system_prompt")
    seed: int = II("data.seed")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (the InternVL3 recipe's schedule)."""

    lr: float = 2e-5  # peak learning rate
    weight_decay: float = 0.05  # decoupled weight decay (not applied to biases and norms)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03  # fraction of max_steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    max_grad_norm: float = 1.0  # global-norm clipping (0 disables)


@dataclass
class DeepSpeedConfig:
    """The ZeRO layout; the DeepSpeed JSON is generated from these fields (see train/runtime/engine.py)."""

    zero_stage: int = 0  # 0 = plain data parallel, 1/2/3 = ZeRO stages
    offload_optimizer: bool = False  # optimizer states (and step) on CPU (ZeRO-Offload)
    offload_param: bool = False  # parameters on CPU (ZeRO-3 only)
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    extra: dict[str, Any] = field(default_factory=dict)  # raw keys merged last into the generated JSON


@dataclass
class PackingConfig:
    """Multimodal packing (data/packing.py); off = one sample per row, padded (the peers' layout)."""

    enabled: bool = True
    max_tokens: int = 8192  # tokens per pack; data.max_length must not exceed it
    max_tiles: int | None = None  # image tiles per pack: bounds the vision tower's batch (None = no cap)
    buffer_size: int = 64  # samples held for best-fit packing; larger = fuller packs


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"  # offline by default: nothing leaves the machine unless asked
    project: str = "vlmtune"
    name: str | None = None


@dataclass
class TrainConfig:
    """The loop's knobs (train/runtime/loop.py)."""

    output_dir: str = "outputs/run"  # one fixed directory for all ranks; checkpoints, metrics, config, export
    seed: int = 42
    max_steps: int = 100  # optimizer steps; the data stream cycles epochs as needed
    micro_batch_size: int = 1  # packs per micro-batch (packing on) or samples (packing off)
    gradient_accumulation_steps: int = 1
    loss_reduction: str = "square"  # token | sample | square (data/token_weights.py)
    #: ranks that split each packed row along the sequence (DeepSpeed-Ulysses, train/model/sequence_parallel.py):
    #: they read the same micro-batches, so the data-parallel world is world / this. Needs packing, the LLM's
    #: heads and KV heads divisible (or KV heads dividing it), and packed_sdpa or packed_varlen attention.
    sequence_parallel_size: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    num_workers: int = 0  # DataLoader processes decoding and tiling images ahead of the loop
    #: stop the run when more than this fraction of the last ``skip_window`` samples of a rank were
    #: skipped (a mistyped path, every pair longer than a pack): it cannot make progress. 1.0: never.
    skip_ceiling: float = 0.5
    skip_window: int = 256
    #: a step with a non-finite loss or gradient norm is skipped on every rank (counted in the metrics);
    #: this many in a row stop the run
    max_nonfinite_steps: int = 3
    #: these signals (and ``stop_file`` appearing) make every rank finish its step, save a complete
    #: checkpoint and exit 0; rerun the same command to resume (scripts/launch/slurm.sbatch requeues)
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    stop_file: str | None = None
    log_every: int = 1
    eval_every: int = 0  # steps between evaluations (0 = only at the end when eval data is given)
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    resume: bool = True  # continue from the newest complete checkpoint in output_dir if there is one
    export: bool = True  # write the trained model at the end (export_format says where and how)
    #: hf: output_dir/hf (transformers' InternVL layout) | original: output_dir/original (the model card's
    #: InternVLChatModel layout: lmdeploy, VLMEvalKit, vLLM), the -hf copy removed once the end-of-run eval
    #: has read it | both. LoRA runs export the adapter (-hf keys); `vlmtune merge-lora --format` converts.
    export_format: str = "hf"
    eval_max_samples: int | None = None  # cap on held-out samples for eval (None = all)
    eval_before: bool = False  # also evaluate the starting model (eval.json gets a "before" entry)
    eval_max_new_tokens: int = 8  # greedy answers stop here (or at <|im_end|>)
    eval_match: str = "normalised"  # normalised | exact | number | choice (data/answers.py)
    #: Held-out questions the export is asked again through plain transformers at the end (rank 0, when
    #: eval data is set); below 99% agreement with vlmtune's answers the run warns and says what differs.
    serving_check: int = 32
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SFTRunConfig:
    """Everything `vlmtune sft` needs; composed by Hydra from configs/sft.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters (train/model/lora.py); off by default
    data: DataConfig = field(default_factory=DataConfig)
    #: held-out split: sample settings follow data.* unless set; without a meta_path (or null): none
    eval_data: EvalDataConfig | None = field(default_factory=EvalDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    v2pe: V2PEConfig = field(default_factory=V2PEConfig)  # visual position increment (train/model/v2pe.py)
    train: TrainConfig = field(default_factory=TrainConfig)
    prepare_demo: bool = (
        False  # demo presets only: generate their data and tiny checkpoint first (train/demo/)
    )

    def __post_init__(self) -> None:
        """Refuse at start what sequence parallelism cannot split (the rest: the model's build)."""
        size = self.train.sequence_parallel_size
        if size < 1:
            raise ValueError(f"train.sequence_parallel_size must be >= 1, got {size}")
        if size > 1 and not self.packing.enabled:
            raise ValueError(
                f"train.sequence_parallel_size={size} splits one packed row: set packing.enabled=true"
            )


@dataclass
class MPORunConfig(SFTRunConfig):
    """`vlmtune mpo`: the SFT run's fields plus the MPO loss and the reference policy."""

    loss: MPOLossConfig = field(default_factory=MPOLossConfig)
    reference: str = "copy"  # copy: a frozen copy of the starting model (ZeRO-3 sharded like the policy);
    # precomputed: its log-probs computed once before training, cached in output_dir (no reference in memory)


def register_schemas() -> None:
    """Make the schemas visible to Hydra so that yaml files are validated against them."""
    cs = ConfigStore.instance()
    cs.store(name="sft_schema", node=SFTRunConfig)
    cs.store(name="mpo_schema", node=MPORunConfig)
    cs.store(group="loss", name="schema", node=MPOLossConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="lora", name="schema", node=LoRAConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="deepspeed", name="schema", node=DeepSpeedConfig)
    cs.store(group="packing", name="schema", node=PackingConfig)
    cs.store(group="v2pe", name="schema", node=V2PEConfig)


def compose_config(method: str, overrides: list[str]) -> Any:
    """The run config `vlmtune sft` / `vlmtune mpo` would get from the same overrides.

    For what reads a config without training (`vlmtune plan`, tests, benchmarks): ``data.meta_path``
    left unset (``???``) becomes a placeholder.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_schemas()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None, job_name=f"vlmtune-{method}"):
        dcfg = compose(config_name=method, overrides=overrides)
    for group in ("data", "eval_data"):
        node = dcfg.get(group)
        if node is not None and OmegaConf.is_missing(node, "meta_path"):
            node.meta_path = "(not read)"
    return to_run_config(dcfg)


def to_run_config(dcfg: Any) -> Any:
    """The composed config as its dataclasses; an ``eval_data`` block without a meta file becomes None
    (the block exists by default so that ``eval_data.meta_path=...`` can be given on the command line)."""
    from omegaconf import OmegaConf

    node = dcfg.get("eval_data")
    if node is not None and node.get("meta_path") is None:
        dcfg.eval_data = None
    return OmegaConf.to_object(dcfg)


def model_preset(name: str, overrides: list[str] = ()) -> Any:
    """``configs/model/<name>.yaml`` as a `ModelConfig`, composed as a run would (its defaults list
    included: the vision tower is a shared preset of its own)."""
    return compose_config("sft", [f"model={name}", *overrides]).model
