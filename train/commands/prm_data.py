"""`vlmtune prm-data --model DIR --meta META --out DIR`: VisualPRM-style step labels from a policy's samples.

VisualPRM400K's recipe (arXiv 2503.10291, section 3.1): per question ``n`` sampled solutions; each split
into steps (data/prm.py: blank lines, at most 12); from every step ``m`` completions continue the
solution so far (the sampler's ``prefix``); a step's Monte-Carlo score is the share of its completions
whose final answer (prefix + continuation) matches the reference (data/answers.py), and it is ``+``
when that share is above ``--threshold`` (0: any completion right). Each solution becomes one PRM chat.

Output in ``--out``: ``meta.json`` (one dataset per input dataset, ``supervision: assistant_content``
so that `vlmtune prm` trains on the ``+``/``-`` tokens alone), the jsonl files (each record with its
provenance: policy, engine, temperature, n, m, the steps' mc values), ``summary.json`` and the
sampler's folders ``samples/`` (solutions) and ``samples_mc/`` (completions): a rerun resumes there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vlmtune.data.answers import DEFAULT_MARKER, MATCH_MODES, answers_match
from vlmtune.data.meta import DatasetSpec, MetaError, load_meta
from vlmtune.data.prm import (
    DEFAULT_PRM_SYSTEM_PROMPT,
    MAX_STEPS,
    mc_label,
    mc_score,
    prm_conversation,
    split_steps,
    step_prefix,
)
from vlmtune.train.commands.make_pairs import Question, read_questions
from vlmtune.train.runtime.sampler import (
    Engine,
    Sample,
    SampleRequest,
    SamplingRun,
    add_run_arguments,
    build_engine,
    command_ranks,
    run_sampler,
)


@dataclass(kw_only=True)
class PRMDataConfig(SamplingRun):
    """What `prm-data` does; every field is a command-line flag of the same name."""

    model: str
    meta: str
    out: str
    #: Solutions sampled per question (VisualPRM400K: 4).
    n: int = 4
    #: Monte-Carlo completions per step (VisualPRM400K: 16).
    m: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    #: How prefix + completion is compared with the reference: "marker" reads the last "Answer:".
    match: str = "marker"
    marker: str = DEFAULT_MARKER
    #: A step is "+" when its Monte-Carlo score is above this.
    threshold: float = 0.0
    max_steps: int = MAX_STEPS
    system_prompt: str = DEFAULT_PRM_SYSTEM_PROMPT


def completion_correct(prefix: str, completion: Sample, answer: str, match: str, marker: str) -> bool:
    """Whether a completion from ``prefix`` reaches ``answer``: it ended by itself and the whole
    solution (prefix + continuation) gives the answer."""
    text = prefix + completion.text
    return completion.finish_reason == "stop" and answers_match(text, answer, match, marker=marker)


def mc_request_key(question: str, sample: int, step: int, prefix: str) -> str:
    """A completion request's key (it seeds the request): the prefix's hash is part of it, so a rerun whose
    steps differ (another ``--max-steps``) samples anew instead of reusing completions of other text."""
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:12]
    return f"{question}#s{sample}#step{step}#{digest}"


def prm_data(cfg: PRMDataConfig, engine: Engine, identity: str = "") -> dict[str, Any] | None:
    """Sample solutions, sample completions from each step, label and (rank 0) write; returns the
    summary on rank 0, None elsewhere. ``engine`` is any `sampler.Engine` (tests pass stubs)."""
    specs = load_meta(cfg.meta)
    questions, dropped = read_questions(specs, True, cfg.max_questions)
    settings = cfg.settings()
    ranks = {"rank": cfg.rank, "world_size": cfg.world_size, "wait_timeout": cfg.wait_timeout}
    out = Path(cfg.out)
    requests = [SampleRequest(q.key, q.item) for q in questions]
    solutions = run_sampler(requests, settings, engine, out / "samples", identity=identity, **ranks)
    steps_of: dict[tuple[str, int], list[str]] = {}
    mc_requests: list[SampleRequest] = []
    no_steps = 0
    for q in questions:
        for j, s in enumerate(solutions[q.key]):
            steps = split_steps(s.text, cfg.max_steps)
            if not steps:
                no_steps += 1
                continue
            steps_of[q.key, j] = steps
            for i in range(len(steps)):
                prefix = step_prefix(steps, i)
                mc_requests.append(SampleRequest(mc_request_key(q.key, j, i, prefix), q.item, prefix=prefix))
    mc_settings = replace(settings, n=cfg.m)
    completions = run_sampler(
        mc_requests, mc_settings, engine, out / "samples_mc", identity=identity, **ranks
    )
    if cfg.rank != 0:
        return None
    records: list[tuple[Question, dict[str, Any]]] = []
    for q in questions:
        for j, s in enumerate(solutions[q.key]):
            steps = steps_of.get((q.key, j))
            if steps is None:
                continue
            mcs = []
            for i in range(len(steps)):
                prefix = step_prefix(steps, i)
                done = completions[mc_request_key(q.key, j, i, prefix)]
                mcs.append(
                    mc_score(
                        [completion_correct(prefix, c, q.answer or "", cfg.match, cfg.marker) for c in done]
                    )
                )
            labels = [mc_label(v, cfg.threshold) for v in mcs]
            record = prm_conversation(
                q.question, steps, labels, image=q.image, system_prompt=cfg.system_prompt
            )
            record["provenance"] = {
                "policy": cfg.model,
                "engine": cfg.engine,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "n": cfg.n,
                "m": cfg.m,
                "max_new_tokens": cfg.max_new_tokens,
                "seed": cfg.seed,
                "match": cfg.match,
                "threshold": cfg.threshold,
                "source": q.source,
                "key": q.key,
                "sample": j,
                "answer": q.answer,
                "solution_correct": completion_correct("", s, q.answer or "", cfg.match, cfg.marker),
                "mc": mcs,
            }
            records.append((q, record))
    return write_prm_data(cfg, specs, questions, records, dropped, no_steps)


def write_prm_data(
    cfg: PRMDataConfig,
    specs: list[DatasetSpec],
    questions: list[Question],
    records: list[tuple[Question, dict[str, Any]]],
    dropped: Counter,
    no_steps: int,
) -> dict[str, Any]:
    """``meta.json``, one ``{dataset}_prm.jsonl`` per input dataset with records, ``summary.json``."""
    out = Path(cfg.out)
    meta: dict[str, Any] = {}
    per_dataset: dict[str, dict[str, int]] = {}
    for ds, spec in enumerate(specs):
        mine = [r for q, r in records if q.dataset == ds]
        verdicts = Counter(t["value"] for r in mine for t in r["conversations"] if t["from"] == "gpt")
        per_dataset[spec.name] = {
            "questions": sum(q.dataset == ds for q in questions),
            "solutions": len(mine),
            "steps": sum(verdicts.values()),
            "positive_steps": verdicts["+"],
        }
        if not mine:
            continue
        name = f"{spec.name}_prm"
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mine)
        (out / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        entry: dict[str, Any] = {
            "root": str(spec.root.resolve()),
            "annotation": f"{name}.jsonl",
            "data_augment": spec.data_augment,
            "repeat_time": 1,
            "length": len(mine),
            "supervision": "assistant_content",
        }
        for key in ("max_dynamic_patch", "min_dynamic_patch"):
            if getattr(spec, key) is not None:
                entry[key] = getattr(spec, key)
        meta[name] = entry
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    summary = {
        "model": cfg.model,
        "meta": str(cfg.meta),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("rank", "world_size", "out")},
        "questions": len(questions),
        "solutions": len(records),
        "solutions_without_steps": no_steps,
        "steps": sum(d["steps"] for d in per_dataset.values()),
        "positive_steps": sum(d["positive_steps"] for d in per_dataset.values()),
        "dropped": dict(sorted(dropped.items())),
        "datasets": per_dataset,
        "out": str(out / "meta.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune prm-data", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the policy: an HF model directory (an export)")
    parser.add_argument(
        "--meta", required=True, help="InternVL meta JSON of questions with reference answers"
    )
    parser.add_argument("--out", required=True, help="output folder (a rerun resumes in it)")
    parser.add_argument(
        "--n", "--num-solutions", dest="n", type=int, default=4, help="solutions per question"
    )
    parser.add_argument(
        "--m", "--num-completions", dest="m", type=int, default=16, help="completions per step"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--match", default="marker", choices=MATCH_MODES, help="answer comparison")
    parser.add_argument("--marker", default=DEFAULT_MARKER, help="what precedes the answer (--match marker)")
    parser.add_argument("--threshold", type=float, default=0.0, help="a step is + when its mc score > this")
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument(
        "--system-prompt", default=DEFAULT_PRM_SYSTEM_PROMPT, help="the PRM chat's system turn"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    rank, world = command_ranks(parser, args)
    model = str(Path(args.model).resolve())
    fields = {k: v for k, v in vars(args).items() if k not in ("rank", "world_size")}
    cfg = PRMDataConfig(**{**fields, "model": model, "rank": rank, "world_size": world})
    try:
        load_meta(cfg.meta)
    except (MetaError, OSError) as e:
        print(f"vlmtune prm-data: {e}", file=sys.stderr)
        return 2
    engine = build_engine(args.engine, model, args.batch_size)
    summary = prm_data(cfg, engine, identity=f"{args.engine}:{model}")
    if summary is None:
        return 0
    print(
        f"{summary['steps']} steps ({summary['positive_steps']} +) in {summary['solutions']} solutions of "
        f"{summary['questions']} questions -> {summary['out']}"
    )
    return 0 if summary["solutions"] else 1


if __name__ == "__main__":
    sys.exit(main())
