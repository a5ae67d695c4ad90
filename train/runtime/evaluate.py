"""Held-out exact-match accuracy by greedy generation, with the same images blanked as a control.

Blank images (every tile set to the normalised mean colour) must bring a model that really reads
the pixels down to the majority-answer baseline; the gap between the two is the evidence that the
vision path is wired end to end. `vlmtune eval` (train/commands/eval.py) runs it on an exported model.
A meta file with several datasets also gets the scores of each (``per_dataset``): one eval set can
measure a new domain and the forgetting of an old one in the same pass (the LoRA demo does).
Text records (``{"text": ...}``, pre-training corpora) in the meta file are scored by held-out
perplexity instead (train/runtime/perplexity.py: ``text_perplexity``, ``text_nll``).

Two repetition figures sit beside the accuracy, since models that loop after preference training are a
known complaint (InternVL issue #1241): ``truncated_rate``, the share of answers that ran into
``max_new_tokens`` instead of ending with the stop token, and ``repeated_ngram_rate``, the share of
answers in which some n-gram of tokens (``REPEAT_NGRAM``) occurs at least twice (`has_repeated_ngram`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlmtune.data.answers import DEFAULT_MARKER, answers_match, normalise_answer
from vlmtune.data.conversation import IGNORE_INDEX


def split_prompt_answer(sample: dict, tokenizer: Any) -> tuple[torch.Tensor, str, str]:
    """(prompt ids up to the last assistant answer, the answer text, the question text without image tokens)."""
    labels = sample["labels"]
    supervised = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    last = supervised[-1].item()
    start = last
    while start - 1 >= 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    answer = tokenizer.decode(labels[start : last + 1], skip_special_tokens=True).strip()
    prompt = sample["input_ids"][:start]
    ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    question = tokenizer.decode(prompt[prompt != ctx], skip_special_tokens=True)
    return prompt, answer, question


#: The n of the repeated n-gram rate: 4 tokens is short enough to catch a one-word answer said over
#: and over ("red red red red red") within the demo's 8-token limit, long enough that a real answer
#: rarely repeats one by chance (repeated bigrams are common in ordinary prose).
REPEAT_NGRAM = 4


def answer_tokens(row: list[int], stop_id: int) -> tuple[list[int], bool]:
    """(the generated tokens before the stop token, whether the answer ended by itself): a row without
    the stop token ran into ``max_new_tokens`` (what comes after a stop is padding)."""
    if stop_id in row:
        return row[: row.index(stop_id)], True
    return row, False


def has_repeated_ngram(tokens: list[int], n: int = REPEAT_NGRAM) -> bool:
    """Whether some ``n`` consecutive tokens occur at least twice in ``tokens`` (overlaps count:
    ``a a a a a`` holds ``a a a a`` twice).

    A yes/no per answer, so that the rate over answers reads as "the share of answers that loop" and
    does not grow with answer length the way a mean fraction of repeated n-grams per answer would.
    """
    seen: set[tuple[int, ...]] = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def repetition_scores(records: list[dict], n: int = REPEAT_NGRAM) -> dict[str, float]:
    """``truncated_rate`` and ``repeated_ngram_rate`` over records carrying ``finished`` and
    ``prediction_tokens`` (`evaluate_accuracy`'s); the n-gram's n under ``repeated_ngram_n``."""
    total = max(1, len(records))
    return {
        "truncated_rate": sum(not r["finished"] for r in records) / total,
        "repeated_ngram_rate": sum(has_repeated_ngram(r["prediction_tokens"], n) for r in records) / total,
        "repeated_ngram_n": n,
    }


def generate_answers(
    model: Any,
    tokenizer: Any,
    samples: list[dict],
    prompts: list[torch.Tensor],
    *,
    blank: bool,
    max_new_tokens: int,
    synced: bool,
) -> list[str]:
    """Greedy answers for one batch as text (`generate_tokens`, decoded)."""
    rows = generate_tokens(
        model, tokenizer, samples, prompts, blank=blank, max_new_tokens=max_new_tokens, synced=synced
    )
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


@torch.no_grad()
def generate_tokens(
    model: Any,
    tokenizer: Any,
    samples: list[dict],
    prompts: list[torch.Tensor],
    *,
    blank: bool,
    max_new_tokens: int,
    synced: bool,
) -> list[list[int]]:
    """The generated token ids of one batch, greedy (left-padded prompts; tiles concatenated in sample
    order), with the model's V2PE positions (train/model/v2pe.py) as in training."""
    from vlmtune.train.model.unwrap import model_device_dtype, unwrap
    from vlmtune.train.model.v2pe import prompt_position_ids

    inner = unwrap(model)
    device, dtype = model_device_dtype(model)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = p
        attention[i, width - len(p) :] = 1
    tiles = [s["pixel_values"] for s in samples if s["num_tiles"] > 0]
    kwargs: dict[str, Any] = {}
    if tiles:
        pixel_values = torch.cat(tiles)
        if blank:
            pixel_values = torch.zeros_like(pixel_values)
        kwargs["pixel_values"] = pixel_values.to(device, dtype)
    out = inner.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=prompt_position_ids(input_ids, attention, inner.config).to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        synced_gpus=synced,
        **kwargs,
    )
    return [row[width:].tolist() for row in out]


def evaluate_accuracy(
    model: Any,
    tokenizer: Any,
    data_cfg: Any,
    tokens_per_tile: int,
    max_samples: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    keep_records: bool = False,
    match: str = "normalised",
    marker: str = DEFAULT_MARKER,
) -> dict[str, Any]:
    """Exact-match accuracy (and the blank-image control) on ``data_cfg``'s held-out split, all ranks.

    ``keep_records``: every question's record (source file:line, answer, prediction) under
    ``records``, for comparing engines (`vlmtune eval --engine all`). ``match``/``marker``: how an answer
    is compared (data/answers.py; ``marker`` is what precedes the answer in mode ``marker``)."""
    from vlmtune.data.dataset import SampleProcessor, iter_samples
    from vlmtune.data.meta import build_index, load_meta
    from vlmtune.data.report import SkipReport

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    specs = load_meta(data_cfg.meta_path)
    index = build_index(specs, data_cfg.seed)
    if max_samples is not None:
        index = index[:max_samples]
    processor = SampleProcessor(data_cfg, tokenizer, tokens_per_tile)
    samples = list(iter_samples(processor, specs, index, 0, SkipReport(), training=False))
    texts = [s for s in samples if s.get("kind") == "text"]  # pre-training text: scored by perplexity
    samples = [s for s in samples if s.get("kind") != "text"]
    mine = samples[rank::world]
    n_batches = -(-len(samples) // (batch_size * world))  # same count on every rank (ZeRO-3 generate syncs)
    synced = world > 1
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # correct, correct_blank, total
    records: list[dict] = []
    for b in range(n_batches):
        batch = mine[b * batch_size : (b + 1) * batch_size]
        real = len(batch)
        if not batch:  # keep step with the other ranks' generate calls
            batch = samples[:1]
        parts = [split_prompt_answer(s, tokenizer) for s in batch]
        prompts = [p for p, _, _ in parts]
        rows = generate_tokens(
            model, tokenizer, batch, prompts, blank=False, max_new_tokens=max_new_tokens, synced=synced
        )
        tokens = [answer_tokens(row, stop_id) for row in rows]
        preds = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
        blank = generate_answers(
            model, tokenizer, batch, prompts, blank=True, max_new_tokens=max_new_tokens, synced=synced
        )
        for s, (_, answer, question), pred, pred_blank, (ids, finished) in list(
            zip(batch, parts, preds, blank, tokens)
        )[:real]:
            ok = answers_match(pred, answer, match, marker=marker)
            ok_blank = answers_match(pred_blank, answer, match, marker=marker)
            counts += torch.tensor([ok, ok_blank, 1.0], dtype=torch.float64)
            records.append(
                {
                    "dataset": s["dataset"],
                    "source": s["source"],
                    "question": question,
                    "answer": answer,
                    "prediction": pred,
                    "blank_prediction": pred_blank,
                    "finished": finished,
                    "prediction_tokens": ids,
                }
            )
    if was_training:
        model.train()
    if world > 1:
        dist.all_reduce(counts)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    total = max(1.0, counts[2].item())
    results: dict[str, Any] = {
        "accuracy": counts[0].item() / total,
        "blank_image_accuracy": counts[1].item() / total,
        "majority_baseline": majority_baseline(records),
        "num_samples": int(counts[2].item()),
        **repetition_scores(records),
    }
    if len(specs) > 1:
        results["per_dataset"] = per_dataset_scores(records, match, marker)
    if texts:
        from vlmtune.train.runtime.perplexity import text_perplexity

        results.update(text_perplexity(model, texts))
    return {**results, "examples": records[:10], **({"records": records} if keep_records else {})}


def per_dataset_scores(
    records: list[dict], match: str = "normalised", marker: str = DEFAULT_MARKER
) -> dict[str, dict[str, float]]:
    """Accuracy, blank-image accuracy (where the records have it), majority baseline and sample count
    of each dataset's records."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["dataset"]].append(r)

    def hits(rs: list[dict], key: str) -> int:
        return sum(answers_match(r[key], r["answer"], match, marker=marker) for r in rs)

    out = {}
    for name, rs in sorted(groups.items()):
        scores = {"accuracy": hits(rs, "prediction") / len(rs)}
        if all("blank_prediction" in r for r in rs):
            scores["blank_image_accuracy"] = hits(rs, "blank_prediction") / len(rs)
        out[name] = {**scores, "majority_baseline": majority_baseline(rs), "num_samples": len(rs)}
    return out


def majority_baseline(records: list[dict]) -> float:
    """What a model that ignores the image could score: for each sample, the most frequent answer
    among the *other* samples with the same question text (leave-one-out, so it is not flattered
    by small groups); a sample whose question appears nowhere else counts as a miss."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_question[r["question"]][normalise_answer(r["answer"])] += 1
    hits = 0
    for r in records:
        others = by_question[r["question"]].copy()
        others[normalise_answer(r["answer"])] -= 1
        best = max(others.values(), default=0)
        if best > 0 and others[normalise_answer(r["answer"])] == best:
            hits += 1
    return hits / max(1, len(records))


def trained_data_config(model_dir: str | Path, image_size: int, meta: str) -> Any:
    """A DataConfig for ``meta`` with the settings the model was trained with (its vlmtune.json:
    system prompt, tiling), so that it is prompted the way it learned; ``image_size`` is the model's tile."""
    from vlmtune.data.dataset import DataConfig
    from vlmtune.train.runtime.export import trained_settings

    return DataConfig(**{"image_size": image_size, **trained_settings(model_dir), "meta_path": meta})
