"""DoRA (``lora.use_dora``): weight-decomposed adapters are built, start as the base model, train (the
magnitude vectors too), and the exported adapter loads in peft with the same logits; the same through
`vlmtune sft lora=llm lora.use_dora=true`."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.e2e import base_overrides, run_sft
from tests.train.helpers import tiny_model_config, tiny_tokenizer
from tests.train.model.test_lora import _logits, batch_for, lora_config, train_steps
from vlmtune.train.model.build import build_model

PARTS = ("llm", "vision")
MAGNITUDE = ".lora_magnitude_vector."  # peft's name for DoRA's per-output-channel magnitude


def dora_model(pretrained, parts=PARTS, seed: int = 0):
    torch.manual_seed(seed)
    cfg = lora_config(*parts)
    cfg.use_dora = True
    return build_model(tiny_model_config(pretrained=str(pretrained)), tiny_tokenizer(), cfg)


def _adapted_modules(model) -> set[str]:
    return {n.split(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_dora_builds_a_magnitude_for_every_adapted_layer_and_starts_as_the_base(tiny_model_dir):
    from transformers import InternVLForConditionalGeneration

    model = dora_model(tiny_model_dir)
    adapted = _adapted_modules(model)
    with_magnitude = {n.split(MAGNITUDE)[0] for n, _ in model.named_parameters() if MAGNITUDE in n}
    assert adapted and with_magnitude == adapted
    assert {"language_model", "vision_tower"} <= {part for n in adapted for part in n.split(".")}
    assert all(p.requires_grad for n, p in model.named_parameters() if MAGNITUDE in n)
    # B = 0 and the magnitude = the base weight's column norms: the untrained adapter is the identity
    base = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    batch = batch_for(model, 5)
    torch.testing.assert_close(_logits(model, batch), _logits(base, batch), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained_dora(tiny_model_dir, tmp_path_factory):
    """A DoRA (llm + vision) + full projector model trained a few steps, exported as a peft directory."""
    from vlmtune.train.runtime.export import export_adapter

    model = dora_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, steps=4, lr=3e-2)
    out = tmp_path_factory.mktemp("dora") / "adapter"
    export_adapter(model, tiny_tokenizer(), out, source_dir=str(tiny_model_dir), extra={"data": {}})
    return model, before, out


def test_dora_trains_the_adapters_and_magnitudes_only(trained_dora):
    model, before, _ = trained_dora
    after = dict(model.named_parameters())
    for name, old in before.items():
        changed = not torch.equal(old, after[name].detach())
        if ".lora_B." in name or MAGNITUDE in name:
            assert changed, f"did not train: {name}"
        elif ".lora_" not in name and ".modules_to_save." not in name:
            assert not changed, f"base weight changed: {name}"


def test_dora_adapter_loads_in_peft_with_the_same_logits(trained_dora, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration

    model, _, out = trained_dora
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sum("lora_magnitude_vector" in k for k in saved) == len(_adapted_modules(model))
    batch = batch_for(model, 7)
    loaded = PeftModel.from_pretrained(InternVLForConditionalGeneration.from_pretrained(tiny_model_dir), out)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    plain = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert (_logits(plain, batch) - _logits(model, batch)).abs().max() > 1e-3  # the adapter matters


def test_sft_with_use_dora_trains_and_exports_a_dora_adapter(tiny_model_dir, tmp_path):
    """The command line's flag reaches peft through the runner and DeepSpeed: the exported adapter is a
    DoRA one whose magnitudes moved from the base weights' norms (their starting value)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration

    from vlmtune.data.synthetic import generate_sft_dataset

    meta = generate_sft_dataset(tmp_path / "data", num_train=16, num_eval=2, seed=4)
    out = tmp_path / "run"
    extra = {"lora": "llm", "lora.use_dora": True, "model.freeze_vision": True, "train.max_steps": 3}
    run_sft(base_overrides(tiny_model_dir, meta, out, **extra))
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert magnitudes and all("language_model" in k for k in magnitudes)
    start = dora_model(tiny_model_dir, parts=("llm",))
    # peft saves a magnitude under its module's name + "lora_magnitude_vector" (no adapter name, no ".weight")
    initial = {
        n.replace(".default", "").removesuffix(".weight"): p.detach()
        for n, p in start.named_parameters()
        if MAGNITUDE in n
    }
    assert sorted(magnitudes) == sorted(initial)
    still = [k for k, v in magnitudes.items() if torch.allclose(v, initial[k])]
    assert not still, f"magnitude vectors that did not train: {still}"
    loaded = PeftModel.from_pretrained(
        InternVLForConditionalGeneration.from_pretrained(tiny_model_dir), adapter
    )
    batch = batch_for(start, 3)
    assert (_logits(loaded, batch) - _logits(start, batch)).abs().max() > 1e-4
