"""The SFT demo's export answers through plain transformers and vLLM as it does in vlmtune.

The model is trained briefly (200 steps: held-out exact match well above chance), exported, and asked
the 100 held-out questions by each engine. transformers (AutoProcessor, the export's chat template,
generate) and vLLM (its own venv, its own InternVL implementation) read only what the export holds,
so a tiling, template or weight-layout difference shows as disagreement. The tolerance: on identical
inputs greedy decoding differs only on near-ties of the logits, so >= 0.99 agreement (vLLM, whose
kernels differ more: >= 0.97).
"""

from __future__ import annotations

import json

import pytest

from vlmtune.train.commands.eval import main as eval_main
from vlmtune.train.runtime.eval_engines import vllm_missing_message, vllm_python


def engines_eval(demo_run, engines: str, tmp_path) -> dict:
    out, meta = demo_run
    report = tmp_path / "eval.json"
    eval_main(["--model", str(out / "hf"), "--meta", str(meta), "--engine", engines, "--out", str(report)])
    return json.loads(report.read_text())


def test_transformers_answers_as_vlmtune_and_vlmtune_eval_repeats_training(demo_run, tmp_path):
    out, _ = demo_run
    trained = json.loads((out / "eval.json").read_text())
    assert trained["num_samples"] == 100 and trained["accuracy"] >= 0.6  # learnt from the pixels
    result = engines_eval(demo_run, "vlmtune,transformers", tmp_path)
    ours, theirs = result["engines"]["vlmtune"], result["engines"]["transformers"]
    # `vlmtune eval` on the export gives the figures written at the end of training
    assert ours["accuracy"] == trained["accuracy"]
    assert ours["blank_image_accuracy"] == trained["blank_image_accuracy"]
    agreement = result["agreement_with_vlmtune"]["transformers"]
    assert agreement["n"] == 100
    assert agreement["rate"] >= 0.99, result["disagreements"]["transformers"]
    assert abs(theirs["accuracy"] - ours["accuracy"]) <= 0.01


@pytest.mark.skipif(vllm_python() is None, reason=vllm_missing_message())
def test_vllm_answers_as_vlmtune(demo_run, tmp_path):
    result = engines_eval(demo_run, "vlmtune,vllm", tmp_path)
    agreement = result["agreement_with_vlmtune"]["vllm"]
    assert agreement["n"] == 100
    assert agreement["rate"] >= 0.97, result["disagreements"]["vllm"]
    assert abs(result["engines"]["vllm"]["accuracy"] - result["engines"]["vlmtune"]["accuracy"]) <= 0.03


def test_end_of_run_serving_check_passes_and_catches_the_base_checkpoints_tiling(demo_run, tmp_path):
    """The run asked 32 questions again through transformers (serving_check.json). The same check on
    a copy of the export whose processor says InternVL3's default `max_patches: 12` (what exports
    carried before: the model trained on one tile per image) fails and names the tiles."""
    import shutil

    from transformers import AutoTokenizer

    from vlmtune.train.runtime.eval_engines import serving_check
    from vlmtune.train.runtime.evaluate import evaluate_accuracy, trained_data_config
    from vlmtune.train.runtime.export import load_trained

    out, meta = demo_run
    check = json.loads((out / "serving_check.json").read_text())
    assert check["n"] == 32 and check["agreement"] >= 0.99

    broken = tmp_path / "hf"
    shutil.copytree(out / "hf", broken)
    processor = json.loads((broken / "processor_config.json").read_text())
    processor["image_processor"].update(max_patches=12, crop_to_patches=True)
    (broken / "processor_config.json").write_text(json.dumps(processor))
    model, tokenizer = load_trained(out / "hf"), AutoTokenizer.from_pretrained(out / "hf")
    data_cfg = trained_data_config(out / "hf", model.config, str(meta))
    records = evaluate_accuracy(model, tokenizer, data_cfg, 16, 32, keep_records=True)["records"]
    result = serving_check(broken, records, data_cfg, tokenizer, 16, 32)
    assert result["agreement"] < 0.99
    first = result["first_disagreement"]
    assert first["tiles"]["vlmtune"] == 1 < first["tiles"]["export"] and not first["input_ids_equal"]
