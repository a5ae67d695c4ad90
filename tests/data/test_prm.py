"""data/prm.py: steps split and merged as numpy.array_split would, Monte-Carlo labels, the PRM chat."""

from __future__ import annotations

import numpy as np
import pytest

from vlmtune.data.prm import (
    group_sizes,
    mc_label,
    mc_score,
    merge_steps,
    prm_conversation,
    split_steps,
    step_prefix,
)


@pytest.mark.parametrize(
    ("n", "k", "sizes"),
    [
        (0, 12, []),
        (3, 12, [1, 1, 1]),
        (12, 12, [1] * 12),
        (13, 12, [2] + [1] * 11),
        (25, 12, [3] + [2] * 11),
        (7, 3, [3, 2, 2]),
        (8, 3, [3, 3, 2]),
    ],
)
def test_group_sizes_by_hand_and_as_numpy(n: int, k: int, sizes: list[int]) -> None:
    assert group_sizes(n, k) == sizes
    if n:
        assert [len(a) for a in np.array_split(np.arange(n), min(n, k))] == sizes


def test_split_on_blank_lines_strips_and_drops_empty_parts() -> None:
    text = "  Step one.\n\n\n\nStep two\nstill two.\n\n   \n\nAnswer: 4\n"
    assert split_steps(text) == ["Step one.", "Step two\nstill two.", "Answer: 4"]
    assert split_steps("") == [] and split_steps("one line") == ["one line"]


def test_merge_joins_consecutive_steps_with_a_blank_line() -> None:
    steps = [f"s{i}" for i in range(7)]
    assert merge_steps(steps, 3) == ["s0\n\ns1\n\ns2", "s3\n\ns4", "s5\n\ns6"]
    text = "\n\n".join(f"s{i}" for i in range(13))
    merged = split_steps(text)
    assert len(merged) == 12 and merged[0] == "s0\n\ns1" and merged[1:] == [f"s{i}" for i in range(2, 13)]


def test_prefix_is_the_solution_up_to_the_step() -> None:
    assert step_prefix(["a", "b", "c"], 0) == "a"
    assert step_prefix(["a", "b", "c"], 1) == "a\n\nb"


def test_mc_scores_and_labels() -> None:
    assert mc_score([False, True, False, False]) == 0.25
    assert mc_label(0.25) == "+" and mc_label(0.0) == "-"  # VisualPRM: + when any completion is right
    assert mc_label(0.25, threshold=0.5) == "-" and mc_label(0.75, threshold=0.5) == "+"
    with pytest.raises(ValueError):
        mc_score([])


def test_prm_conversation_is_internvl_converters_chat() -> None:
    rec = prm_conversation(
        "<image>\nHow many?", ["I see 2.", "Answer: 2"], ["+", "-"], image="a.png", system_prompt="SYS"
    )
    assert rec == {
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "SYS"},
            {
                "from": "human",
                "value": "### Question:\n<image>\nHow many?\n\n### Solution Process:\nI see 2.",
            },
            {"from": "gpt", "value": "+"},
            {"from": "human", "value": "Answer: 2"},
            {"from": "gpt", "value": "-"},
        ],
    }
    scoring = prm_conversation("q", ["a", "b"], system_prompt=None)
    assert "image" not in scoring and [t["value"] for t in scoring["conversations"][1::2]] == ["+", "+"]
    with pytest.raises(ValueError):
        prm_conversation("q", ["a", "b"], ["+"])
