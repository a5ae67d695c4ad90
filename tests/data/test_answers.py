"""Answer matching: what counts as the same answer for evaluation and sampling."""

from __future__ import annotations

import pytest

from vlmtune.data.answers import answers_match, extract_choice, extract_number


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("There are 3 circles.", "3"),
        ("1,000.50 dollars", "1000.5"),
        ("3.0", "3"),
        ("-2 degrees", "-2"),
        ("none", None),
    ],
)
def test_first_number_canonical(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(C) a square", "C"),
        ("D.", "D"),
        ("Answer: a", "A"),
        ("I think the answer is (B).", "B"),
        ("a cat", None),
    ],
)
def test_choice_letter(text, letter):
    assert extract_choice(text) == letter


def test_modes_differ_where_they_should():
    assert answers_match(" Red. ", "red") and not answers_match(" Red. ", "red", "exact")
    assert answers_match("It has 4 sides", "4", "number") and not answers_match("It has 4 sides", "4")
    assert answers_match("The answer is C.", "C", "choice") and not answers_match("no idea", "C", "choice")
    with pytest.raises(ValueError, match="answer match must be one of"):
        answers_match("a", "a", "fuzzy")
