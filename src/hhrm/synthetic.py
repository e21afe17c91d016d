"""The embedded preference data set: HH-format dialogues whose final answers code can check.

Each dialogue ends with a Human question from one of three task families (comparing two numbers,
converting meters to centimeters, counting the words of a list), answered in one sentence that
restates the operands. Usually the chosen answer is correct and the rejected one is *wrong but
well-formed* — the same sentence with a wrong value, with an operand miscopied, or the right answer
to a different question — sometimes a refusal, so a reward model has to learn correctness, not
style. In 30% of pairs, as in real preference data, the chosen answer is itself a wrong attempt
preferred to a refusal: SFT on the chosen answers imitates those mistakes, and only the
comparisons (the reward model, then RAFT) can remove them.

The tasks are sized for the embedded 4-layer model: it learns to copy operands and then decide, and
its typical mistakes (miscopied operands) are among the rejections the reward model learns from.
Addition was dropped: the tiny reward model never learned sums well enough to rank the policy's
off-by-one answers, so RAFT picked wrong sums.

:func:`gold_reward` scores any response to any generated prompt (1.0 correct, 0.0 otherwise): it
re-derives the expected answer from the question text alone, so it also grades model samples.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

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

COMPARE_LOW, COMPARE_HIGH = 10, 49

REFUSALS = [
    "I'm sorry, I can't help with that.",
    "I don't know the answer to that.",
    "That is a hard question, maybe ask someone else.",
    "Let me think about that for a while.",
]


@dataclass(frozen=True)
class Task:
    """One task family, built from its operands: a question, an answer stating a value, the solver.

    Answers restate the operands ("Of 43 and 32, the larger is 43."), so a reward model can check
    both the copy and the result, and so can :func:`gold_reward`.
    """

    name: str
    pattern: re.Pattern  # parses a question back into its operands
    parse: Callable[[re.Match], tuple]
    sample: Callable[[random.Random], tuple]
    question: Callable[[tuple], str]
    answer: Callable[[tuple, int], str]  # the answer sentence for these operands, stating this value
    solve: Callable[[tuple], int]
    wrong: Callable[[random.Random, tuple], int]  # a plausible wrong value
    near: Callable[[random.Random, tuple], tuple] | None  # operands of a nearby question (a miscopy)
    extract: Callable[[str], str | None]  # the value an answer states


def _ints(text: str) -> list[str]:
    return re.findall(r"-?\d+", text)


def _first_int(text: str) -> str | None:
    found = _ints(text)
    return found[0] if found else None


def _last_int(text: str) -> str | None:
    found = _ints(text)
    return found[-1] if found else None


def _near_miss(
    rng: random.Random,
    value: int,
    low: int = 0,
    high: int | None = None,
    steps: tuple[int, ...] = (-3, -2, -1, 1, 2, 3, 10, -10),
) -> int:
    """A wrong value close to the right one, as a plausible mistake would be."""
    while True:
        wrong = value + rng.choice(steps)
        if wrong != value and wrong >= low and (high is None or wrong <= high):
            return wrong


def _near_operands(rng: random.Random, ops: tuple[int, ...], low: int, high: int) -> tuple[int, ...]:
    """``ops`` with one operand changed to a close value (the miscopy a small model makes)."""
    i = rng.randrange(len(ops))
    changed = list(ops)
    changed[i] = _near_miss(rng, ops[i], low, high, steps=(-3, -2, -1, 1, 2, 3))
    return tuple(changed)


def _count_sample(rng: random.Random) -> tuple:
    return tuple(rng.sample(WORDS, rng.randint(2, 7)))


TASKS: tuple[Task, ...] = (
    Task(
        "compare",
        re.compile(r"^Which number is larger, (\d+) or (\d+)\?$"),
        lambda m: (int(m[1]), int(m[2])),
        lambda rng: tuple(rng.sample(range(COMPARE_LOW, COMPARE_HIGH + 1), 2)),
        lambda o: f"Which number is larger, {o[0]} or {o[1]}?",
        lambda o, v: f"Of {o[0]} and {o[1]}, the larger is {v}.",
        lambda o: max(o),
        # Mostly the smaller operand; sometimes a number near the larger that is neither operand.
        lambda rng, o: rng.choice([min(o), min(o), _near_miss(rng, max(o), COMPARE_LOW, COMPARE_HIGH + 10)]),
        lambda rng, o: _near_operands(rng, o, COMPARE_LOW, COMPARE_HIGH),
        _last_int,
    ),
    Task(
        "convert",
        re.compile(r"^How many centimeters are in (\d+) meters\?$"),
        lambda m: (int(m[1]),),
        lambda rng: (rng.randint(1, 30),),
        lambda o: f"How many centimeters are in {o[0]} meters?",
        lambda o, v: f"{o[0]} meters is {v} centimeters.",
        lambda o: o[0] * 100,
        lambda rng, o: rng.choice([o[0] * 10, o[0] * 1000, _near_miss(rng, o[0] * 100, 1)]),
        lambda rng, o: _near_operands(rng, o, 1, 30),
        _last_int,
    ),
    Task(
        "count",
        re.compile(r"^How many words are in this list: ([a-z ]+)\?$"),
        lambda m: tuple(m[1].split()),
        _count_sample,
        lambda o: f"How many words are in this list: {' '.join(o)}?",
        lambda o, v: f"There are {v} words in the list.",
        len,
        lambda rng, o: rng.choice([k for k in (len(o) - 1, len(o) + 1, len(o) + 2) if k > 0]),
        None,  # the answer does not restate the list
        _first_int,
    ),
)


def match_task(question: str) -> tuple[Task, tuple] | None:
    """The task family of a Human question and its operands, or ``None`` for a question not generated here."""
    for task in TASKS:
        m = task.pattern.match(question.strip())
        if m:
            return task, task.parse(m)
    return None


def _is_correct(question: str, response: str) -> bool:
    """The stated value is right, and every number in the response is one the question or the
    answer gives: "Of 39 and 34, the larger is 39." for 39 or 32 miscopied an operand and is wrong."""
    found = match_task(question)
    if found is None:
        raise ValueError(f"not a generated question: {question[-120:]!r}")
    task, ops = found
    expected = str(task.solve(ops))
    if task.extract(response) != expected:
        return False
    allowed = set(_ints(question)) | {expected}
    return all(n in allowed for n in _ints(response))


def gold_reward(prompt: str, response: str) -> float:
    """1.0 if ``response`` answers the prompt's last question correctly, else 0.0.

    Only the text before the next turn marker counts, as RAFT cuts generations there.
    """
    question = formatting.last_human_turn(prompt)
    if match_task(question) is None:
        raise ValueError(f"not a generated prompt: {prompt[-120:]!r}")
    return 1.0 if _is_correct(question, formatting.cut_at_next_turn(response)) else 0.0


def task_name(prompt: str) -> str | None:
    """The embedded task a prompt asks, or ``None`` (also for text not in the ### format, e.g. a chat template's)."""
    try:
        question = formatting.last_human_turn(prompt)
    except ValueError:
        return None
    found = match_task(question)
    return found[0].name if found else None


def is_gold_checkable(prompts: list[str]) -> bool:
    """True for prompts of the embedded data set, whose answers :func:`gold_reward` can grade."""
    return bool(prompts) and all(task_name(p) is not None for p in prompts)


def _raw(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


# How rejected answers go wrong, all but refusals in the chosen answer's own form:
# - wrong_value: the operands restated right, a wrong result ("3 meters is 30 centimeters.");
# - near_question: one operand miscopied, with the result right for the miscopy, wrong for it, or
#   right for the question ("Of 44 and 32, the larger is 43." asked about 43 or 32) - the policy's
#   own typical mistake;
# - other_question: the right answer to a different question of the same kind;
# - refusal.
REJECTION_KINDS = {"wrong_value": 0.35, "near_question": 0.30, "other_question": 0.20, "refusal": 0.15}


WRONG_KINDS = ("wrong_value", "near_question", "other_question")
# Share of pairs whose chosen answer is itself wrong (and whose rejected one is a refusal).
WRONG_CHOSEN_SHARE = 0.3


def _rejected_answer(rng: random.Random, task: Task, ops: tuple, kind: str) -> str:
    question = task.question(ops)
    if kind == "near_question" and task.near is not None:
        near = task.near(rng, ops)
        # Right for the miscopy, wrong for it, or the true result beside miscopied operands.
        value = rng.choice([task.solve(near), task.wrong(rng, near), task.solve(ops)])
        answer = task.answer(near, value)
        if not _is_correct(question, answer):
            return answer
    if kind == "other_question":
        for _ in range(20):
            other = task.sample(rng)
            answer = task.answer(other, task.solve(other))
            if not _is_correct(question, answer):
                return answer
    if kind == "refusal":
        return rng.choice(REFUSALS)
    return task.answer(ops, task.wrong(rng, ops))


def make_example(rng: random.Random, multi_turn_share: float = 0.35) -> dict[str, str]:
    """One raw-format pair: ``{"chosen": dialogue, "rejected": dialogue}``."""
    task = rng.choice(TASKS)
    ops = task.sample(rng)
    context: list[tuple[str, str]] = []
    if rng.random() < multi_turn_share:
        if rng.random() < 0.5:
            context += list(zip(("Human", "Assistant"), rng.choice(SMALL_TALK)))
        else:
            earlier = rng.choice(TASKS)
            o = earlier.sample(rng)
            context += [("Human", earlier.question(o)), ("Assistant", earlier.answer(o, earlier.solve(o)))]
    context.append(("Human", task.question(ops)))
    if rng.random() < WRONG_CHOSEN_SHARE:
        # Like real preference data, the preferred answer is not always right: a wrong attempt still
        # beats a refusal. SFT imitates these mistakes; only the comparisons say they are mistakes.
        kind = rng.choices(WRONG_KINDS, weights=[REJECTION_KINDS[k] for k in WRONG_KINDS])[0]
        chosen, rejected = _rejected_answer(rng, task, ops, kind), rng.choice(REFUSALS)
    else:
        kind = rng.choices(list(REJECTION_KINDS), weights=list(REJECTION_KINDS.values()))[0]
        chosen, rejected = task.answer(ops, task.solve(ops)), _rejected_answer(rng, task, ops, kind)
    return {"chosen": _raw(context + [("Assistant", chosen)]), "rejected": _raw(context + [("Assistant", rejected)])}


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
