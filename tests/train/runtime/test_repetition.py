"""The repetition figures of eval.json and the report's interval, on hand-made answers."""

from __future__ import annotations

import math

import pytest

from vlmtune.train.commands.report import summarise, wilson_interval
from vlmtune.train.runtime.evaluate import answer_tokens, has_repeated_ngram, repetition_scores

STOP = 99


def test_answer_tokens_cut_at_the_stop_token():
    assert answer_tokens([5, 6, STOP, 0, 0], STOP) == ([5, 6], True)
    assert answer_tokens([5, 6, 7], STOP) == ([5, 6, 7], False)  # ran into max_new_tokens
    assert answer_tokens([STOP, 0], STOP) == ([], True)


@pytest.mark.parametrize(
    "tokens, repeated",
    [
        ([1, 1, 1, 1, 1], True),  # overlapping: (1,1,1,1) at 0 and at 1
        ([1, 1, 1, 1], False),  # one 4-gram only
        ([1, 2, 3, 4, 1, 2, 3, 4], True),
        ([1, 2, 3, 4, 1, 2, 3, 5], False),  # a repeated trigram is not a repeated 4-gram
        ([1, 2, 3], False),  # shorter than n
        ([], False),
    ],
)
def test_repeated_four_gram(tokens, repeated):
    assert has_repeated_ngram(tokens, 4) is repeated


def test_repeated_bigram_with_other_n():
    assert has_repeated_ngram([1, 2, 3, 1, 2], 2) and not has_repeated_ngram([1, 2, 3, 1, 2], 3)


def test_repetition_scores_exact_rates():
    records = [
        {"finished": True, "prediction_tokens": [7]},  # "red": ended, no repeat
        {"finished": False, "prediction_tokens": [7, 7, 7, 7, 7, 7, 7, 7]},  # looped to the limit
        {"finished": False, "prediction_tokens": [1, 2, 3, 4, 5, 6, 8, 9]},  # long but no repeat
        {"finished": True, "prediction_tokens": [1, 2, 3, 4, 1, 2, 3, 4]},  # repeats, then ends
    ]
    scores = repetition_scores(records)
    assert scores == {"truncated_rate": 0.5, "repeated_ngram_rate": 0.5, "repeated_ngram_n": 4}
    assert repetition_scores(records[:1])["truncated_rate"] == 0.0


def test_wilson_interval_by_hand():
    # 50/100: centre (0.5 + 1.96^2/200) / (1 + 1.96^2/100) = 0.5; half-width 0.0962 (textbook value)
    lo, hi = wilson_interval(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-4) and math.isclose(hi, 0.5962, abs_tol=1e-4)
    # 10/10: the normal approximation gives [1, 1]; Wilson's lower end is 10 / (10 + 1.96^2) = 0.7225
    lo, hi = wilson_interval(10, 10)
    assert math.isclose(lo, 10 / (10 + 1.96**2), abs_tol=1e-9) and hi == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_summary_carries_interval_and_repetition():
    run = {
        "train": [{"step": 1, "loss": 1.0, "rewards/accuracy": 0.5}],
        "eval": {
            "accuracy": 0.5,
            "num_samples": 100,
            "truncated_rate": 0.25,
            "repeated_ngram_rate": 0.125,
            "repeated_ngram_n": 4,
            "before": {"accuracy": 0.4},
        },
    }
    row = summarise(run)
    assert row["eval_ci95"] == "0.404-0.596" and row["eval_n"] == 100 and row["eval_before"] == 0.4
    assert row["truncated"] == 0.25 and row["repeated_4gram"] == 0.125
