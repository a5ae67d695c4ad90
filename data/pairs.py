"""Preference pairs (MMPR format) -> one shared prompt and two responses, for MPO/DPO.

A jsonl line of MMPR (InternVL's MPO data, ``internvl_chat/internvl/train/internvl_chat_mpo.py``)::

    {"image": "a.jpg" | ["a.jpg", "b.jpg"] | absent, "video": "v.mp4" | absent,
     "question": "<image>\\nWhat is ...?", "chosen": "...", "rejected": "..."}

listed in the same meta JSON as SFT data (`data.meta.load_meta`). InternVL builds each side as
the two-turn conversation ``[human: question, gpt: response]`` with the SFT template
(``preprocess_internvl2_5``) and tokenises chosen and rejected separately; here both sides go
through the very `tokenize_conversation` SFT uses and are split at the first supervised token,
so ``prompt_ids`` are, token for token, the SFT prompt of the same question and image. Placeholders
are inserted as SFT does (``<image>\\n`` in front when missing, ``Image-1: <image>\\n...`` for
several images; InternVL's MPO code only inserts the single-image one). A pure-text pair has no
tiles (InternVL feeds a blank image with ``image_flags`` 0 instead).

The tree layout's pieces (`tree_position_ids`, `tree_attention_mask`, `tree_parent_index`) are pure
functions of the three lengths: one sequence ``prompt + chosen + rejected`` where the rejected branch
restarts its positions after the prompt and never attends to the chosen branch, so the prompt and its
image tiles are encoded once. data/collate.py `collate_pairs` builds batches from them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from vlmtune.data.conversation import IGNORE_INDEX, tokenize_conversation, validate_media
from vlmtune.data.dataset import DataConfig, load_media
from vlmtune.data.meta import DatasetSpec, record_source
from vlmtune.data.report import SkipSample

PAIR_FIELDS = ("question", "chosen", "rejected")


@dataclass(frozen=True)
class PairRecord:
    """A validated MMPR record; media paths are relative to the dataset's ``root``."""

    question: str
    chosen: str
    rejected: str
    images: list[str]
    video: str | None


def is_pair_record(record: dict[str, Any]) -> bool:
    """Whether a parsed jsonl record is a preference pair (MMPR) rather than an SFT conversation."""
    return "conversations" not in record and any(key in record for key in PAIR_FIELDS)


def validate_pair(record: dict[str, Any]) -> PairRecord:
    """Check an MMPR record's fields; raises SkipSample naming the field at fault.

    Empty responses and ``chosen == rejected`` (compared without surrounding whitespace) are
    skipped with their own reasons: such a pair carries no preference, and a DPO loss on it is
    a constant that only dilutes the batch.
    """
    for key in PAIR_FIELDS:
        if record.get(key) is None:
            raise SkipSample("missing_field", key)
        if not isinstance(record[key], str):
            raise SkipSample(
                "bad_conversation", f"{key}: expected a string, got {type(record[key]).__name__}"
            )
    if not record["question"].strip():
        raise SkipSample("missing_field", "question: empty")
    for key in ("chosen", "rejected"):
        if not record[key].strip():
            raise SkipSample("empty_response", f"{key}: empty")
    if record["chosen"].strip() == record["rejected"].strip():
        raise SkipSample("identical_pair", "chosen and rejected are the same text")
    images, video = validate_media(record)
    return PairRecord(record["question"], record["chosen"], record["rejected"], images, video)


def _split_prompt(input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Length of the prompt: the index of the first supervised token."""
    supervised = (labels != IGNORE_INDEX).nonzero()
    return int(supervised[0]) if len(supervised) else len(input_ids)


def tokenize_pair(
    pair: PairRecord,
    tokenizer: Any,
    image_token_counts: list[int],
    *,
    system_prompt: str | None,
    max_length: int | None = None,
    frame_token_counts: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """``prompt_ids``, ``chosen_ids``/``chosen_labels``, ``rejected_ids``/``rejected_labels``.

    Each side is `tokenize_conversation` of ``[human: question, gpt: response]`` cut at its first
    supervised token: the prompt ends with ``<|im_start|>assistant\\n``; a response is its answer,
    ``<|im_end|>`` and ``\\n``, labelled like SFT (ids on the answer and ``<|im_end|>``, -100 on the
    ``\\n``). A pair whose prompt plus longer response exceeds ``max_length`` is dropped
    (SkipSample("too_long")), never cut, so image tokens always stay whole.
    """
    sides = {}
    for side in ("chosen", "rejected"):
        turns = [{"from": "human", "value": pair.question}, {"from": "gpt", "value": getattr(pair, side)}]
        ids, labels = tokenize_conversation(
            turns,
            tokenizer,
            image_token_counts,
            system_prompt=system_prompt,
            frame_token_counts=frame_token_counts,
        )
        sides[side] = (ids, labels, _split_prompt(ids, labels))
    chosen_ids, chosen_labels, p = sides["chosen"]
    rejected_ids, rejected_labels, p_rejected = sides["rejected"]
    if p != p_rejected or not torch.equal(chosen_ids[:p], rejected_ids[:p]):
        raise RuntimeError("chosen and rejected prompts differ: the chat template split is broken")
    longest = max(len(chosen_ids), len(rejected_ids))  # both include the prompt
    if max_length is not None and longest > max_length:
        raise SkipSample("too_long", f"prompt + longer response = {longest} tokens > max_length {max_length}")
    return {
        "prompt_ids": chosen_ids[:p],
        "chosen_ids": chosen_ids[p:],
        "chosen_labels": chosen_labels[p:],
        "rejected_ids": rejected_ids[p:],
        "rejected_labels": rejected_labels[p:],
    }


class PairProcessor:
    """Turns (dataset, record index) into a processed pair dict, or raises SkipSample.

    The counterpart of `data.dataset.SampleProcessor` (same media path, augmentation and RNG, so
    `data.dataset.iter_samples` drives it unchanged). The dict holds the five tensors of
    `tokenize_pair`, ``pixel_values`` (float[T, 3, S, S], shared by both responses),
    ``num_tiles``, ``num_images``, ``dataset`` and ``source`` (``"file:line"``).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, tokens_per_tile: int) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile

    def __call__(self, spec: DatasetSpec, line_no: int, rng: random.Random, training: bool) -> dict[str, Any]:
        records = record_source(spec)  # a jsonl file or a Hugging Face dataset's rows
        source = records.source(line_no)
        pair = validate_pair(records.read(line_no))
        media = load_media(self.cfg, spec, pair.images, pair.video, self.tokens_per_tile, rng, training)
        out: dict[str, Any] = tokenize_pair(
            pair,
            self.tokenizer,
            media.image_tokens,
            system_prompt=self.cfg.system_prompt,
            max_length=self.cfg.max_length,
            frame_token_counts=media.frame_tokens,
        )
        out.update(
            pixel_values=media.pixel_values,
            num_tiles=int(media.pixel_values.shape[0]),
            num_images=media.num_images,
            dataset=spec.name,
            source=source,
        )
        return out


def tree_position_ids(p: int, c: int, r: int) -> torch.Tensor:
    """Positions of ``prompt + chosen + rejected``: ``0..P-1, P..P+C-1, P..P+R-1``.

    The rejected branch continues from the prompt, so each response sees exactly the positions
    it has in its own sequence (RoPE makes attention depend on them).
    """
    return torch.cat([torch.arange(p + c), torch.arange(p, p + r)])


def tree_attention_mask(p: int, c: int, r: int) -> torch.Tensor:
    """Bool [L, L], L = P + C + R; ``mask[q, k]`` = query token q may attend to key token k.

    Causal, except that rejected tokens never see chosen ones: a chosen token sees the prompt and
    the chosen tokens up to itself, a rejected token the prompt and the rejected tokens up to itself.
    """
    n = p + c + r
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[p + c :, p : p + c] = False
    return mask


def tree_parent_index(p: int, c: int, r: int) -> torch.Tensor:
    """For each token, the index of the token before it in its own branch (-1 for the first).

    The logits that predict token t sit at ``parent[t]``. That is ``t - 1`` everywhere except the
    first rejected token, whose predecessor is the last prompt token: with the tree layout the
    usual shift-by-one would score it from the end of the chosen branch.
    """
    parent = torch.arange(p + c + r) - 1
    if r:
        parent[p + c] = p - 1
    return parent
