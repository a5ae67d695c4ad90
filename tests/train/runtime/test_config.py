"""The Hydra tree composes for every preset, and bad values fail at start with a message naming them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlmtune.configs import CONFIG_DIR
from vlmtune.train.commands.runner import check_config
from vlmtune.train.runtime.config import DeepSpeedConfig, OptimConfig, TrainConfig, register_schemas
from vlmtune.train.runtime.engine import build_ds_config, cosine_with_warmup

REPO = Path(__file__).resolve().parents[3]


def _compose(overrides: list[str]):
    register_schemas()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("sft", overrides=overrides)


@pytest.mark.parametrize("model", sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml")))
def test_every_model_and_zero_preset_composes(model):
    for zero in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        cfg = OmegaConf.to_object(_compose([f"model={model}", f"deepspeed={zero}", "data.meta_path=x.json"]))
        assert cfg.model.name
        assert cfg.deepspeed.zero_stage in (0, 1, 2, 3)


def test_demo_experiment_overrides_only():
    cfg = OmegaConf.to_object(_compose(["experiment=demo"]))
    assert cfg.prepare_demo and cfg.model.pretrained == "outputs/demo/tiny_init"
    assert cfg.eval_data.image_size == cfg.data.image_size == 56


def test_38b_preset_mirrors_the_official_launch():
    cfg = OmegaConf.to_object(_compose(["experiment=internvl3_38b_sft", "data.meta_path=x.json"]))
    assert (
        cfg.model.name
        and cfg.model.freeze_vision
        and not cfg.model.freeze_llm
        and not cfg.model.freeze_projector
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_ratio) == (2e-5, 0.05, 0.03)
    assert (cfg.data.max_length, cfg.data.max_dynamic_patch, cfg.data.image_size) == (16384, 12, 448)
    assert cfg.deepspeed.zero_stage == 3 and cfg.model.gradient_checkpointing
    check_config(cfg)


def test_eval_data_on_the_command_line_follows_data_and_is_off_without_a_meta_file():
    from vlmtune.train.runtime.config import compose_config

    cfg = compose_config(
        "sft", ["data.image_size=56", "data.max_dynamic_patch=3", "eval_data.meta_path=e.json"]
    )
    assert cfg.eval_data.meta_path == "e.json"
    assert (cfg.eval_data.image_size, cfg.eval_data.max_dynamic_patch) == (56, 3)
    assert compose_config("sft", []).eval_data is None
    assert compose_config("sft", ["experiment=demo", "eval_data=null"]).eval_data is None


def test_typo_key_is_refused_with_its_name():
    with pytest.raises(Exception, match="max_stpes"):
        _compose(["train.max_stpes=3"])


def test_wrong_type_is_refused_with_its_name():
    with pytest.raises(Exception, match="max_steps"):
        OmegaConf.to_object(_compose(["train.max_steps=many"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.loss_reduction=mean"], "loss_reduction"),
        (["data.max_length=9000", "packing.max_tokens=8192"], "max_length"),
        (["train.gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
        (["train.export_format=gguf"], "export_format must be one of hf, original, both"),
        (["model.dtype=bfloat16", "train.precision=fp32"], "round to zero.*train.precision=bf16"),
        (["deepspeed.offload_param=true"], "offload_param needs deepspeed.zero_stage=3"),
        (["deepspeed.offload_optimizer=true"], "offload_optimizer needs deepspeed.zero_stage >= 1"),
        (["train.export_format=original", "lora=both"], "merge-lora .* --format original"),
    ],
)
def test_bad_values_are_refused_at_start(overrides, message):
    cfg = OmegaConf.to_object(_compose(["data.meta_path=x.json", *overrides]))
    with pytest.raises(ValueError, match=message):
        check_config(cfg)


def test_cli_reports_a_typo_and_exits_non_zero():
    proc = subprocess.run(
        [sys.executable, "-m", "vlmtune.train.commands.sft", "train.max_stpes=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "max_stpes" in proc.stdout + proc.stderr


def test_deepspeed_json_from_config():
    train, optim = (
        TrainConfig(micro_batch_size=2, gradient_accumulation_steps=4),
        OptimConfig(max_grad_norm=0.5),
    )
    ds = build_ds_config(
        DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_param=True), train, optim, world_size=8
    )
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW"  # offload steps with DeepSpeed's CPU Adam
    extra = build_ds_config(
        DeepSpeedConfig(zero_stage=2, extra={"zero_optimization": {"round_robin_gradients": True}}),
        train,
        optim,
        1,
    )
    assert (
        extra["zero_optimization"]["round_robin_gradients"] is True
        and extra["zero_optimization"]["stage"] == 2
    )
    with pytest.raises(ValueError, match="offload_param"):
        build_ds_config(DeepSpeedConfig(zero_stage=2, offload_param=True), train, optim, 1)


def test_cosine_schedule_by_hand():
    assert cosine_with_warmup(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_half_precision_checkpoint_with_fp32_training_is_refused_unless_lora(tmp_path):
    import json as _json

    (tmp_path / "config.json").write_text(
        _json.dumps({"architectures": ["InternVLForConditionalGeneration"], "dtype": "bfloat16"})
    )
    base = [
        "data.meta_path=x.json",
        f"model.pretrained={tmp_path}",
        "model.dtype=auto",
        "train.precision=fp32",
    ]
    with pytest.raises(ValueError, match=r"bfloat16 \(model.dtype=auto\)"):
        check_config(OmegaConf.to_object(_compose(base)))
    check_config(OmegaConf.to_object(_compose([*base, "lora=both"])))  # fp32 adapters over a frozen base
    check_config(OmegaConf.to_object(_compose([*base, "model.dtype=float32"])))


def test_unknown_mpo_layout_and_reference_are_refused_at_start():
    from vlmtune.train.commands.mpo import run_mpo
    from vlmtune.train.runtime.config import compose_config

    with pytest.raises(ValueError, match="loss.layout='diagonal' is unknown"):
        run_mpo(compose_config("mpo", ["loss.layout=diagonal"]))
    with pytest.raises(ValueError, match="reference='cached' is unknown"):
        run_mpo(compose_config("mpo", ["reference=cached"]))
