"""LoRA: exactly the intended parameters train; save/load, merge and the adapter-disabled reference are exact."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import make_sample, tiny_model_config, tiny_tokenizer
from vlmtune.data.collate import collate_packed
from vlmtune.train.model.build import build_model, count_parameters
from vlmtune.train.model.lora import LoRAConfig, LoRAPartConfig, peft_config
from vlmtune.train.objectives.sft import SFTObjective


def lora_config(*parts: str, r: int = 4, vision_r: int = 2) -> LoRAConfig:
    cfg = LoRAConfig(dropout=0.0)
    cfg.llm.enabled, cfg.llm.r = "llm" in parts, r
    cfg.vision.enabled, cfg.vision.r = "vision" in parts, vision_r
    return cfg


def lora_model(
    parts: tuple[str, ...], pretrained=None, seed: int = 0, r: int = 4, vision_r: int = 2, **model_overrides
):
    torch.manual_seed(seed)
    cfg = tiny_model_config(pretrained=None if pretrained is None else str(pretrained), **model_overrides)
    return build_model(cfg, tiny_tokenizer(), lora_config(*parts, r=r, vision_r=vision_r))


def batch_for(model, seed: int = 0) -> dict:
    samples = [make_sample(model, 1, 2, 6, 5, seed), make_sample(model, 0, 0, 8, 4, seed + 1)]
    return collate_packed(samples, "token")


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> None:
    objective = SFTObjective("token")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        batch = batch_for(model, step)
        loss, _ = objective(model, batch, objective.weight_totals(batch))
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    "parts, freeze_projector",
    [(("llm",), True), (("vision",), True), (("llm", "vision"), True), (("llm",), False)],
)
def test_lora_trains_exactly_the_intended_parameters(parts, freeze_projector):
    model = lora_model(parts, freeze_vision=True, freeze_llm=True, freeze_projector=freeze_projector)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    after = dict(model.named_parameters())
    adapted_parts = {"llm": "language_model", "vision": "vision_tower"}
    for name, old in before.items():
        changed = not torch.equal(old, after[name].detach())
        if ".lora_" in name:
            part = next(p for p, module in adapted_parts.items() if module in name)
            assert part in parts, f"adapter on a part without LoRA: {name}"
            assert changed, f"adapter did not train: {name}"
        elif ".modules_to_save." in name:
            assert "multi_modal_projector" in name and not freeze_projector
            assert changed, name
        else:
            assert not changed, f"base weight changed: {name}"
    for part, module in adapted_parts.items():
        has = any(".lora_" in n and module in n for n in before)
        assert has == (part in parts)


def test_vision_tower_gets_its_own_rank():
    cfg = peft_config(lora_config("llm", "vision", r=8, vision_r=2), tiny_model_config())
    model = lora_model(("llm", "vision"), r=8, vision_r=2)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    q_llm = next(s for n, s in shapes.items() if "language_model" in n and "q_proj.lora_A" in n)
    q_vis = next(s for n, s in shapes.items() if "vision_tower" in n and "q_proj.lora_A" in n)
    assert (q_llm[0], q_vis[0]) == (8, 2)
    assert cfg.lora_alpha == 16  # alpha defaults to 2r


def test_trainable_count_is_the_hand_computed_adapter_size():
    model = lora_model(("llm",), freeze_vision=True, freeze_projector=True)
    counts = count_parameters(model)
    text = model.config.text_config
    h, kv = text.hidden_size, text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    i, r = text.intermediate_size, 4
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    expected = text.num_hidden_layers * sum(r * (a + b) for a, b in shapes)
    assert counts["trainable"] == counts["adapter"] == expected
    plain = count_parameters(build_model(tiny_model_config(), tiny_tokenizer()))
    assert {k: counts[k] for k in ("vision", "projector", "llm")} == {
        k: plain[k] for k in ("vision", "projector", "llm")
    }


def _logits(model, batch) -> torch.Tensor:
    from vlmtune.train.model.forward import forward_logits

    model.eval()
    with torch.no_grad():
        return forward_logits(model, batch, torch.arange(batch["input_ids"].shape[1]))


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA (llm + vision) + full projector model trained a few steps, exported as a peft directory."""
    from vlmtune.train.runtime.export import export_adapter

    model = lora_model(("llm", "vision"), pretrained=tiny_model_dir)
    train_steps(model, steps=4, lr=3e-2)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    export_adapter(model, tiny_tokenizer(), out, source_dir=str(tiny_model_dir), extra={"data": {}})
    return model, out


def test_adapter_dir_loads_over_the_base_with_the_same_logits(trained_adapter, tiny_model_dir):
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    model, out = trained_adapter
    batch = batch_for(model, 7)
    base = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    plain = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert (_logits(plain, batch) - _logits(model, batch)).abs().max() > 1e-3  # the adapter matters


def test_merge_gives_the_adapter_models_logits(trained_adapter, tmp_path):
    from transformers import InternVLForConditionalGeneration

    from vlmtune.train.commands.merge_lora import merge_lora

    model, adapter = trained_adapter
    check = merge_lora(adapter, tmp_path / "merged")
    assert check["max_relative_logit_diff"] < 1e-5
    merged = InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n in merged.state_dict())
    batch = batch_for(model, 8)
    torch.testing.assert_close(_logits(merged, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)


def test_adapter_on_an_original_format_base_loads_and_merges_into_either_format(
    trained_adapter, tiny_model_dir, tmp_path
):
    """The card's layout as the base (converted in memory, the adapter's -hf keys unchanged), and the
    merge written in the original layout holds exactly the -hf merge's tensors."""
    from vlmtune.train.commands.merge_lora import merge_lora
    from vlmtune.train.model.original_format import convert, load_original
    from vlmtune.train.runtime.export import load_trained

    model, adapter = trained_adapter
    original_base = tmp_path / "base_original"
    convert(tiny_model_dir, original_base, "original")
    batch = batch_for(model, 9)
    on_original = load_trained(adapter, str(original_base))
    torch.testing.assert_close(_logits(on_original, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)

    merge_lora(adapter, tmp_path / "merged_hf")
    merge_lora(adapter, tmp_path / "merged_original", base=str(original_base), out_format="original")
    assert json.loads((tmp_path / "merged_original" / "config.json").read_text())["architectures"] == [
        "InternVLChatModel"
    ]
    merged = load_original(tmp_path / "merged_original")
    torch.testing.assert_close(_logits(merged, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    convert(tmp_path / "merged_original", tmp_path / "back_to_hf", "hf")
    from safetensors.torch import load_file

    expected = load_file(tmp_path / "merged_hf" / "model.safetensors")
    got = load_file(tmp_path / "back_to_hf" / "model.safetensors")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_merge_refuses_when_merged_logits_differ(trained_adapter, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    from vlmtune.train.commands.merge_lora import merge_lora

    original = LoraModel.merge_and_unload

    def broken(self, *args, **kwargs):  # a merge that loses the vision adapters
        merged = original(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.vision_tower.encoder.layer[0].mlp.fc1.weight.mul_(1.5)
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken)
    _, adapter = trained_adapter
    with pytest.raises(RuntimeError, match="differ"):
        merge_lora(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapter_disabled_reference_is_the_starting_model(trained_adapter, tiny_model_dir):
    """MPO with LoRA: the policy with adapters off gives the untrained model's log-probs."""
    from transformers import InternVLForConditionalGeneration

    from tests.train.objectives.test_mpo import make_pairs
    from vlmtune.data.collate import collate_pairs
    from vlmtune.train.objectives.mpo import response_logps
    from vlmtune.train.objectives.reference import adapter_disabled_reference

    model, _ = trained_adapter
    batch = collate_pairs(make_pairs(model), "tree", "token")
    reference = adapter_disabled_reference(model)(batch, None)
    base = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = response_logps(base, batch)[0]
        policy = response_logps(model, batch)[0]
    torch.testing.assert_close(reference, expected, rtol=1e-6, atol=1e-6)
    assert (policy - expected).abs().max() > 1e-3


def test_lora_config_refusals():
    from vlmtune.train.model.lora import check_lora_config

    bad = LoRAConfig(llm=LoRAPartConfig(enabled=True, r=0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="lora.llm"):
        check_lora_config(bad, zero_stage=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            check_lora_config(LoRAConfig(quantize="4bit", llm=lora_config("llm").llm), zero_stage=0)


def test_lora_with_gradient_checkpointing_gives_the_same_gradients():
    """Frozen embeddings + checkpointed blocks: the adapters still get (the same) gradients."""
    grads = []
    for checkpointing in (False, True):
        model = lora_model(
            ("llm",), freeze_vision=True, freeze_projector=True, gradient_checkpointing=checkpointing
        )
        model.train()
        objective = SFTObjective("token")
        batch = batch_for(model, 3)
        loss, _ = objective(model, batch, objective.weight_totals(batch))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert all(
        g.abs().max() > 0 for n, g in grads[1].items() if "lora_B" in n
    )  # B starts at 0: A gets none yet
