"""Token helpers shared by the conversation and pair tests (the ``tok`` fixture is in conftest.py)."""

from __future__ import annotations


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def image_ids(tok, n_ctx: int) -> list[int]:
    s, e, c = tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
    return [s] + [c] * n_ctx + [e]
