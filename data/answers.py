"""Answer extraction and matching: one definition for evaluation and for whatever scores generated
answers (a sampler making MPO pairs, PRM data), so a "correct" answer means the same everywhere.

``normalised`` (the default): case, surrounding spaces and a final full stop ignored. ``exact``: the
stripped text. ``number``: the first number in the text (thousands separators dropped, ``3.0`` =
``3``). ``choice``: the multiple-choice letter (``B``, ``(B)``, ``B.``, ``Answer: B``, ``the answer is B``).
``marker``: what follows the last ``marker`` (``"Answer:"`` by default, any case) up to the end of its
line, normalised: for reasoning chains that end with their answer (MPO's correctness pairs). A
prediction without the marker never matches; a reference answer without it is taken whole.
"""

from __future__ import annotations

import re

MATCH_MODES = ("normalised", "exact", "number", "choice", "marker")
DEFAULT_MARKER = "Answer:"
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


def extract_marked(text: str, marker: str = DEFAULT_MARKER) -> str | None:
    """The normalised text after the last ``marker`` (any case) up to the end of that line; None
    without the marker or with nothing after it."""
    found = text.lower().rfind(marker.lower())
    if found < 0 or not marker:
        return None
    answer = normalise_answer(text[found + len(marker) :].split("\n", 1)[0])
    return answer or None


def extract_answer(text: str, mode: str = "normalised", *, marker: str = DEFAULT_MARKER) -> str | None:
    """What of ``text`` is compared under ``mode`` (``marker`` only for mode ``marker``)."""
    if mode == "normalised":
        return normalise_answer(text)
    if mode == "exact":
        return text.strip()
    if mode == "number":
        return extract_number(text)
    if mode == "choice":
        return extract_choice(text)
    if mode == "marker":
        return extract_marked(text, marker)
    raise ValueError(f"answer match must be one of {', '.join(MATCH_MODES)}, got {mode!r}")


def answers_match(
    prediction: str, answer: str, mode: str = "normalised", *, marker: str = DEFAULT_MARKER
) -> bool:
    """Whether ``prediction`` gives ``answer`` under ``mode`` (nothing extracted never matches; in mode
    ``marker`` a reference without the marker is compared whole, normalised)."""
    got = extract_answer(prediction, mode, marker=marker)
    want = extract_answer(answer, mode, marker=marker)
    if mode == "marker" and want is None:
        want = normalise_answer(answer) or None
    return got is not None and got == want
