"""`vlmtune make-pairs --model DIR --meta META --out DIR --pipeline correctness|dropout_ntp`: MPO's data engine.

The two ways MPO's paper builds preference pairs from the model's own samples (arXiv 2411.10442,
section 3.1, "Data Engine"):

- ``correctness``, for questions with a checkable answer: N samples per question; chosen = a sample
  whose final answer matches the reference (`data.answers`), rejected = one whose answer does not.
  Questions where all N are right or all wrong carry no preference and are dropped, counted.
- ``dropout_ntp``, for open-ended questions: the model's answer to the full input is chosen; its
  first half is kept and the model continues it without the image; prefix + continuation is rejected.

Output in ``--out``: ``meta.json`` + one MMPR jsonl per input dataset (what `vlmtune mpo` and
`vlmtune check-data` read; each pair with its provenance), ``summary.json`` (questions, pairs, drops
by reason) and ``samples/`` (the sampler's shards and merged samples: a rerun resumes there).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vlmtune.data.answers import DEFAULT_MARKER, MATCH_MODES, answers_match
from vlmtune.data.meta import DatasetSpec, MetaError, load_meta, record_source
from vlmtune.data.report import SkipSample
from vlmtune.train.runtime.eval_engines import EvalItem, record_to_item
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

PIPELINES = ("correctness", "dropout_ntp")
#: Where DropoutNTP cuts the chosen answer, as a share of its tokens (the paper: half).
NTP_KEEP = 0.5


@dataclass(kw_only=True)
class PairsConfig(SamplingRun):
    """What `make-pairs` does; every field is a command-line flag of the same name."""

    model: str
    meta: str
    out: str
    pipeline: str = "correctness"
    #: Samples per question (correctness: the pool chosen and rejected come from; dropout_ntp: candidate
    #: chosen answers, the first ``max_pairs_per_question`` complete ones are used).
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    #: How a sample's answer is compared with the reference (data/answers.py).
    match: str = "normalised"
    #: What precedes the final answer for ``match="marker"``.
    marker: str = DEFAULT_MARKER
    #: At most this many pairs from one question (no sample on either side twice).
    max_pairs_per_question: int = 3
    #: "jsonl" (MMPR annotation files) or "hf" (a Hugging Face dataset per input dataset, save_to_disk).
    format: str = "jsonl"


@dataclass
class Question:
    """A record that can be asked: its chat for the engines, and what its pair record keeps of it."""

    key: str  # "dataset:record number": stable when the data moves; seeds the question's samples
    dataset: int  # index in the meta file's datasets
    source: str  # file:line
    item: EvalItem
    question: str  # the human turn as written, placeholders kept
    image: Any  # the record's image field (relative to the dataset's root), None for text
    answer: str | None


@dataclass
class Pair:
    """A preference pair of a question, with where it came from."""

    question: Question
    chosen: str
    rejected: str
    provenance: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading the questions


class NotAQuestion(Exception):
    """A record the pipelines cannot ask (its reason is counted in the summary)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def question_of(record: dict[str, Any], spec: DatasetSpec, ds: int, index: int, line: str) -> Question:
    """A `Question` from an SFT record (its last answer is the reference) or a prompt record
    (``question`` [+ ``answer``], MMPR's input); NotAQuestion with the reason for what cannot be one."""
    if "video" in record:
        raise NotAQuestion("video", "the sampling engines take images only")
    if "conversations" not in record:
        if not isinstance(record.get("question"), str):
            raise NotAQuestion("no_question", "neither conversations nor question")
        answer = record.get("answer") if isinstance(record.get("answer"), str) else ""
        turns = [{"from": "human", "value": record["question"]}, {"from": "gpt", "value": answer}]
        record = {**record, "conversations": turns}
    turns = record["conversations"]
    if not isinstance(turns, list) or not any(t.get("from") == "gpt" for t in turns):
        raise NotAQuestion("no_question", "no gpt turn to answer in place of")
    last = max(i for i, t in enumerate(turns) if t.get("from") == "gpt")
    if [t.get("from") for t in turns[:last]] != ["human"]:
        raise NotAQuestion(
            "not_single_turn", "an MMPR pair holds one human turn (no system turn, no history)"
        )
    item = record_to_item(record, spec.root, line, spec.name, index)
    assert item is not None  # video and missing conversations are excluded above
    missing = [p for p in item.images if not Path(p).is_file()]
    if missing:
        raise NotAQuestion("missing_image", missing[0])
    answer = record.get("answer") if isinstance(record.get("answer"), str) else item.answer
    key = f"{spec.name}:{index + 1}"
    return Question(key, ds, line, item, turns[0]["value"], record.get("image"), answer.strip() or None)


def read_questions(
    specs: list[DatasetSpec], need_answer: bool, limit: int | None
) -> tuple[list[Question], Counter]:
    """Every record of every dataset, in meta and file order (``repeat_time`` is a training matter and
    ignored), as questions; the others counted by reason."""
    questions: list[Question] = []
    dropped: Counter = Counter()
    read = 0
    for ds, spec in enumerate(specs):
        records = record_source(spec)
        for k in range(records.num_records):
            if limit is not None and read >= limit:
                return questions, dropped
            read += 1
            try:
                q = question_of(records.read(k), spec, ds, k, records.source(k))
                if need_answer and q.answer is None:
                    raise NotAQuestion("no_answer", "correctness needs a reference answer")
            except (SkipSample, NotAQuestion) as e:  # SkipSample: a line that is no JSON object
                dropped[e.reason] += 1
                continue
            questions.append(q)
    return questions, dropped


# ---------------------------------------------------------------- the two pipelines (pure)


def _distinct(samples: list[Sample], indices: list[int]) -> list[int]:
    """``indices`` without repeated texts (compared stripped), first occurrence kept."""
    seen: set[str] = set()
    out = []
    for i in indices:
        text = samples[i].text.strip()
        if text and text not in seen:
            seen.add(text)
            out.append(i)
    return out


def correctness_pairs(
    samples: list[Sample], answer: str, k: int, rng: random.Random, match: str, marker: str = DEFAULT_MARKER
) -> tuple[list[tuple[int, int]], int, str | None]:
    """(chosen, rejected) sample indices, the number of right samples, and why none when there are none.

    Right = the answer matches and the sample ended by itself (a right but truncated sample is on
    neither side); wrong = the answer does not match (a truncated one included: it gave no answer).
    Repeated texts count once. Both lists are shuffled with ``rng`` and zipped, at most ``k`` pairs:
    each sample is used at most once, so no chosen or rejected text outweighs the others, and which
    ones are used does not depend on the order the engine returned them in beyond the seed.
    """
    ok = [answers_match(s.text, answer, match, marker=marker) for s in samples]
    right = [i for i, s in enumerate(samples) if ok[i] and s.finish_reason == "stop"]
    wrong = [i for i in range(len(samples)) if not ok[i]]
    num_right = len(right)
    right, wrong = _distinct(samples, right), _distinct(samples, wrong)
    if not right and not wrong:
        return [], num_right, "no_usable_sample"
    if not right:
        return [], num_right, "all_wrong"
    if not wrong:
        return [], num_right, "all_right"
    rng.shuffle(right)
    rng.shuffle(wrong)
    return list(zip(right, wrong))[:k], num_right, None


def ntp_prefix(text: str, tokenizer: Any, keep: float = NTP_KEEP) -> tuple[str, int, int] | None:
    """(the first ``keep`` of ``text``'s tokens as text, tokens kept, tokens in all); None if that is empty.

    Cut at a token boundary of the model's own tokenizer, as a character offset into ``text``: the
    prefix is exactly the first tokens the model emitted, so the continuation starts where the model's
    own next token would (a cut inside a token would leave a word stub no tokenisation of the answer
    had). InternVL's pipeline halves the space-separated words instead; for Qwen-style BPE, whose
    tokens carry their leading space, a token cut also falls between words except inside long words
    and numbers.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    total = len(enc["input_ids"])
    cut = int(total * keep)
    if cut < 1:
        return None
    prefix = text[: enc["offset_mapping"][cut][0]] if cut < total else text
    return (prefix, cut, total) if prefix.strip() else None


def ntp_candidates(samples: list[Sample], k: int) -> list[int]:
    """The chosen answers DropoutNTP uses: the first ``k`` distinct samples that ended by themselves
    (samples are already random draws, so the first ones are as good as any)."""
    return _distinct(samples, [i for i, s in enumerate(samples) if s.finish_reason == "stop"])[:k]


# ---------------------------------------------------------------- the command's work


def make_pairs(
    cfg: PairsConfig, engine: Engine, tokenizer: Any = None, identity: str = ""
) -> dict[str, Any] | None:
    """Sample, build pairs and (rank 0) write them; returns the summary on rank 0, None elsewhere.

    ``engine`` is any `sampler.Engine` (tests pass stubs); ``tokenizer`` (the model's) cuts DropoutNTP's
    answers in half.
    """
    if cfg.pipeline not in PIPELINES:
        raise ValueError(f"--pipeline must be one of {', '.join(PIPELINES)}, got {cfg.pipeline!r}")
    out = Path(cfg.out)
    specs = load_meta(cfg.meta)
    questions, dropped = read_questions(specs, cfg.pipeline == "correctness", cfg.max_questions)
    settings = cfg.settings()
    ranks = {"rank": cfg.rank, "world_size": cfg.world_size, "wait_timeout": cfg.wait_timeout}
    requests = [SampleRequest(q.key, q.item) for q in questions]
    samples = run_sampler(requests, settings, engine, out / "samples", identity=identity, **ranks)
    pairs: list[Pair] = []
    dropped_pairs: Counter = Counter()
    base = {
        "model": cfg.model,
        "engine": cfg.engine,
        "pipeline": cfg.pipeline,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "n": cfg.n,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
    }
    if cfg.pipeline == "correctness":
        for q in questions:
            got = samples[q.key]
            rng = random.Random(f"{cfg.seed}\0{q.key}\0pairs")
            chosen_rejected, num_right, why = correctness_pairs(
                got, q.answer or "", cfg.max_pairs_per_question, rng, cfg.match, cfg.marker
            )
            if why:
                dropped[why] += 1
            for i, j in chosen_rejected:
                prov = {**base, "source": q.source, "key": q.key, "match": cfg.match, "num_right": num_right}
                if cfg.match == "marker":
                    prov["marker"] = cfg.marker
                prov.update(chosen_sample=i, rejected_sample=j)
                pairs.append(Pair(q, got[i].text, got[j].text, prov))
    else:
        if tokenizer is None:
            raise ValueError("dropout_ntp needs the model's tokenizer to cut answers at half their tokens")
        cuts: list[tuple[Question, int, tuple[str, int, int]]] = []
        for q in questions:
            got = samples[q.key]
            chosen = ntp_candidates(got, cfg.max_pairs_per_question)
            if not chosen:
                dropped["no_complete_answer"] += 1
            for i in chosen:
                cut = ntp_prefix(got[i].text, tokenizer)
                if cut is None:
                    dropped_pairs["too_short_to_cut"] += 1
                else:
                    cuts.append((q, i, cut))
        continuations = [
            SampleRequest(f"{q.key}#ntp{i}", q.item, prefix=cut[0], drop_images=True) for q, i, cut in cuts
        ]
        cont = run_sampler(
            continuations, replace(settings, n=1), engine, out / "samples_ntp", identity=identity, **ranks
        )
        for (q, i, (prefix, kept, total)), request in zip(cuts, continuations):
            follow = cont[request.key][0]
            chosen, rejected = samples[q.key][i].text, prefix + follow.text
            if rejected.strip() == chosen.strip():
                dropped_pairs["continuation_equals_answer"] += 1
                continue
            prov = {**base, "source": q.source, "key": q.key, "chosen_sample": i}
            prov.update(prefix_tokens=kept, chosen_tokens=total, continuation_finish=follow.finish_reason)
            pairs.append(Pair(q, chosen, rejected, prov))
    if cfg.rank != 0:
        return None
    return write_pairs(cfg, specs, questions, samples, pairs, dropped, dropped_pairs)


def write_pairs(
    cfg: PairsConfig,
    specs: list[DatasetSpec],
    questions: list[Question],
    samples: dict[str, list[Sample]],
    pairs: list[Pair],
    dropped: Counter,
    dropped_pairs: Counter,
) -> dict[str, Any]:
    """``meta.json`` (one MMPR dataset per input dataset with pairs, its images under the input's root),
    the jsonl files and ``summary.json``."""
    out = Path(cfg.out)
    meta: dict[str, Any] = {}
    per_dataset: dict[str, dict[str, int]] = {}
    for ds, spec in enumerate(specs):
        mine = [p for p in pairs if p.question.dataset == ds]
        per_dataset[spec.name] = {
            "questions": sum(q.dataset == ds for q in questions),
            "pairs": len(mine),
            "questions_with_pairs": len({p.question.key for p in mine}),
        }
        if not mine:
            continue
        name = f"{spec.name}_{cfg.pipeline}"
        lines = []
        for p in mine:
            record: dict[str, Any] = {} if p.question.image is None else {"image": p.question.image}
            record.update(question=p.question.question, chosen=p.chosen, rejected=p.rejected)
            if p.question.answer is not None:
                record["answer"] = p.question.answer
            record["provenance"] = p.provenance
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        entry: dict[str, Any] = {"root": str(spec.root.resolve())}
        if cfg.format == "hf":  # the same records as a dataset, read back through meta's hf_dataset entry
            import datasets

            datasets.Dataset.from_list([json.loads(line) for line in lines]).save_to_disk(str(out / name))
            entry["hf_dataset"] = name
        else:
            (out / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
            entry["annotation"] = f"{name}.jsonl"
        entry |= {
            "data_augment": spec.data_augment,
            "repeat_time": 1,
            "length": len(mine),
        }
        for key in ("max_dynamic_patch", "min_dynamic_patch"):
            if getattr(spec, key) is not None:
                entry[key] = getattr(spec, key)
        meta[name] = entry
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    all_samples = [s for q in questions for s in samples[q.key]]
    summary = {
        "pipeline": cfg.pipeline,
        "model": cfg.model,
        "meta": str(cfg.meta),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("rank", "world_size", "out")},
        "questions": len(questions),
        "questions_with_pairs": len({p.question.key for p in pairs}),
        "pairs": len(pairs),
        "dropped": dict(sorted(dropped.items())),
        "dropped_pairs": dict(sorted(dropped_pairs.items())),
        "samples": {
            "total": len(all_samples),
            "truncated": sum(s.finish_reason == "length" for s in all_samples),
        },
        "datasets": per_dataset,
        "out": str(out / "meta.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune make-pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the policy: an HF model directory (an export)")
    parser.add_argument("--meta", required=True, help="InternVL meta JSON of the questions")
    parser.add_argument("--out", required=True, help="output folder (a rerun resumes in it)")
    parser.add_argument("--pipeline", required=True, choices=PIPELINES)
    parser.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=int,
        default=8,
        help="samples per question (--num-samples under torchrun, whose parser takes --n for its own)",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--match", default="normalised", choices=MATCH_MODES, help="answer comparison")
    parser.add_argument("--marker", default=DEFAULT_MARKER, help="what precedes the answer (--match marker)")
    parser.add_argument("--max-pairs-per-question", type=int, default=3)
    add_run_arguments(parser)
    parser.add_argument(
        "--format", default="jsonl", choices=("jsonl", "hf"), help="jsonl files, or Hugging Face datasets"
    )
    args = parser.parse_args(argv)
    rank, world = command_ranks(parser, args)
    model = str(Path(args.model).resolve())
    cfg = PairsConfig(
        model=model,
        meta=args.meta,
        out=args.out,
        pipeline=args.pipeline,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        match=args.match,
        marker=args.marker,
        max_pairs_per_question=args.max_pairs_per_question,
        seed=args.seed,
        engine=args.engine,
        batch_size=args.batch_size,
        max_questions=args.max_questions,
        rank=rank,
        world_size=world,
        wait_timeout=args.wait_timeout,
        format=args.format,
    )
    try:
        load_meta(cfg.meta)
    except (MetaError, OSError) as e:
        print(f"vlmtune make-pairs: {e}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    engine = build_engine(args.engine, model, args.batch_size)
    tokenizer = AutoTokenizer.from_pretrained(model) if args.pipeline == "dropout_ntp" else None
    summary = make_pairs(cfg, engine, tokenizer, identity=f"{args.engine}:{model}")
    if summary is None:
        return 0
    print(
        f"{summary['pairs']} pairs from {summary['questions_with_pairs']} of {summary['questions']} questions "
        f"({args.pipeline}); dropped {summary['dropped'] or 'none'} -> {summary['out']}"
    )
    return 0 if summary["pairs"] else 1


if __name__ == "__main__":
    sys.exit(main())
