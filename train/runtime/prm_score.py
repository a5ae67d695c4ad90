"""Scoring a solution's steps with a process reward model, every step in one forward pass.

The PRM's chat (data/prm.py) is built with ``+`` in every assistant turn and run once; step k's score
is read at the position that predicts turn k's content (train/objectives/prm.py). For a causal model
this is exact: the logits at a position depend on the tokens before it only, and the tokens before
turn k's verdict are the same whether later steps follow or not, and whatever earlier turns held is
the ``+`` the PRM was trained to see after a step it judged (teacher forcing, as in training). So one
pass over the whole chat gives what scoring the chat cut after each step would, at 1/S of the cost.
Responses are batched right-padded (the padding comes after every position read).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmtune.data.conversation import IGNORE_INDEX, tokenize_conversation
from vlmtune.data.prm import NEGATIVE, POSITIVE
from vlmtune.train.objectives.prm import step_probabilities


@dataclass
class PRMInput:
    """One chat to score: its ids, the positions whose logits judge each step, its image tiles."""

    input_ids: torch.Tensor  # [L]
    positions: torch.Tensor  # [S]: one per assistant turn, the token before its content
    pixel_values: torch.Tensor  # [T, 3, s, s]; T = 0 for text


def verdict_ids(tokenizer: Any) -> tuple[int, int]:
    """The ``+`` and ``-`` token ids; refused when either is not one token (the score reads one logit)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (POSITIVE, NEGATIVE)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the PRM reads '+'/'-' as one token each; this tokenizer gives {ids}")
    return ids[0][0], ids[1][0]


def verdict_positions(labels: torch.Tensor) -> torch.Tensor:
    """The position predicting each labelled run's first token (labels from
    ``supervision="assistant_content"``: one run per assistant turn)."""
    on = labels != IGNORE_INDEX
    starts = on & ~torch.cat([torch.zeros(1, dtype=torch.bool), on[:-1]])
    return starts.nonzero().squeeze(-1) - 1


def prm_input(
    record: dict[str, Any],
    tokenizer: Any,
    image_token_counts: list[int],
    pixel_values: torch.Tensor,
    system_prompt: str | None = None,
) -> PRMInput:
    """A PRM record (data/prm.py's `prm_conversation`) tokenised as training tokenises it."""
    input_ids, labels = tokenize_conversation(
        record["conversations"],
        tokenizer,
        image_token_counts,
        system_prompt=system_prompt,
        supervision="assistant_content",
    )
    return PRMInput(input_ids, verdict_positions(labels), pixel_values)


@torch.no_grad()
def score_steps(
    model: Any, inputs: list[PRMInput], positive_id: int, negative_id: int, pad_id: int
) -> list[torch.Tensor]:
    """P(``+``) of every step of every chat in ``inputs``, one forward pass for the batch."""
    length = max(len(x.input_ids) for x in inputs)
    ids = torch.full((len(inputs), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, x in enumerate(inputs):
        ids[row, : len(x.input_ids)] = x.input_ids
        mask[row, : len(x.input_ids)] = 1
    tiles = [x.pixel_values for x in inputs if x.pixel_values.shape[0]]
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {}
    if tiles:
        kwargs["pixel_values"] = torch.cat(tiles).to(device, dtype=model.dtype)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    return [
        step_probabilities(logits[row, x.positions.to(device)].float(), positive_id, negative_id).cpu()
        for row, x in enumerate(inputs)
    ]


class PRMScorer:
    """A PRM directory (-hf, original layout, or a peft adapter) that scores responses' steps: images
    tiled as the PRM was trained (its vlmtune.json), the chat built by data/prm.py."""

    def __init__(
        self,
        model_dir: str | Path,
        system_prompt: str | None = None,
        batch_size: int = 8,
        max_steps: int | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from vlmtune.data.prm import DEFAULT_PRM_SYSTEM_PROMPT, MAX_STEPS
        from vlmtune.train.model.build import num_image_tokens_per_tile, tile_size
        from vlmtune.train.runtime.evaluate import trained_data_config
        from vlmtune.train.runtime.export import load_trained

        self.model = load_trained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.data_cfg = trained_data_config(model_dir, tile_size(self.model.config.vision_config), "")
        self.tokens_per_tile = num_image_tokens_per_tile(self.model.config)
        self.system_prompt = DEFAULT_PRM_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.batch_size = batch_size
        self.max_steps = max_steps or MAX_STEPS
        self.ids = verdict_ids(self.tokenizer)

    def _media(self, images: list[str]) -> tuple[torch.Tensor, list[int]]:
        from vlmtune.data.dataset import load_media
        from vlmtune.data.meta import DatasetSpec

        # image files are the engines' (absolute, or relative to the working directory, as they open them)
        spec = DatasetSpec(name="prm", root=Path.cwd(), annotation=Path(os.devnull), repeat_time=1.0)
        media = load_media(self.data_cfg, spec, images, None, self.tokens_per_tile, random.Random(0), False)
        return media.pixel_values, media.image_tokens

    def __call__(
        self, question: str, images: list[str], responses: list[str], blank: bool = False
    ) -> list[list[float]]:
        """Each response's step scores (a response without steps: an empty list); ``blank``: every
        tile zeroed, as the evaluation's blank-image control (same tiles, same tokens, no pixels)."""
        from vlmtune.data.prm import prm_conversation, split_steps

        pixels, counts = self._media(images)
        if blank:
            pixels = torch.zeros_like(pixels)
        inputs: list[PRMInput | None] = []
        for text in responses:
            steps = split_steps(text, self.max_steps)
            if not steps:
                inputs.append(None)
                continue
            record = prm_conversation(question, steps, system_prompt=self.system_prompt)
            inputs.append(prm_input(record, self.tokenizer, counts, pixels))
        scored = [x for x in inputs if x is not None]
        pad = self.tokenizer.pad_token_id or 0
        out: list[torch.Tensor] = []
        for start in range(0, len(scored), self.batch_size):
            out += score_steps(self.model, scored[start : start + self.batch_size], *self.ids, pad)
        it = iter(out)
        return [[] if x is None else next(it).tolist() for x in inputs]
