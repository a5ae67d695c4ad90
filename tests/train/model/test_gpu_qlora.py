"""QLoRA on a GPU: 4-bit NF4 base weights (bitsandbytes) under LoRA adapters, through the real runner.

Skipped without CUDA or bitsandbytes (CPU CI): there, `lora.quantize=4bit` is refused at start.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.train.e2e import REPO, base_overrides, sft_command, sft_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
bnb = pytest.importorskip("bitsandbytes")

QLORA = {
    "lora": "llm",
    "lora.quantize": "4bit",
    "model.freeze_vision": True,
    "model.freeze_projector": True,
    "model.dtype": "bfloat16",
    "train.precision": "bf16",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("qlora")
    meta = generate_sft_dataset(root / "data", num_train=64, num_eval=8, seed=1)
    return root, meta, build_tiny_checkpoint(root / "tiny")


def test_qlora_model_has_4bit_llm_and_full_precision_vision(data):
    from omegaconf import OmegaConf

    from tests.train.helpers import tiny_model_config, tiny_tokenizer
    from vlmtune.train.model.build import build_model
    from vlmtune.train.model.lora import LoRAConfig

    _, _, ckpt = data
    lora = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(LoRAConfig), {"llm": {"enabled": True}, "quantize": "4bit"})
    )
    cfg = tiny_model_config(pretrained=str(ckpt), dtype="bfloat16", freeze_vision=True, freeze_projector=True)
    model = build_model(cfg, tiny_tokenizer(), lora)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    q = [n for n, k in kinds.items() if k == "Linear4bit"]
    assert q and all("language_model" in n for n in q)
    assert not any("vision_tower" in n or "lm_head" in n for n in q)
    assert all(not p.requires_grad or ".lora_" in n for n, p in model.named_parameters())


def test_qlora_sft_run_learns_and_exports_an_adapter(data):
    root, meta, ckpt = data
    out = root / "run"
    env = {k: v for k, v in sft_env().items() if k != "DS_ACCELERATOR"}
    overrides = base_overrides(ckpt, meta, out, **{"train.max_steps": 30, "optim.lr": 3e-3, **QLORA})
    proc = subprocess.run(
        sft_command(overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # adapters alone over a frozen 4-bit random base: the loss falls from ~7.3 to the ~5.7 plateau
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert os.path.getsize(out / "adapter" / "adapter_model.safetensors") > 0
