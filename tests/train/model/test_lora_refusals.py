"""LoRA settings that cannot work are refused at check time, with their message, before any model or
process group exists: QLoRA (lora.quantize=4bit) with ZeRO-3 above all (bitsandbytes' 4-bit weights
cannot be partitioned), which only a CUDA machine reaches (without CUDA, QLoRA is refused first)."""

from __future__ import annotations

import pytest
import torch

from vlmtune.train.model.lora import LoRAConfig, LoRAPartConfig, check_lora_config
from vlmtune.train.runtime.config import compose_config

ZERO3_MESSAGE = "lora.quantize=4bit cannot be sharded with ZeRO-3"


def qlora(**fields) -> LoRAConfig:
    return LoRAConfig(llm=LoRAPartConfig(enabled=True, r=4, target_modules=["q_proj"]), **fields)


@pytest.fixture
def cuda_present(monkeypatch):
    """What check_lora_config sees on a CUDA machine (nothing here touches a device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_qlora_with_zero3_is_refused_and_other_stages_are_not(cuda_present):
    with pytest.raises(ValueError, match=ZERO3_MESSAGE):
        check_lora_config(qlora(quantize="4bit"), zero_stage=3)
    for stage in (0, 1, 2):
        check_lora_config(qlora(quantize="4bit"), zero_stage=stage)
    check_lora_config(qlora(), zero_stage=3)  # plain LoRA shards with ZeRO-3


@pytest.mark.parametrize(
    "lora, message",
    [
        (qlora(quantize="8bit"), "only '4bit'"),
        (LoRAConfig(quantize="4bit"), "needs adapters"),
    ],
)
def test_other_quantize_settings_are_refused(cuda_present, lora, message):
    with pytest.raises(ValueError, match=message):
        check_lora_config(lora, zero_stage=0)


def test_without_cuda_qlora_is_refused_and_the_zero3_error_comes_first(monkeypatch):
    """The ZeRO-3 contradiction is a config error on any machine: a CPU check of a GPU config sees it too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_lora_config(qlora(quantize="4bit"), zero_stage=2)
    with pytest.raises(ValueError, match="cannot be sharded with ZeRO-3"):
        check_lora_config(qlora(quantize="4bit"), zero_stage=3)


def test_the_run_refuses_qlora_with_zero3_before_the_process_group_and_the_model(cuda_present, monkeypatch):
    """`vlmtune sft lora=llm lora.quantize=4bit deepspeed=zero3` as composed from the command line: the
    runner's config check gives the message; distributed init and the model build are never reached."""
    import vlmtune.train.model.build as build
    import vlmtune.train.runtime.engine as engine
    from vlmtune.train.commands.runner import check_config, run_training

    def reached(*args, **kwargs):
        raise AssertionError("reached past the config check")

    monkeypatch.setattr(engine, "init_distributed", reached)
    monkeypatch.setattr(build, "build_model", reached)
    cfg = compose_config("sft", ["lora=llm", "lora.quantize=4bit", "deepspeed=zero3"])
    assert cfg.lora.quantize == "4bit" and cfg.deepspeed.zero_stage == 3
    with pytest.raises(ValueError, match=ZERO3_MESSAGE):
        check_config(cfg)
    with pytest.raises(ValueError, match=ZERO3_MESSAGE):
        run_training(cfg, method=None)
    check_config(compose_config("sft", ["lora=llm", "lora.quantize=4bit", "deepspeed=zero2"]))
