"""The card's ``###Human:`` / ``###Assistant:`` text format, the default text rule of every stage.

HH-RLHF dialogues arrive as ``"\\n\\nHuman: q\\n\\nAssistant: a..."``. The card rewrites the two
markers to ``###Human:`` / ``###Assistant:``. Every input format (:mod:`hhrm.formats`: raw HH, Dahoas,
TRL's conversational and standard) becomes turns rendered by one rule, so SFT, reward training,
scoring, evaluation and RAFT all see byte-identical strings. With ``use_chat_template`` the tokenizer's
chat template renders the same turns instead (:class:`hhrm.formats.TextRule`); this module is the
``###`` rendering, and the parsing of HH marker text in either case.

The ``###`` rule (see README, "Text format"):

* a dialogue is a list of turns ``(role, text)``, each text stripped of surrounding whitespace;
* a turn renders as ``"###Human: text"`` / ``"###Assistant: text"``; turns are joined by one space,
  and the dialogue starts with the marker (no leading space);
* a **prompt** is every turn before the final Assistant answer, followed by ``" ###Assistant:"``;
* a **response** is the final answer with one leading space, so ``prompt + response`` is the full
  rendered dialogue;
* EOS is not part of the text. Trainers append it (SFTTrainer, RewardTrainer), and the reward
  scorer appends it too, so a reward always sees ``prompt + response + eos``.
"""

from __future__ import annotations

import re

HUMAN = "###Human:"
ASSISTANT = "###Assistant:"
ROLES = {"Human": HUMAN, "Assistant": ASSISTANT}

# Raw HH: "\n\nHuman:" / "\n\nAssistant:" (the very first marker sometimes lacks the newlines).
_RAW_SPLIT = re.compile(r"(?:^|\n\n)(Human|Assistant):")
# Already-rewritten text: "###Human:" / "###Assistant:".
_HASH_SPLIT = re.compile(r"###(Human|Assistant):")

Turn = tuple[str, str]


def normalize_newlines(text: str) -> str:
    """Windows (``\\r\\n``) and old Mac (``\\r``) line ends as ``\\n``, so their turn markers are found."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def has_turn_markers(text: str) -> bool:
    """Whether ``text`` holds HH turn markers (raw ``\\n\\nHuman:`` or ``###Human:``), i.e. is HH dialogue text."""
    text = normalize_newlines(text)
    return bool(_HASH_SPLIT.search(text) or _RAW_SPLIT.search(text))


def rewrite_markers(text: str) -> str:
    """Rewrite raw HH markers to the card's ``###`` markers, with hhrm's spacing rule."""
    return render_turns(parse_turns(text))


def parse_turns(text: str) -> list[Turn]:
    """Split a dialogue (raw ``\\n\\nHuman:`` or ``###Human:`` form) into ``(role, text)`` turns.

    Text before the first marker is ignored when blank and raises otherwise, so a malformed row is
    reported rather than silently rewritten.
    """
    pattern = _HASH_SPLIT if "###Human:" in text or "###Assistant:" in text else _RAW_SPLIT
    parts = pattern.split(text)
    head, rest = parts[0], parts[1:]
    if head.strip():
        raise ValueError(f"text before the first turn marker: {head[:60]!r}")
    return [(rest[i], rest[i + 1].strip()) for i in range(0, len(rest), 2)]


def render_turns(turns: list[Turn]) -> str:
    """Render turns in the ``###`` format: ``"###Human: q ###Assistant: a"``."""
    return " ".join(f"{ROLES[role]} {text}" if text else ROLES[role] for role, text in turns)


def split_prompt_response(text: str) -> tuple[str, str]:
    """Cut a dialogue into ``(prompt, response)`` at its final Assistant turn.

    Raises ``ValueError`` if the last turn is not an Assistant turn.
    """
    turns = parse_turns(text)
    if not turns or turns[-1][0] != "Assistant":
        raise ValueError("dialogue does not end with an Assistant turn")
    return make_prompt(turns[:-1]), make_response(turns[-1][1])


def make_prompt(context: list[Turn]) -> str:
    """The prompt for the next Assistant answer after ``context``."""
    return render_turns([*context, ("Assistant", "")])


def make_response(answer: str) -> str:
    """A final answer in the form that follows a prompt: one leading space, stripped."""
    return " " + answer.strip()


def cut_at_next_turn(response: str) -> str:
    """Keep a generated response up to the next turn marker (the model starting a new turn)."""
    cut = len(response)
    for marker in (HUMAN, ASSISTANT, "\n\nHuman:", "\n\nAssistant:"):
        pos = response.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    return response[:cut].rstrip()


def last_human_turn(prompt: str) -> str:
    """The text of the last Human turn of a prompt (what the final answer must address)."""
    humans = [text for role, text in parse_turns(prompt) if role == "Human"]
    if not humans:
        raise ValueError("prompt has no Human turn")
    return humans[-1]
