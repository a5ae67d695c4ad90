"""Answer extraction and matching: one definition for evaluation and for whatever scores generated
answers (a sampler making MPO pairs, PRM data), so a "correct" answer means the same everywhere.

``normalised`` (the default): case, surrounding spaces and a final full stop ignored. ``exact``: the
stripped text. ``number``: the first number in the text (thousands separators dropped, ``3.0`` =
``3``). ``choice``: the multiple-choice letter (``B``, ``(B)``, ``B.``, ``Answer: B``, ``the answer is B``).
"""

from __future__ import annotations

import re

MATCH_MODES = ("normalised", "exact", "number", "choice")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_CHOICE = re.compile(r"(?:^|[\s(\[:])([A-Z])(?=$|[\s).\]:,])")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\(?([A-Z])\b", re.IGNORECASE)


def normalise_answer(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def extract_number(text: str) -> str | None:
    """The first number, canonical (``1,000.50`` -> ``1000.5``, ``3.0`` -> ``3``); None without one."""
    found = _NUMBER.search(text)
    if found is None:
        return None
    value = float(found.group().replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


def extract_choice(text: str) -> str | None:
    """The option letter: after "answer is"/"answer:" if present, else the first standalone capital."""
    stated = _ANSWER_IS.search(text)
    if stated:
        return stated.group(1).upper()
    found = _CHOICE.search(text.strip())
    return found.group(1) if found else None


def extract_answer(text: str, mode: str = "normalised") -> str | None:
    """What of ``text`` is compared under ``mode``."""
    if mode == "normalised":
        return normalise_answer(text)
    if mode == "exact":
        return text.strip()
    if mode == "number":
        return extract_number(text)
    if mode == "choice":
        return extract_choice(text)
    raise ValueError(f"answer match must be one of {', '.join(MATCH_MODES)}, got {mode!r}")


def answers_match(prediction: str, answer: str, mode: str = "normalised") -> bool:
    """Whether ``prediction`` gives ``answer`` under ``mode`` (nothing extracted never matches)."""
    got = extract_answer(prediction, mode)
    return got is not None and got == extract_answer(answer, mode)
