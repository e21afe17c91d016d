"""The embedded preference data set: HH-format dialogues whose final answers code can check.

Each dialogue ends with a Human question from one of a few task families (addition, comparison,
unit conversion, picking a word from a list, counting words). The chosen answer is correct; the
rejected one is usually a *wrong but well-formed* answer — the same sentence with a wrong value, or
the right answer to a different question of the same kind — sometimes a refusal or an evasive
reply, so a reward model has to learn correctness, not style.

:func:`gold_reward` scores any response to any generated prompt (1.0 correct, 0.0 otherwise): it
re-derives the expected answer from the question text alone, so it also grades model samples.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from hhrm import formatting

WORDS = (
    "apple river stone cloud tiger lemon chair piano garden rocket silver candle forest mirror "
    "pencil rabbit window castle orange planet bridge yellow dragon basket winter summer coffee "
    "island jacket marble pepper spider tomato violin wallet zebra anchor button circle"
).split()

SMALL_TALK = [
    ("Hi there!", "Hello! How can I help you today?"),
    ("Good morning.", "Good morning! What can I do for you?"),
    ("Can you help me with a quick question?", "Of course, go ahead."),
    ("I have a question for you.", "Sure, what is it?"),
    ("Thanks for the help earlier.", "You are welcome. Anything else?"),
]

REFUSALS = [
    "I'm sorry, I can't help with that.",
    "I don't know the answer to that.",
    "That is a hard question, maybe ask someone else.",
    "Let me think about that for a while.",
]


@dataclass(frozen=True)
class Task:
    """One task family: a question pattern, how to make a question, and how to grade an answer."""

    name: str
    pattern: re.Pattern
    make: Callable[[random.Random], tuple[str, str, str]]  # -> (question, correct answer, wrong answer)
    expected: Callable[[re.Match], str]
    extract: Callable[[str], str | None]


def _ints(text: str) -> list[str]:
    return re.findall(r"-?\d+", text)


def _first_int(text: str) -> str | None:
    found = _ints(text)
    return found[0] if found else None


def _last_int(text: str) -> str | None:
    found = _ints(text)
    return found[-1] if found else None


def _word_after_is(text: str) -> str | None:
    m = re.search(r"\bis ([A-Za-z]+)", text)
    return m.group(1).lower() if m else None


def _near_miss(rng: random.Random, value: int, low: int = 0) -> int:
    """A wrong value close to the right one, as a plausible mistake would be."""
    while True:
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
        if wrong != value and wrong >= low:
            return wrong


def _make_add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    q = f"What is {a} plus {b}?"
    return q, f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {_near_miss(rng, a + b)}."


def _make_compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(10, 100), 2)
    q = f"Which number is larger, {a} or {b}?"
    return q, f"The larger number is {max(a, b)}.", f"The larger number is {min(a, b)}."


def _make_convert(rng: random.Random) -> tuple[str, str, str]:
    m = rng.randint(1, 30)
    q = f"How many centimeters are in {m} meters?"
    wrong = rng.choice([m * 10, m * 1000, _near_miss(rng, m * 100, 1)])
    return q, f"There are {m * 100} centimeters in {m} meters.", f"There are {wrong} centimeters in {m} meters."


def _make_pick(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(3, 5)
    words = rng.sample(WORDS, n)
    which = rng.choice(["first", "last"])
    right = words[0] if which == "first" else words[-1]
    wrong = rng.choice([w for w in words if w != right])
    q = f"What is the {which} word in this list: {' '.join(words)}?"
    return q, f"The {which} word is {right}.", f"The {which} word is {wrong}."


def _make_count(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(2, 7)
    words = rng.sample(WORDS, n)
    q = f"How many words are in this list: {' '.join(words)}?"
    wrong = rng.choice([k for k in (n - 1, n + 1, n + 2) if k > 0])
    return q, f"There are {n} words in the list.", f"There are {wrong} words in the list."


TASKS: tuple[Task, ...] = (
    Task(
        "add",
        re.compile(r"^What is (\d+) plus (\d+)\?$"),
        _make_add,
        lambda m: str(int(m[1]) + int(m[2])),
        _last_int,
    ),
    Task(
        "compare",
        re.compile(r"^Which number is larger, (\d+) or (\d+)\?$"),
        _make_compare,
        lambda m: str(max(int(m[1]), int(m[2]))),
        _last_int,
    ),
    Task(
        "convert",
        re.compile(r"^How many centimeters are in (\d+) meters\?$"),
        _make_convert,
        lambda m: str(int(m[1]) * 100),
        _first_int,
    ),
    Task(
        "pick",
        re.compile(r"^What is the (first|last) word in this list: ([a-z ]+)\?$"),
        _make_pick,
        lambda m: m[2].split()[0] if m[1] == "first" else m[2].split()[-1],
        _word_after_is,
    ),
    Task(
        "count",
        re.compile(r"^How many words are in this list: ([a-z ]+)\?$"),
        _make_count,
        lambda m: str(len(m[1].split())),
        _first_int,
    ),
)


def match_task(question: str) -> tuple[Task, re.Match] | None:
    """The task family a Human question belongs to, or ``None`` for a question not generated here."""
    for task in TASKS:
        m = task.pattern.match(question.strip())
        if m:
            return task, m
    return None


def gold_answer(prompt: str) -> str | None:
    """The correct answer to the last question of ``prompt`` (either marker format)."""
    found = match_task(formatting.last_human_turn(prompt))
    return found[0].expected(found[1]) if found else None


def gold_reward(prompt: str, response: str) -> float:
    """1.0 if ``response`` answers the prompt's last question correctly, else 0.0.

    Only the text before the next turn marker counts, as RAFT cuts generations there.
    """
    found = match_task(formatting.last_human_turn(prompt))
    if found is None:
        raise ValueError(f"not a generated prompt: {prompt[-120:]!r}")
    task, m = found
    answer = task.extract(formatting.cut_at_next_turn(response))
    return 1.0 if answer is not None and answer == task.expected(m) else 0.0


def task_name(prompt: str) -> str | None:
    found = match_task(formatting.last_human_turn(prompt))
    return found[0].name if found else None


def _raw(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


# How rejected answers go wrong. "other_question" answers a different question of the same kind
# ("There are 400 centimeters in 4 meters." asked about 5 meters): fluent and self-consistent, so
# a reward model must check the answer against the question, the very mistake a policy makes.
REJECTION_KINDS = {"wrong_value": 0.45, "other_question": 0.35, "refusal": 0.20}


def _is_correct(question: str, answer: str) -> bool:
    found = match_task(question)
    return found is not None and found[0].extract(answer) == found[0].expected(found[1])


def _other_question_answer(rng: random.Random, task: Task, question: str, fallback: str) -> str:
    for _ in range(20):
        _, answer, _ = task.make(rng)
        if not _is_correct(question, answer):
            return answer
    return fallback


def make_example(rng: random.Random, multi_turn_share: float = 0.35) -> dict[str, str]:
    """One raw-format pair: ``{"chosen": dialogue, "rejected": dialogue}``."""
    task = rng.choice(TASKS)
    question, right, wrong = task.make(rng)
    context: list[tuple[str, str]] = []
    if rng.random() < multi_turn_share:
        if rng.random() < 0.5:
            context += list(zip(("Human", "Assistant"), rng.choice(SMALL_TALK)))
        else:
            q0, a0, _ = rng.choice(TASKS).make(rng)
            context += [("Human", q0), ("Assistant", a0)]
    kind = rng.choices(list(REJECTION_KINDS), weights=list(REJECTION_KINDS.values()))[0]
    if kind == "other_question":
        wrong = _other_question_answer(rng, task, question, wrong)
    elif kind == "refusal":
        wrong = rng.choice(REFUSALS)
    context.append(("Human", question))
    return {
        "chosen": _raw(context + [("Assistant", right)]),
        "rejected": _raw(context + [("Assistant", wrong)]),
    }


def generate(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` raw-format pairs, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def gold_summary(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """Gold accuracy of ``responses`` overall and per task family (``gold_accuracy_<task>``)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    by_task: dict[str, list[float]] = {}
    for p, r in zip(prompts, responses):
        by_task.setdefault(task_name(p) or "unknown", []).append(gold_reward(p, r))
    scores = [s for v in by_task.values() for s in v]
    out = {"gold_accuracy": sum(scores) / max(len(scores), 1), "gold_prompts": len(scores)}
    out.update({f"gold_accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_task.items())})
    return out
