"""Answer matching: what counts as the same answer for evaluation and sampling."""

from __future__ import annotations

import pytest

from vlmtune.data.answers import (
    MATCH_MODES,
    answers_match,
    extract_answer,
    extract_choice,
    extract_marked,
    extract_number,
)


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


@pytest.mark.parametrize(
    ("text", "marked"),
    [
        ("The shape has three corners.\nAnswer: Triangle.", "triangle"),
        ("answer: 4\nso that is it", "4"),  # up to the end of the marker's line, any case
        ("Answer: B at first... Answer: C", "c"),  # the last statement counts
        ("ANSWER:   blue  ", "blue"),
        ("Answer:", None),  # nothing after it
        ("The answer is red.", None),  # no marker
    ],
)
def test_marked_answer(text, marked):
    assert extract_marked(text) == marked


def test_marker_mode_needs_the_marker_in_the_prediction_only():
    chain = "I see a red circle.\nAnswer: Red."
    assert answers_match(chain, "red", "marker") and answers_match(chain, "Answer: red", "marker")
    assert not answers_match("red", "red", "marker")  # the prediction states no answer
    assert not answers_match("Answer: blue", "red", "marker")
    assert not answers_match(chain, "red")  # the whole chain is not the answer under "normalised"
    assert answers_match("Result => 7", "7", "marker", marker="=>")
    assert extract_answer("Final: X", "marker", marker="final:") == "x"
    assert "marker" in MATCH_MODES
