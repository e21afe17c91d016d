"""Input formats -> messages -> the one text rule, bad rows named by reason.

Every input row becomes a **context** (a list of ``{"role", "content"}`` messages) and one or two
final assistant **answers**; one :class:`TextRule` then renders ``(context, answer)`` as
``(prompt, response)`` strings with ``prompt + response`` the full text. Every stage (SFT, RM,
evaluation, scoring, RAFT) gets its strings through that rule, so they never disagree.

The formats are one registry, :data:`REGISTRY` (name, the kinds of rows held: ``pairs`` or ``responses``,
i.e. ``{"prompt", "response"}``/TRL's ``{"prompt", "completion"}`` to score; how a row shows it, how it parses),
detected by :func:`detect`; every list of their names (choices, help, messages) is read from it.

* ``raw``: Anthropic's ``{"chosen", "rejected"}`` whole dialogues with ``\\n\\nHuman:`` markers (pairs only);
* ``dahoas``: an HH-marker prompt (``{"prompt", "chosen", "rejected"}``, + ``response``) and the answers;
* ``conversational``: TRL's message lists, ``{"chosen": [...], "rejected": [...]}`` (the shared messages before the
  last are the context) or with an explicit ``"prompt": [...]`` (chosen/rejected hold the assistant message(s));
* ``standard``: TRL's plain strings with an explicit prompt, ``{"prompt", "chosen", "rejected"}``; the
  prompt (no HH markers) is one user message. Without a prompt nothing says where it ends: refused.

Messages are checked (roles user/assistant alternating from user, an optional leading system
message, last message the assistant's); HH-marker text keeps the checks it always had, so its
output is unchanged. Content is stripped and its line ends normalised, as HH turn text always was.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from hhrm import formatting
from hhrm.data_io import is_marker

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
_HH_ROLE = {"user": "Human", "assistant": "Assistant"}
_MESSAGE_ROLE = {"Human": "user", "Assistant": "assistant"}


class BadRow(ValueError):
    """A row that cannot be normalised; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = "", where: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.where = where  # a row id better than the row's position (``file:line``), if any


# --------------------------------------------------------------------------------------------
# The text rule


class TextRule:
    """How ``(context messages, answer)`` become ``(prompt, response)``, ``prompt + response`` the full text.

    Without a tokenizer: the card's ``###Human:`` / ``###Assistant:`` format (:mod:`hhrm.formatting`).
    With one: its chat template, prompt = the context with the generation prompt, response = the full
    conversation's rendering minus that prompt. A leading BOS string is dropped from the prompt when the
    tokenizer's own ``__call__`` adds BOS (scoring.encode keeps the tokenizer's special tokens: one BOS).
    Build it with :func:`text_rule`.
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.bos = _added_bos(tokenizer) if tokenizer is not None else None
        self._cached: tuple[tuple, str] | None = None  # (context, prompt): pairs render one context twice

    @property
    def name(self) -> str:
        return "chat_template" if self.tokenizer is not None else "hh"

    def render(self, context: list[Message], answer: str) -> tuple[str, str]:
        """``(prompt, response)``; raises :class:`BadRow` for what this rule cannot render."""
        if self.tokenizer is None:
            return self._render_hh(context, answer)
        key = tuple((m["role"], m["content"]) for m in context)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._template(context, add_generation_prompt=True))
        prompt = self._cached[1]
        full = self._template([*context, {"role": "assistant", "content": answer}])
        if not full.startswith(prompt):
            raise BadRow("template_prefix_mismatch", f"full text does not start with the prompt {prompt[-60:]!r}")
        response = full[len(prompt) :]
        if self.bos and prompt.startswith(self.bos):
            prompt = prompt[len(self.bos) :]
        return prompt, response

    @staticmethod
    def _render_hh(context: list[Message], answer: str) -> tuple[str, str]:
        turns = []
        for m in context:
            if m["role"] == "system":
                raise BadRow("system_message", "the ### format has no system turn; set use_chat_template=true")
            turns.append((_HH_ROLE[m["role"]], m["content"]))
        return formatting.make_prompt(turns), formatting.make_response(answer)

    def _template(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # a template may raise anything (jinja's raise_exception, TypeError...): a bad row
            raise BadRow("template_failed", f"{type(e).__name__}: {e}") from None


HH_RULE = TextRule()


def _added_bos(tokenizer) -> str | None:
    """The BOS string if the tokenizer's ordinary ``__call__`` prepends BOS itself (LLaMA), else ``None``."""
    if tokenizer.bos_token is None or tokenizer.bos_token_id is None:
        return None
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else None


def text_rule(args: Any, tokenizer=None) -> TextRule:
    """The rule for ``args.use_chat_template`` (a :class:`hhrm.data.DataArguments`): built once, used by every stage.

    ``use_chat_template`` needs the tokenizer, and one with a ``chat_template``: refused otherwise.
    """
    if not getattr(args, "use_chat_template", False):
        return HH_RULE
    if tokenizer is None:
        raise ValueError(
            "use_chat_template=true renders text with the tokenizer's chat template, but no tokenizer was given: "
            "pass it (load_splits(args, tokenizer)), or set use_chat_template=false for the ###Human:/###Assistant: "
            "format"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"use_chat_template=true, but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
            f"chat_template: use a tokenizer that has one (or set tokenizer.chat_template), or set "
            f"use_chat_template=false for the ###Human:/###Assistant: format"
        )
    return TextRule(tokenizer)


# --------------------------------------------------------------------------------------------
# Rows -> (context, answers)


def require_str(row: dict[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        raise BadRow("missing_field", key)
    text = row[key]
    if not isinstance(text, str):
        raise BadRow("not_string", f"{key} is {type(text).__name__}")
    return formatting.normalize_newlines(text)


def _hh_dialogue(text: str, which: str) -> tuple[list[Message], str]:
    """An HH-marker dialogue -> context messages and the final answer."""
    try:
        turns = formatting.parse_turns(text)
    except ValueError as e:
        raise BadRow("malformed_dialogue", f"{which}: {e}") from None
    if not turns or turns[-1][0] != "Assistant":
        raise BadRow("no_assistant_turn", which)
    return _messages_of(turns[:-1]), turns[-1][1]


def _hh_prompt(prompt: str) -> list[Message]:
    """Context of an HH-marker prompt, which must end with an empty Assistant turn."""
    try:
        turns = formatting.parse_turns(prompt)
    except ValueError as e:
        raise BadRow("malformed_dialogue", f"prompt: {e}") from None
    if not turns or turns[-1] != ("Assistant", ""):
        raise BadRow("no_assistant_turn", "prompt does not end with 'Assistant:'")
    return _messages_of(turns[:-1])


def _messages_of(turns: list[formatting.Turn]) -> list[Message]:
    return [{"role": _MESSAGE_ROLE[role], "content": text} for role, text in turns]


def _message(m: Any, where: str) -> Message:
    if not isinstance(m, dict):
        raise BadRow("not_a_message", f"{where} is {type(m).__name__}")
    if m.get("role") is None:
        raise BadRow("missing_role", where)
    if m.get("content") is None:
        raise BadRow("missing_content", where)
    if not isinstance(m["content"], str):
        raise BadRow("content_not_string", f"{where}.content is {type(m['content']).__name__}")
    if m["role"] not in ROLES:
        raise BadRow("unsupported_role", f"{where}.role is {m['role']!r}")
    return {"role": m["role"], "content": formatting.normalize_newlines(m["content"]).strip()}


def _message_list(value: Any, key: str) -> list[Message]:
    if value is None:
        raise BadRow("missing_field", key)
    if not isinstance(value, list):
        raise BadRow("not_a_list", f"{key} is {type(value).__name__}")
    if not value:
        raise BadRow("empty_messages", key)
    return [_message(m, f"{key}[{i}]") for i, m in enumerate(value)]


def _conversation(messages: list[Message], which: str) -> tuple[list[Message], str]:
    """Context and final answer of a checked conversation: [system], user, assistant, user, ..., assistant."""
    if messages[-1]["role"] != "assistant":
        raise BadRow("no_assistant_turn", f"{which} ends with a {messages[-1]['role']} message")
    start = 1 if messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != want:
            raise BadRow("non_alternating", f"{which}[{i}] is {messages[i]['role']}, expected {want}")
    return messages[:-1], messages[-1]["content"]


def _raw_pair(row: dict[str, Any]) -> tuple[list[Message], str, str]:
    chosen, rejected = require_str(row, "chosen"), require_str(row, "rejected")
    context, chosen = _hh_dialogue(chosen, "chosen")
    rejected_context, rejected = _hh_dialogue(rejected, "rejected")
    if context != rejected_context:
        raise BadRow("prompt_mismatch", "chosen and rejected differ before the final answer")
    return context, chosen, rejected


def _conversational_pair(row: dict[str, Any]) -> tuple[list[Message], str, str]:
    prompt = _message_list(row["prompt"], "prompt") if row.get("prompt") is not None else []
    chosen = _conversation([*prompt, *_message_list(row.get("chosen"), "chosen")], "chosen")
    rejected = _conversation([*prompt, *_message_list(row.get("rejected"), "rejected")], "rejected")
    if chosen[0] != rejected[0]:
        raise BadRow("prompt_mismatch", "chosen and rejected differ before the final answer")
    return chosen[0], chosen[1], rejected[1]


def _answer_key(row: dict[str, Any]) -> str:
    return "completion" if "response" not in row and "completion" in row else "response"


def _conversational_response(row: dict[str, Any]) -> tuple[list[Message], str]:
    key, prompt = _answer_key(row), _message_list(row.get("prompt"), "prompt")
    answer = row.get(key)
    if isinstance(answer, str):  # a generated answer beside a message-list prompt
        return _conversation([*prompt, {"role": "assistant", "content": require_str(row, key).strip()}], key)
    return _conversation([*prompt, *_message_list(answer, key)], key)


def _string_prompt(context_of: Callable[[str], list[Message]]) -> dict[str, Callable]:
    """The parsers of a format with a string prompt, whose context is ``context_of(prompt)``."""

    def pair(row: dict[str, Any]) -> tuple[list[Message], str, str]:
        chosen, rejected = require_str(row, "chosen"), require_str(row, "rejected")
        return context_of(require_str(row, "prompt")), chosen.strip(), rejected.strip()

    def response(row: dict[str, Any]) -> tuple[list[Message], str]:
        prompt, answer = require_str(row, "prompt"), require_str(row, _answer_key(row)).strip()
        return context_of(prompt), answer

    return {"pairs": pair, "responses": response}


def pair_parts(row: dict[str, Any], fmt: str) -> tuple[list[Message], str, str]:
    """``(context, chosen answer, rejected answer)`` of one preference row; raises :class:`BadRow`."""
    return by_name(fmt, "pairs").parse["pairs"](row)


def completion_parts(row: dict[str, Any], fmt: str) -> tuple[list[Message], str]:
    """``(context, answer)`` of one prompt/response (or prompt/completion) row; raises :class:`BadRow`."""
    return by_name(fmt, "responses").parse["responses"](row)


def check_answers(context: list[Message], *answers: str) -> None:
    """What every row needs whatever its format: a user turn to answer, non-empty and different answers."""
    if not any(m["role"] == "user" for m in context):
        raise BadRow("no_human_turn")
    if not all(answers):
        which = ("chosen" if not answers[0] else "rejected") if len(answers) == 2 else "response"
        raise BadRow("empty_response", which)
    if len(answers) == 2 and answers[0] == answers[1]:
        raise BadRow("identical_responses")


# --------------------------------------------------------------------------------------------
# The registry and the one detection


@dataclass(frozen=True)
class Format:
    """One input format: name, help summary, whether a row's ``(prompt, answers)`` show it, a parser per row kind."""

    name: str
    summary: str
    shows: Callable[[Any, tuple[Any, ...]], bool]
    parse: dict[str, Callable[[dict[str, Any]], tuple]]


def _lists(prompt: Any, answers: tuple[Any, ...]) -> bool:
    return any(isinstance(v, list) for v in (prompt, *answers))


def _marked(text: Any) -> bool:
    return isinstance(text, str) and formatting.has_turn_markers(text)


# The tests are exclusive, so a row shows at most one format: message lists anywhere are conversational; else a
# string prompt is dahoas (HH markers) or standard (none); else answers with markers are raw dialogues.
REGISTRY = (
    Format(
        "raw",
        "Anthropic's whole dialogues",
        lambda p, a: not _lists(p, a) and not isinstance(p, str) and any(map(_marked, a)),
        {"pairs": _raw_pair},
    ),
    Format(
        "dahoas",
        "HH-marker prompt + answers",
        lambda p, a: not _lists(p, a) and _marked(p),
        _string_prompt(_hh_prompt),
    ),
    Format(
        "conversational",
        "TRL's message lists (prompt implicit or explicit)",
        _lists,
        {"pairs": _conversational_pair, "responses": _conversational_response},
    ),
    Format(
        "standard",
        "TRL's plain strings with a plain-text prompt",
        lambda p, a: not _lists(p, a) and isinstance(p, str) and not _marked(p),
        _string_prompt(lambda prompt: [{"role": "user", "content": prompt.strip()}]),
    ),
)
KINDS = ("pairs", "responses")


def names(kind: str) -> tuple[str, ...]:
    """The formats that hold ``kind`` rows, in registry order."""
    return tuple(f.name for f in REGISTRY if kind in f.parse)


def choices(kind: str = "pairs") -> tuple[str, ...]:
    """What ``dataset_format`` accepts for ``kind`` rows: ``auto`` (detect) and the formats' names."""
    return ("auto", *names(kind))


def by_name(fmt: str, kind: str) -> Format:
    """The format ``fmt`` for ``kind`` rows; refused, naming the choices, when it holds no such rows."""
    found = next((f for f in REGISTRY if f.name == fmt and kind in f.parse), None)
    if found is None:
        raise ValueError(f"dataset_format={fmt!r}: expected one of {choices(kind)}")
    return found


# What detection says when no row shows a format of the kind, before the choices.
_UNDETECTED = {
    "pairs": "the dataset format from {found}: expected chosen/rejected (+ prompt); check dataset_name, or state the "
    "schema",
    "responses": "the completion format from {found}: expected prompt + response (or completion); check the input, "
    "or state it",
}


def _objects(rows: Iterable[Any], limit: int) -> Iterator[dict[str, Any]]:
    """The first ``limit`` rows that are JSON objects (not marker rows)."""
    return itertools.islice((row for row in rows if isinstance(row, dict) and not is_marker(row)), limit)


def detect(rows: Iterable[Any], kind: str = "pairs", limit: int = 100) -> str:
    """The format of ``kind`` rows (``pairs`` | ``responses``): the one the first object row that shows one shows.

    Only JSON objects count (the first ``limit``): other rows are counted as bad rows later. Pairs with plain-string
    chosen/rejected and neither a prompt nor markers (TRL's implicit prompt) give no prompt: refused. Pair columns
    whose values show no format (nulls, numbers) get ``dahoas`` (with a prompt column) or ``raw``: bad rows later.
    """
    formats = [f for f in REGISTRY if kind in f.parse]
    first_keys: list[str] | None = None
    fallback = implicit = None
    for row in _objects(rows, limit):
        prompt, answers = row.get("prompt"), (row.get("chosen"), row.get("rejected"))
        if kind == "responses":
            answers = (row.get("response", row.get("completion")),)
        if found := next((f.name for f in formats if f.shows(prompt, answers)), None):
            return found
        if kind == "pairs":
            implicit = implicit or any(isinstance(t, str) for t in answers)
            if fallback is None and ("prompt" in row or "chosen" in row or "rejected" in row):
                fallback = "dahoas" if "prompt" in row else "raw"
        first_keys = sorted(map(str, row)) if first_keys is None else first_keys
    if implicit:
        raise ValueError(
            "dataset_format: chosen/rejected are plain strings with no prompt column and no Human:/Assistant: "
            "markers (TRL's standard implicit-prompt format), so nothing says where the prompt ends: add a prompt "
            "column (dataset_format=standard) or write the rows as message lists (dataset_format=conversational)"
        )
    if fallback:
        return fallback
    found = f"columns {first_keys}" if first_keys is not None else "no row that is a JSON object"
    raise ValueError(
        f"cannot detect {_UNDETECTED[kind].format(found=found)} with dataset_format={'|'.join(names(kind))}"
    )
