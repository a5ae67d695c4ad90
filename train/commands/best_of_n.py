"""`vlmtune best-of-n --model POLICY --prm PRM --meta META --out DIR`: test-time scaling with a PRM.

Per question ``n`` (16) samples from the policy (the sampler: seeded, resumable, multi-rank) and one
greedy answer. For each N in ``--ns`` (1, 2, 4, 8, 16: the first N of the same samples, so the curves
are nested, as the paper's are) it reports, per dataset and overall:

- ``best_of_n[agg]``: the accuracy of the sample the PRM scores highest, a response's score being the
  ``mean`` / ``min`` / ``last`` of its step scores (VisualPRM, arXiv 2503.10291, section 4; ties: the
  earliest sample). A sample without steps scores below every other.
- ``majority``: the most frequent final answer (data/answers.py's extraction; a truncated sample does
  not vote; ties: the answer seen first), right when that answer is.
- ``pass``: pass@N, whether any of the N samples is right (the ceiling of any selection).
- ``greedy``: beside them, one number per dataset.
- ``best_of_n_blank[agg]`` (``--blank-control``): the same PRM choosing among the same samples with every
  image blanked; near chance when its judgement comes from the pixels, near ``best_of_n`` when it rates
  the text alone (the evaluation's blank-image control, for the critic).

A sample is right when it ended by itself and its answer matches (`answers_match`). Output:
``best_of_n.json``, ``best_of_n.png`` (accuracy vs N, all datasets), ``records.jsonl`` (each question's
samples' correctness and scores), the sampler's ``samples/`` and ``greedy/``, and ``scores.jsonl``
(the PRM's step scores, kept so a rerun only scores what is new; ``scores_blank.jsonl`` for the control).
The PRM scores on rank 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vlmtune.data.answers import DEFAULT_MARKER, MATCH_MODES, answers_match, extract_answer
from vlmtune.data.meta import DatasetSpec, MetaError, load_meta
from vlmtune.train.commands.make_pairs import Question, read_questions
from vlmtune.train.objectives.prm import AGGREGATIONS, aggregate, best_of_n, majority_vote, pass_at
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

#: question text, image files, responses -> each response's step scores ([] for a response without steps).
Scorer = Callable[[str, list[str], list[str]], list[list[float]]]


@dataclass(kw_only=True)
class BestOfNConfig(SamplingRun):
    """What `best-of-n` does; every field is a command-line flag of the same name."""

    model: str
    prm: str
    meta: str
    out: str
    #: Samples per question; every N in ``ns`` takes the first N of them.
    n: int = 16
    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    aggregations: list[str] = field(default_factory=lambda: ["mean", "min", "last"])
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 1024
    match: str = "marker"
    marker: str = DEFAULT_MARKER
    #: Also select with the PRM fed blank images (``best_of_n_blank``): does its judgement need the pixels?
    blank_control: bool = False

    def __post_init__(self) -> None:
        if not self.ns or any(k < 1 or k > self.n for k in self.ns):
            raise ValueError(f"--ns must be within 1..n={self.n}, got {self.ns}")
        bad = [a for a in self.aggregations if a not in AGGREGATIONS]
        if bad:
            raise ValueError(f"aggregation {bad[0]!r} is not one of {', '.join(AGGREGATIONS)}")


def is_right(sample: Sample, answer: str, match: str, marker: str) -> bool:
    """Right = ended by itself and gives the reference answer."""
    return sample.finish_reason == "stop" and answers_match(sample.text, answer, match, marker=marker)


def response_score(steps: list[float], how: str) -> float:
    """A response's score; one without steps scores below any other (-inf)."""
    return aggregate(steps, how) if steps else -math.inf


def picks(step_scores: list[list[float]], k: int, aggregations: list[str]) -> dict[str, int]:
    """Per aggregation, the index of the PRM's choice among the first ``k`` responses."""
    return {how: best_of_n([response_score(x, how) for x in step_scores[:k]]) for how in aggregations}


def question_outcomes(
    samples: list[Sample],
    step_scores: list[list[float]],
    greedy: Sample,
    answer: str,
    cfg: BestOfNConfig,
    blank_scores: list[list[float]] | None = None,
) -> dict[str, Any]:
    """One question's correctness under every selection and N (1.0 right, 0.0 wrong); with
    ``blank_scores`` (the PRM's on blank images) also the control's choice."""
    right = [is_right(s, answer, cfg.match, cfg.marker) for s in samples]
    votes = [
        extract_answer(s.text, cfg.match, marker=cfg.marker) if s.finish_reason == "stop" else None
        for s in samples
    ]
    by_n: dict[str, Any] = {}
    for k in cfg.ns:
        picked = picks(step_scores, k, cfg.aggregations)
        voted = majority_vote(votes[:k])
        by_n[str(k)] = {
            "best_of_n": {how: float(right[i]) for how, i in picked.items()},
            "picked": picked,
            "majority": float(voted is not None and right[voted]),
            "pass": float(pass_at(right, k)),
        }
        if blank_scores is not None:
            blank = picks(blank_scores, k, cfg.aggregations)
            by_n[str(k)]["best_of_n_blank"] = {how: float(right[i]) for how, i in blank.items()}
    return {"greedy": float(is_right(greedy, answer, cfg.match, cfg.marker)), "right": right, "n": by_n}


def mean_outcomes(outcomes: list[dict[str, Any]], cfg: BestOfNConfig) -> dict[str, Any]:
    """Accuracies: the mean of each figure over ``outcomes``."""
    count = len(outcomes)

    def mean(values: list[float]) -> float:
        return sum(values) / count if count else 0.0

    table: dict[str, Any] = {"questions": count, "greedy": mean([o["greedy"] for o in outcomes]), "n": {}}
    selections = ("best_of_n", "best_of_n_blank") if cfg.blank_control else ("best_of_n",)
    for k in map(str, cfg.ns):
        table["n"][k] = {
            **{
                sel: {h: mean([o["n"][k][sel][h] for o in outcomes]) for h in cfg.aggregations}
                for sel in selections
            },
            "majority": mean([o["n"][k]["majority"] for o in outcomes]),
            "pass": mean([o["n"][k]["pass"] for o in outcomes]),
        }
    return table


def _load_scores(path: Path, prm: str) -> dict[str, list[list[float]]]:
    """The step scores a previous run stored for this PRM (complete lines only)."""
    if not path.exists():
        return {}
    done, kept = {}, []
    for raw in path.read_text(encoding="utf-8").split("\n")[:-1]:
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if line.get("prm") == prm:
            done[line["key"]] = line["scores"]
            kept.append(raw + "\n")
    path.write_text("".join(kept), encoding="utf-8")
    return done


def score_samples(
    questions: list[Question], samples: dict[str, list[Sample]], scorer: Scorer, path: Path, prm: str
) -> dict[str, list[list[float]]]:
    """Every question's samples' step scores, from ``path`` where stored, else from ``scorer`` (appended)."""
    done = _load_scores(path, prm)
    with open(path, "a", encoding="utf-8") as f:
        for q in questions:
            if q.key in done:
                continue
            scores = scorer(q.question, list(q.item.images), [s.text for s in samples[q.key]])
            done[q.key] = scores
            f.write(json.dumps({"key": q.key, "prm": prm, "scores": scores}) + "\n")
            f.flush()
    return done


def run_best_of_n(
    cfg: BestOfNConfig,
    engine: Engine,
    scorer: Scorer,
    identity: str = "",
    blank_scorer: Scorer | None = None,
) -> dict[str, Any] | None:
    """Sample, score, select and (rank 0) write the report; returns it on rank 0, None elsewhere.
    ``blank_scorer``: the PRM on blank images, required with ``cfg.blank_control``."""
    if cfg.blank_control and blank_scorer is None:
        raise ValueError("blank_control needs the PRM's blank-image scorer")
    specs = load_meta(cfg.meta)
    questions, dropped = read_questions(specs, True, cfg.max_questions)
    out = Path(cfg.out)
    ranks = {"rank": cfg.rank, "world_size": cfg.world_size, "wait_timeout": cfg.wait_timeout}
    requests = [SampleRequest(q.key, q.item) for q in questions]
    settings = cfg.settings()
    samples = run_sampler(requests, settings, engine, out / "samples", identity=identity, **ranks)
    greedy_settings = replace(settings, n=1, temperature=0.0)
    greedy = run_sampler(requests, greedy_settings, engine, out / "greedy", identity=identity, **ranks)
    if cfg.rank != 0:
        return None
    scores = score_samples(questions, samples, scorer, out / "scores.jsonl", cfg.prm)
    blank = (
        score_samples(questions, samples, blank_scorer, out / "scores_blank.jsonl", cfg.prm)
        if cfg.blank_control and blank_scorer is not None
        else {}
    )
    outcomes = [
        question_outcomes(
            samples[q.key], scores[q.key], greedy[q.key][0], q.answer or "", cfg, blank.get(q.key)
        )
        for q in questions
    ]
    return write_report(cfg, specs, questions, outcomes, scores, dict(dropped))


def write_report(
    cfg: BestOfNConfig,
    specs: list[DatasetSpec],
    questions: list[Question],
    outcomes: list[dict[str, Any]],
    scores: dict[str, list[list[float]]],
    dropped: dict[str, int],
) -> dict[str, Any]:
    """``best_of_n.json``, ``records.jsonl`` and the plot."""
    out = Path(cfg.out)
    per_dataset = {
        spec.name: mean_outcomes([o for q, o in zip(questions, outcomes) if q.dataset == ds], cfg)
        for ds, spec in enumerate(specs)
    }
    report = {
        "policy": cfg.model,
        "prm": cfg.prm,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("rank", "world_size", "out")},
        "dropped": dropped,
        "overall": mean_outcomes(outcomes, cfg),
        "per_dataset": per_dataset,
    }
    (out / "best_of_n.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [
        json.dumps({"key": q.key, "source": q.source, "answer": q.answer, **o, "step_scores": scores[q.key]})
        for q, o in zip(questions, outcomes)
    ]
    (out / "records.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    report["plot"] = plot_report(report, out / "best_of_n.png")
    return report


def plot_report(report: dict[str, Any], path: Path) -> str | None:
    """Accuracy vs N (log-2 axis): Best-of-N per aggregation, majority vote, pass@N, greedy as a line."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = (
        {"overall": report["overall"], **report["per_dataset"]}
        if len(report["per_dataset"]) > 1
        else {"overall": report["overall"]}
    )
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        ns = [int(k) for k in table["n"]]
        for how in report["settings"]["aggregations"]:
            ax.plot(
                ns, [table["n"][str(k)]["best_of_n"][how] for k in ns], marker="o", label=f"best-of-N ({how})"
            )
        if "best_of_n_blank" in table["n"][str(ns[0])]:
            how = report["settings"]["aggregations"][0]
            ax.plot(
                ns,
                [table["n"][str(k)]["best_of_n_blank"][how] for k in ns],
                marker="x",
                linestyle="--",
                label=f"best-of-N ({how}), PRM on blank images",
            )
        ax.plot(ns, [table["n"][str(k)]["majority"] for k in ns], marker="s", label="majority vote")
        ax.plot(ns, [table["n"][str(k)]["pass"] for k in ns], linestyle=":", marker="^", label="pass@N")
        ax.axhline(table["greedy"], color="grey", linestyle="--", label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(k) for k in ns])
        ax.set_xlabel("N (samples)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} (n={table['questions']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune best-of-n", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the policy: an HF model directory (an export)")
    parser.add_argument(
        "--prm", required=True, help="the PRM: a directory `vlmtune prm` exported (or adapter)"
    )
    parser.add_argument(
        "--meta", required=True, help="InternVL meta JSON of questions with reference answers"
    )
    parser.add_argument("--out", required=True, help="output folder (a rerun resumes in it)")
    parser.add_argument("--n", "--num-samples", dest="n", type=int, default=16, help="samples per question")
    parser.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--aggregations", type=lambda s: s.split(","), default=["mean", "min", "last"])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--match", default="marker", choices=MATCH_MODES, help="answer comparison")
    parser.add_argument("--marker", default=DEFAULT_MARKER, help="what precedes the answer (--match marker)")
    parser.add_argument("--prm-system-prompt", default=None, help="the PRM chat's system turn (prm-data's)")
    parser.add_argument("--prm-batch-size", type=int, default=8, help="responses per PRM forward pass")
    parser.add_argument("--prm-max-steps", type=int, default=None, help="steps per response (prm-data's)")
    parser.add_argument(
        "--blank-control", action="store_true", help="also select with the PRM fed blank images (a control)"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    rank, world = command_ranks(parser, args)
    model, prm = str(Path(args.model).resolve()), str(Path(args.prm).resolve())
    skip = ("rank", "world_size", "prm_system_prompt", "prm_batch_size", "prm_max_steps")
    fields = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        cfg = BestOfNConfig(**{**fields, "model": model, "prm": prm, "rank": rank, "world_size": world})
        load_meta(cfg.meta)
    except (MetaError, OSError, ValueError) as e:
        print(f"vlmtune best-of-n: {e}", file=sys.stderr)
        return 2
    from vlmtune.train.runtime.prm_score import PRMScorer

    engine = build_engine(args.engine, model, args.batch_size)
    lazy: list[PRMScorer] = []

    def scorer(
        question: str, images: list[str], responses: list[str], blank: bool = False
    ) -> list[list[float]]:
        if not lazy:  # loaded after sampling: the policy and the PRM need not both be resident at once
            lazy.append(PRMScorer(prm, args.prm_system_prompt, args.prm_batch_size, args.prm_max_steps))
        return lazy[0](question, images, responses, blank=blank)

    def blank_scorer(question: str, images: list[str], responses: list[str]) -> list[list[float]]:
        return scorer(question, images, responses, blank=True)

    report = run_best_of_n(cfg, engine, scorer, identity=f"{args.engine}:{model}", blank_scorer=blank_scorer)
    if report is None:
        return 0
    overall, top = report["overall"], str(max(cfg.ns))
    best = overall["n"][top]
    chosen = ", ".join(f"{h} {v:.3f}" for h, v in best["best_of_n"].items())
    control = (
        " | blank images: " + ", ".join(f"{h} {v:.3f}" for h, v in best["best_of_n_blank"].items())
        if cfg.blank_control
        else ""
    )
    print(
        f"greedy {overall['greedy']:.3f} | best-of-{top} {chosen}{control} | majority {best['majority']:.3f} | "
        f"pass@{top} {best['pass']:.3f} (n={overall['questions']}) -> {Path(cfg.out) / 'best_of_n.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
