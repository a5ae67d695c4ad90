"""The SFT demo's export converted to the original InternVL layout serves in vLLM as the -hf export does.

`vlmtune convert --to original` writes what vLLM's own `InternVLChatModel` reads: config.json with the
run's tiling and an ``auto_map`` to the `InternVLChatConfig` written next to it (loaded with
trust_remote_code, which `vllm_answers` passes for an original-layout directory), and a chat template
whose image part emits ``<image>``, the placeholder vLLM's InternVL processor expands. Both exports are
asked the 100 held-out questions through vLLM; greedy decoding on the same weights and inputs differs
only on near-ties, so >= 0.99 agreement and accuracies within 0.01. Converted back to -hf, the original
export is the -hf export again, tensor for tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.data.answers import normalise_answer
from vlmtune.train.model.original_format import convert
from vlmtune.train.runtime.eval_engines import vllm_answers, vllm_missing_message, vllm_python


@pytest.fixture(scope="module")
def original_export(demo_run, tmp_path_factory) -> Path:
    out, _ = demo_run
    dst = tmp_path_factory.mktemp("original_export") / "original"
    summary = convert(out / "hf", dst, "original")
    assert summary["chat_template_rewritten"] == ["chat_template.jinja"]
    return dst


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_the_original_export_converts_back_to_the_hf_export_bit_for_bit(demo_run, original_export, tmp_path):
    out, _ = demo_run
    convert(original_export, tmp_path / "hf", "hf")
    before, after = _tensors(out / "hf"), _tensors(tmp_path / "hf")
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (out / "hf" / name).read_bytes(), name


@pytest.mark.skipif(vllm_python() is None, reason=vllm_missing_message())
def test_vllm_answers_the_original_export_as_the_hf_export(vllm_hf_answers, original_export):
    items, hf_answers = vllm_hf_answers
    assert len(items) == 100
    answers = {"hf": hf_answers, "original": vllm_answers(str(original_export), items, max_new_tokens=8)}
    norm = {name: [normalise_answer(a) for a in got] for name, got in answers.items()}
    gold = [normalise_answer(item.answer) for item in items]
    same = [a == b for a, b in zip(norm["hf"], norm["original"])]
    differ = [
        (item.source, a, b)
        for item, a, b, ok in zip(items, answers["hf"], answers["original"], same)
        if not ok
    ]
    assert sum(same) / len(items) >= 0.99, differ[:10]
    accuracy = {name: sum(a == g for a, g in zip(got, gold)) / len(items) for name, got in norm.items()}
    assert accuracy["hf"] >= 0.6, accuracy  # the demo learnt from the pixels: a real comparison
    assert abs(accuracy["original"] - accuracy["hf"]) <= 0.01, accuracy
