"""train/objectives/prm.py and train/runtime/prm_score.py: the maths by hand, and one-pass step scores
equal to a plain forward's two logits and to scoring the chat cut after each step."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.helpers import tiny_model, tiny_tokenizer
from vlmtune.data.conversation import IGNORE_INDEX, tokenize_conversation
from vlmtune.data.prm import prm_conversation
from vlmtune.train.model.build import num_image_tokens_per_tile
from vlmtune.train.objectives.prm import aggregate, best_of_n, majority_vote, pass_at, step_probabilities
from vlmtune.train.runtime.prm_score import prm_input, score_steps, verdict_ids, verdict_positions


def test_step_probability_is_softmax_over_the_two_tokens() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0], [1.0, 0.0, 0.0, 9.0]])
    got = step_probabilities(logits, positive_id=1, negative_id=2)
    assert got.tolist() == pytest.approx([1 / (1 + math.exp(-3.0)), 0.5])  # the other logits play no part


def test_aggregations_by_hand() -> None:
    s = [0.9, 0.2, 0.7]
    assert aggregate(s, "mean") == pytest.approx(0.6)
    assert (aggregate(s, "min"), aggregate(s, "max"), aggregate(s, "last")) == (0.2, 0.9, 0.7)
    with pytest.raises(ValueError):
        aggregate(s, "median")


def test_best_of_n_ties_go_to_the_earliest() -> None:
    assert best_of_n([0.1, 0.8, 0.3, 0.8]) == 1
    assert best_of_n([0.5]) == 0


def test_majority_vote_by_hand() -> None:
    assert majority_vote(["3", "4", "4", "3", "5"]) == 0  # 3 and 4 tie (2 each): 3 appeared first
    assert majority_vote([None, "4", "3", "4"]) == 1
    assert majority_vote([None, None, "7"]) == 2  # no answer does not vote
    assert majority_vote([None, None]) is None


def test_pass_at_n() -> None:
    correct = [False, False, True, False]
    assert [pass_at(correct, n) for n in (1, 2, 3, 4)] == [False, False, True, True]


# ---------------------------------------------------------------- one pass over the chat


@pytest.fixture(scope="module")
def prm():
    torch.manual_seed(0)
    model = tiny_model(seed=3).eval()
    return model, tiny_tokenizer()


def _record_input(model, tok, steps: list[str], with_image: bool, seed: int = 0):
    size = model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    tpt = num_image_tokens_per_tile(model.config)
    pixels = (
        torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) if with_image else None
    )
    record = prm_conversation("What is 2+3?", steps, image="x.png" if with_image else None)
    counts = [2 * tpt] if with_image else []
    return prm_input(record, tok, counts, pixels if with_image else torch.zeros(0, 3, size, size))


def test_labels_of_a_prm_record_are_the_verdict_tokens_only(prm) -> None:
    model, tok = prm
    record = prm_conversation("q", ["a", "b", "c"], ["+", "-", "+"])
    ids, labels = tokenize_conversation(record["conversations"], tok, [], supervision="assistant_content")
    plus, minus = verdict_ids(tok)
    on = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    assert labels[on].tolist() == [plus, minus, plus] and ids[on].tolist() == [plus, minus, plus]
    assert verdict_positions(labels).tolist() == (on - 1).tolist()
    # the same chat under SFT's supervision also labels each <|im_end|>: only those differ
    _, sft = tokenize_conversation(record["conversations"], tok, [], supervision="assistant")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    extra = ((sft != IGNORE_INDEX) & (labels == IGNORE_INDEX)).nonzero().squeeze(-1)
    assert extra.tolist() == (on + 1).tolist() and set(sft[extra].tolist()) == {end}


@pytest.mark.parametrize("with_image", [False, True])
def test_one_pass_equals_plain_forward_and_truncated_chats(prm, with_image: bool) -> None:
    model, tok = prm
    plus, minus = verdict_ids(tok)
    steps = ["First add 2 and 3.", "That gives 5.", "Check: 5 - 3 = 2.", "Answer: 5"]
    x = _record_input(model, tok, steps, with_image)
    [one_pass] = score_steps(model, [x], plus, minus, tok.pad_token_id)
    assert one_pass.shape == (4,)
    # a plain forward of the same ids, the two logits read and softmaxed by hand
    kwargs = {"pixel_values": x.pixel_values} if with_image else {}
    with torch.no_grad():
        logits = model(input_ids=x.input_ids[None], **kwargs).logits[0]
    by_hand = [1 / (1 + math.exp(float(logits[p, minus] - logits[p, plus]))) for p in x.positions.tolist()]
    assert one_pass.tolist() == pytest.approx(by_hand, abs=1e-6)
    # the chat cut after step k scores its last step as the one pass scored step k
    for k in range(len(steps)):
        cut = _record_input(model, tok, steps[: k + 1], with_image)
        [alone] = score_steps(model, [cut], plus, minus, tok.pad_token_id)
        assert alone[-1].item() == pytest.approx(one_pass[k].item(), abs=1e-6)


def test_batched_equals_one_at_a_time(prm) -> None:
    model, tok = prm
    plus, minus = verdict_ids(tok)
    chats = [
        _record_input(model, tok, ["Two plus three.", "Answer: 5"], True, seed=1),
        _record_input(
            model, tok, ["Guess.", "It is six, a long step of many words here.", "Answer: 6"], True, 2
        ),
        _record_input(model, tok, ["Answer: 5"], False),
    ]
    batched = score_steps(model, chats, plus, minus, tok.pad_token_id)
    for chat, got in zip(chats, batched):
        [alone] = score_steps(model, [chat], plus, minus, tok.pad_token_id)
        assert got.tolist() == pytest.approx(alone.tolist(), abs=1e-5)
    assert [len(b) for b in batched] == [2, 3, 1]
