"""Process-reward-model data: a solution's steps, their Monte-Carlo labels and the PRM's chat record.

VisualPRM (arXiv 2503.10291, section 3; InternVL's ``tools/reasoning_data_pipeline``) trains the PRM
as a chat: a system turn, then one human turn per step and a gpt turn ``+`` (the step is right) or
``-`` after it. The first human turn is ``### Question:\\n{question}\\n\\n### Solution Process:\\n{step 0}``
(the image goes with it), later human turns are the step text alone. A step is ``+`` when its
Monte-Carlo score, the share of completions *from that step* that reach the right answer, is above a
threshold (0.0: any completion right). Steps are the response split on blank lines, at most
``MAX_STEPS`` (the first ``n % k`` groups one step longer, as ``numpy.array_split``).
"""

from __future__ import annotations

from typing import Any

STEP_SEPARATOR = "\n\n"
#: VisualPRM's cap on the steps of one solution; more are merged into this many groups.
MAX_STEPS = 12
POSITIVE, NEGATIVE = "+", "-"
#: A system prompt for the PRM chat (configurable everywhere it is used). Our wording, not InternVL's
#: PRM_SYSTEM_PROMPT verbatim: what matters is that training and scoring use the same one.
DEFAULT_PRM_SYSTEM_PROMPT = (
    "You are an expert at judging step-by-step solutions. You are given a question and a solution "
    "one step at a time; answer each step with + if it is correct and leads towards the right answer, "
    "or - if it is wrong."
)


def group_sizes(n: int, k: int) -> list[int]:
    """``numpy.array_split``'s group sizes for ``n`` items in ``min(n, k)`` groups: the first
    ``n % k`` groups hold ``n // k + 1`` items, the others ``n // k``."""
    if k < 1:
        raise ValueError(f"max_steps must be >= 1, got {k}")
    groups = min(n, k)
    if groups == 0:
        return []
    base, extra = divmod(n, groups)
    return [base + 1] * extra + [base] * (groups - extra)


def merge_steps(steps: list[str], max_steps: int = MAX_STEPS) -> list[str]:
    """At most ``max_steps`` steps: consecutive steps joined by a blank line in `group_sizes` groups."""
    merged, start = [], 0
    for size in group_sizes(len(steps), max_steps):
        merged.append(STEP_SEPARATOR.join(steps[start : start + size]))
        start += size
    return merged


def split_steps(response: str, max_steps: int = MAX_STEPS) -> list[str]:
    """A response's steps: the blank-line-separated parts, stripped, empty ones dropped, merged to at
    most ``max_steps``."""
    return merge_steps([s.strip() for s in response.split(STEP_SEPARATOR) if s.strip()], max_steps)


def step_prefix(steps: list[str], i: int) -> str:
    """The solution up to and including step ``i``: what a Monte-Carlo completion of step ``i``
    continues (the continuation is expected to start with the blank line of the next step)."""
    return STEP_SEPARATOR.join(steps[: i + 1])


def mc_score(correct: list[bool]) -> float:
    """The share of a step's completions that reach the right answer."""
    if not correct:
        raise ValueError("a step's Monte-Carlo score needs at least one completion")
    return sum(correct) / len(correct)


def mc_label(score: float, threshold: float = 0.0) -> str:
    """``+`` when the step's Monte-Carlo score is above ``threshold`` (VisualPRM: > 0), else ``-``."""
    return POSITIVE if score > threshold else NEGATIVE


def prm_conversation(
    question: str,
    steps: list[str],
    labels: list[str] | None = None,
    *,
    image: Any = None,
    system_prompt: str | None = DEFAULT_PRM_SYSTEM_PROMPT,
) -> dict[str, Any]:
    """The PRM's chat for one solution as a vlmtune record (``conversations``, ``image`` when given).

    ``labels``: one ``+``/``-`` per step; None puts ``+`` on every step, the form a PRM *scores*
    (the score is read at each assistant turn's first position, whatever the turn holds).
    ``question`` keeps its ``<image>`` placeholder if it has one (else the data path puts it first).
    """
    if not steps:
        raise ValueError("a PRM conversation needs at least one step")
    labels = [POSITIVE] * len(steps) if labels is None else labels
    if len(labels) != len(steps) or any(lab not in (POSITIVE, NEGATIVE) for lab in labels):
        raise ValueError(f"labels must be one '+' or '-' per step ({len(steps)}), got {labels!r}")
    turns: list[dict[str, str]] = []
    if system_prompt is not None:
        turns.append({"from": "system", "value": system_prompt})
    for i, (step, label) in enumerate(zip(steps, labels)):
        text = f"### Question:\n{question}\n\n### Solution Process:\n{step}" if i == 0 else step
        turns += [{"from": "human", "value": text}, {"from": "gpt", "value": label}]
    record: dict[str, Any] = {} if image is None or image == [] else {"image": image}
    record["conversations"] = turns
    return record
