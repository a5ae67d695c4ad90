"""Fixtures for the data tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer, built in memory (Qwen2.5 chat format + InternVL's special tokens)."""
    from vlmtune.train.model.tiny import build_tokenizer

    return build_tokenizer(None)
