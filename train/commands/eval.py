"""`vlmtune eval --model DIR --meta META [--engine vlmtune|transformers|vllm|all] [--out eval.json]`.

``vlmtune`` (the default): the held-out figures of an exported model through vlmtune's own pipeline,
prompted with the settings it was trained with (its vlmtune.json), equal to the ones written at the
end of training, the repetition figures included (``truncated_rate``: answers cut at
``--max-new-tokens``; ``repeated_ngram_rate``: answers repeating a 4-gram of tokens;
train/runtime/evaluate.py). ``transformers`` / ``vllm``: the same questions through plain
transformers (`AutoProcessor`, the export's chat template, `generate`) or vLLM, as users serve the
model. With
several engines the output adds how often each agrees with vlmtune's greedy answers and the first
questions where they differ, with their inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vlmtune.data.answers import DEFAULT_MARKER, MATCH_MODES, answers_match
from vlmtune.train.runtime.evaluate import (
    evaluate_accuracy,
    majority_baseline,
    per_dataset_scores,
    trained_data_config,
)

ENGINES = ("vlmtune", "transformers", "vllm")


def vlmtune_results(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from vlmtune.train.model.build import num_image_tokens_per_tile, tile_size
    from vlmtune.train.runtime.export import load_trained

    model = load_trained(args.model, args.base)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data_cfg = trained_data_config(args.model, tile_size(model.config.vision_config), args.meta)
    return evaluate_accuracy(
        model,
        tokenizer,
        data_cfg,
        num_image_tokens_per_tile(model.config),
        args.max_samples,
        max_new_tokens=args.max_new_tokens,
        keep_records=True,
        match=args.match,
        marker=args.marker,
    )


def serving_results(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    """Exact match of one serving engine on the meta file's questions, with every answer kept."""
    from vlmtune.train.runtime.eval_engines import eval_items, transformers_answers, vllm_answers

    items = eval_items(args.meta, args.seed, args.max_samples)
    if engine == "transformers":
        answers = transformers_answers(args.model, items, args.max_new_tokens, args.base)
    else:
        answers = vllm_answers(args.model, items, args.max_new_tokens)
    records = [
        {
            "dataset": i.dataset,
            "source": i.source,
            "question": i.question,
            "answer": i.answer,
            "prediction": a,
        }
        for i, a in zip(items, answers)
    ]
    correct = sum(
        answers_match(r["prediction"], r["answer"], args.match, marker=args.marker) for r in records
    )
    results: dict[str, Any] = {
        "accuracy": correct / max(1, len(records)),
        "majority_baseline": majority_baseline(records),
        "num_samples": len(records),
        "records": records,
        "items": items,
    }
    if len({r["dataset"] for r in records}) > 1:
        results["per_dataset"] = per_dataset_scores(records, args.match, args.marker)
    return results


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Agreement of each serving engine's greedy answers with vlmtune's, question by question (matched
    by file:line), and the first disagreements with their inputs."""
    from dataclasses import asdict

    from vlmtune.train.runtime.eval_engines import against_vlmtune

    out: dict[str, Any] = {"agreement_with_vlmtune": {}, "disagreements": {}}
    for engine, res in results.items():
        if engine == "vlmtune":
            continue
        answers = [r["prediction"] for r in res["records"]]
        ours, rows = against_vlmtune(results["vlmtune"]["records"], res["items"], answers)
        out["agreement_with_vlmtune"][engine] = {
            "rate": sum(ok for *_, ok in rows) / max(1, len(rows)),
            "n": len(rows),
        }
        out["disagreements"][engine] = [
            {"vlmtune": ours[i.source], engine: a, "answer": i.answer, **asdict(i)}
            for i, a, ok in rows
            if not ok
        ][:5]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help="model directory (OUTPUT_DIR/hf, /original) or LoRA adapter directory (/adapter)",
    )
    parser.add_argument("--base", default=None, help="base model of an adapter (default: its adapter_config)")
    parser.add_argument("--meta", required=True, help="InternVL meta JSON of the held-out split")
    parser.add_argument("--out", default=None, help="where to write eval.json (default: print only)")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (greedy)")
    parser.add_argument(
        "--engine", default="vlmtune", help=f"one of {', '.join(ENGINES)}, a comma-separated list, or all"
    )
    parser.add_argument("--seed", type=int, default=0, help="the eval set's order (data.seed of the run)")
    parser.add_argument(
        "--match",
        default="normalised",
        choices=MATCH_MODES,
        help="how an answer is compared (data/answers.py)",
    )
    parser.add_argument("--marker", default=DEFAULT_MARKER, help="what precedes the answer (--match marker)")
    args = parser.parse_args(argv)
    engines = ENGINES if args.engine == "all" else tuple(e.strip() for e in args.engine.split(","))
    if unknown := [e for e in engines if e not in ENGINES]:
        parser.error(f"--engine: unknown {unknown}; choose from {', '.join(ENGINES)} or all")
    if args.engine == "all":
        from vlmtune.train.runtime.eval_engines import vllm_missing_message, vllm_python

        if vllm_python() is None:
            print(
                f"vlmtune eval: {vllm_missing_message()}; running vlmtune and transformers only",
                file=sys.stderr,
            )
            engines = ("vlmtune", "transformers")
    from vlmtune.train.model.original_format import is_original_format

    if "transformers" in engines and is_original_format(args.model):
        message = (
            f"{args.model} is in the original InternVL layout, which plain transformers loads only with "
            "OpenGVLab's remote code; vlmtune converts it in memory, vLLM serves it natively"
        )
        if args.engine != "all":
            parser.error(f"--engine transformers: {message}; use --engine vlmtune,vllm or the -hf export")
        print(f"vlmtune eval: {message}; leaving transformers out", file=sys.stderr)
        engines = tuple(e for e in engines if e != "transformers")
    if engines == ("vlmtune",):
        results = vlmtune_results(args)
        results.pop("records")
        shown = {k: v for k, v in results.items() if k != "examples"}
    else:
        per_engine: dict[str, dict[str, Any]] = {}
        for engine in engines:
            per_engine[engine] = (
                vlmtune_results(args) if engine == "vlmtune" else serving_results(engine, args)
            )
        results = {"engines": {}}
        if "vlmtune" in per_engine:
            results.update(compare(per_engine))
        for engine, res in per_engine.items():
            results["engines"][engine] = {k: v for k, v in res.items() if k not in ("records", "items")}
        shown = {
            "engines": {
                e: {k: v for k, v in r.items() if k != "examples"} for e, r in results["engines"].items()
            },
            **{k: v for k, v in results.items() if k == "agreement_with_vlmtune"},
        }
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
