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

from vlmtune.train.commands.eval import main as eval_main


def engines_eval(demo_run, engines: str, tmp_path) -> dict:
    """`vlmtune eval --engine ENGINES` on the demo export; "vlmtune" alone: its records, in process."""
    out, meta = demo_run
    if tmp_path is None:
        from argparse import Namespace

        from vlmtune.train.commands.eval import vlmtune_results

        args = Namespace(
            model=str(out / "hf"),
            base=None,
            meta=str(meta),
            max_samples=None,
            max_new_tokens=8,
            match="normalised",
            marker="Answer:",
        )
        return vlmtune_results(args)
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


def test_vllm_answers_as_vlmtune(demo_run, vllm_hf_answers):
    """vLLM (the shared run of its own venv on the export) against `vlmtune eval`'s own answers."""
    from vlmtune.data.answers import normalise_answer

    out, _ = demo_run
    items, answers = vllm_hf_answers
    trained = json.loads((out / "eval.json").read_text())
    ours = engines_eval(demo_run, "vlmtune", None)
    by_source = {r["source"]: r["prediction"] for r in ours["records"]}
    same = [normalise_answer(a) == normalise_answer(by_source[i.source]) for i, a in zip(items, answers)]
    assert len(same) == 100
    assert sum(same) / len(same) >= 0.97, [(i.source, a) for i, a, ok in zip(items, answers, same) if not ok]
    vllm_accuracy = (
        sum(normalise_answer(a) == normalise_answer(i.answer) for i, a in zip(items, answers)) / 100
    )
    assert abs(vllm_accuracy - trained["accuracy"]) <= 0.03


def test_end_of_run_serving_check_passes_and_catches_the_base_checkpoints_tiling(
    demo_run, tmp_path, monkeypatch
):
    """The run asked 32 questions again through transformers (serving_check.json). The same check on
    a copy of the export whose processor says InternVL3's default `max_patches: 12` (what exports
    carried before: the model trained on one tile per image) fails and names the tiles."""
    import shutil

    from transformers import AutoTokenizer

    from vlmtune.train.model.build import tile_size
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
    data_cfg = trained_data_config(out / "hf", tile_size(model.config.vision_config), str(meta))
    records = evaluate_accuracy(model, tokenizer, data_cfg, 16, 32, keep_records=True)["records"]
    result = serving_check(broken, records, data_cfg, tokenizer, 16, 32, max_new_tokens=8)
    assert result["agreement"] < 0.99
    first = result["first_disagreement"]
    assert first["tiles"]["vlmtune"] == 1 < first["tiles"]["export"] and not first["input_ids_equal"]

    # the check asks transformers with the limit the answers were generated with (a fixed 8 read every
    # longer answer as a miss: a 24-token three-step answer gave 0% agreement)
    from vlmtune.train.runtime import eval_engines

    asked = []

    def recording(model_dir, items, max_new_tokens, base=None):
        asked.append(max_new_tokens)
        return real(model_dir, items, max_new_tokens, base)

    real = eval_engines.transformers_answers
    monkeypatch.setattr(eval_engines, "transformers_answers", recording)
    cut = evaluate_accuracy(model, tokenizer, data_cfg, 16, 32, max_new_tokens=3, keep_records=True)
    assert serving_check(out / "hf", cut["records"], data_cfg, tokenizer, 16, 32, 3)["agreement"] >= 0.99
    assert asked == [3]
