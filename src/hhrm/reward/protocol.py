"""The reward server's request protocol: what ``POST /score`` and ``POST /get_reward`` accept, and every refusal.

Pure functions of the request body and the reward tokenizer (no server, no model), so the HTTP process checks and
tokenizes each request alone before it is queued: a bad request is answered 4xx with ``{"error": "<one line>"}``
and never joins a batch. Each (prompt, response) is tokenized once, by the server's reward convention
(:func:`hhrm.reward.conventions.encode_full`: hhrm's is text + EOS, the tokenizer's own special tokens kept), and the
model process scores those ids (and a text pair's token type ids) with ``RewardScorer`` under the same convention.

* ``/score``: ``{"prompts": [str], "responses": [str]}``, as many of each; answered by :func:`score_body`.
* ``/get_reward`` (OpenRLHF's remote reward protocol): ``{"query": [str], "prompts": [str] (optional)}``; each query
  is a full prompt + response text, pad and EOS strings stripped from its ends. A convention that concatenates
  (``text="concat"``, hhrm's) scores the query as the text; one that needs the prompt apart (a chat template, a text
  pair) splits each query after its prompt, so ``prompts`` is required there and each query must start with its own.
  Answered by :func:`get_reward_body` (an ensemble's uncertainty goes in ``extra_logs``).

What a request may cost is bounded before any work that grows with it (:class:`Limits`, fixed at start):

* the body: at most ``max_request_bytes`` (413; by default :func:`default_request_bytes`, what
  ``max_texts_per_request`` texts at the character cap need), read only as far as that;
* its JSON outside strings (brackets, commas, numbers, keys): at most :func:`structure_cap` bytes (413), checked
  before decoding, so decoding costs a small multiple of the body (each string at most 4 bytes a character, plus a
  bounded number of small objects) whatever the body holds;
* each text: at most ``max_length`` x the longest token in characters (:func:`text_char_cap`; 413 naming
  ``max_length``), checked before tokenizing: a text over it cannot fit ``max_length`` tokens, so no text that fits
  is refused, and a megabyte text is never tokenized;
* then ``max_texts_per_request`` texts (413) and ``max_length`` tokens a text, text + EOS (413).

Statuses: 400 for a body that is not a JSON object, a missing/empty/non-string list, mismatched counts or a text
that cannot be tokenized; 413 for the limits above; 500 if the model process fails on a batch; 503 once the model
process or LitServe's queue is gone (:mod:`hhrm.reward.watch`); 504 if a request got no answer within
``request_timeout``.

Also here: the ``GET /stats`` summary and the port check. (A server in a subprocess for the tests and the bench, and
their JSON client, are ``bench/servers.py``: not library.)
"""

from __future__ import annotations

import json
import pickle
import re
import socket
from dataclasses import dataclass
from typing import Any

from hhrm.reward import conventions

TEXT_RULE = (
    "reward of text + EOS (EOS appended unless the text ends with it), tokenized by the reward tokenizer's own "
    "__call__ (its special tokens kept), read at that EOS; /score's text is prompt + response; /get_reward strips "
    "pad/EOS strings from both ends of each query first"
)  # hhrm's convention; another convention's rule is text_rule(convention)
# What the model process counts (a shared array; GET /stats)
STATS = ("model_calls", "requests", "texts", "forwards", "tokens", "padded_tokens", "predict_seconds", "max_requests")
MAX_DEFAULT_REQUEST_BYTES = 32 * 2**20  # the derived default body limit never exceeds this
ESCAPED_BYTES_PER_CHAR = 6  # JSON's \uXXXX, what json.dumps writes for each non-ASCII character by default
STRUCTURE_BYTES_PER_TEXT = (
    256  # JSON outside strings a text may bring: its quotes and comma in up to 4 lists, indented
)
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # linear: its two parts never overlap


@dataclass(frozen=True)
class Limits:
    """What one request may hold, fixed at start (:func:`limits`); ``/info`` shows them."""

    max_texts_per_request: int
    max_length: int
    token_chars: int  # the longest token in characters (x 4 where the tokenizer normalizes)
    max_text_chars: int  # max_length x token_chars
    max_request_bytes: int
    max_structure_bytes: int


def text_char_cap(tokenizer, max_length: int) -> tuple[int, int]:
    """``(max_length x c, c)``: c bounds the characters one token can stand for, so a text of more characters than
    the cap has more than ``max_length`` tokens. c is the longest vocabulary entry (special tokens included): a
    byte-level BPE entry has one character per byte, which is at least one text character, and a SentencePiece
    piece one character per character. A tokenizer with a normalizer may first merge characters (Unicode
    composition joins at most 4 into one), so c is 4 times that there."""
    longest = max(map(len, tokenizer.get_vocab()))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    per_token = longest * (1 if backend is not None and backend.normalizer is None else 4)
    return max_length * per_token, per_token


def default_request_bytes(max_texts: int, max_text_chars: int) -> int:
    """The body a request of ``max_texts`` texts of ``max_text_chars`` characters needs, every character
    JSON-escaped, plus 64 KiB; at most 32 MiB (the bound before it was derived)."""
    return min(max_texts * max_text_chars * ESCAPED_BYTES_PER_CHAR + 2**16, MAX_DEFAULT_REQUEST_BYTES)


def structure_cap(max_texts: int) -> int:
    """Bytes of JSON outside strings a body may hold: what ``max_texts`` texts' lists need, plus 64 KiB for keys."""
    return max_texts * STRUCTURE_BYTES_PER_TEXT + 2**16


def limits(tokenizer, max_length: int, max_texts: int, max_request_bytes: int | None) -> Limits:
    """The request limits of a server; ``max_request_bytes`` None: :func:`default_request_bytes`."""
    cap, per_token = text_char_cap(tokenizer, max_length)
    body = max_request_bytes or default_request_bytes(max_texts, cap)
    return Limits(max_texts, max_length, per_token, cap, body, structure_cap(max_texts))


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(message.split())


def load_object(body: bytes, max_structure: int | None = None) -> dict:
    """The body's JSON object, refused first (413) if its JSON outside strings is over ``max_structure`` bytes, so
    no body decodes into many more objects than it has bytes."""
    if max_structure is not None:
        structure = len(JSON_STRING.sub(b"", body))
        if structure > max_structure:
            raise RequestError(
                413,
                f"the body has {structure} bytes of JSON outside strings, over the {max_structure} that "
                "max_texts_per_request texts need: send lists of strings",
            )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, f"the body is not JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


def string_list(data: dict, key: str, limit: int) -> list[str]:
    """``data[key]``: a non-empty list of at most ``limit`` strings."""
    value = data.get(key)
    if not isinstance(value, list) or not value:
        got = "missing" if key not in data else f"{type(value).__name__} {json.dumps(value)[:60]}"
        raise RequestError(400, f'"{key}" must be a non-empty list of strings, got {got}')
    if len(value) > limit:
        raise RequestError(413, f'"{key}" has {len(value)} texts, over max_texts_per_request={limit}')
    wrong = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
    if wrong is not None:
        raise RequestError(400, f'"{key}"[{wrong}] is {type(value[wrong]).__name__}, not a string')
    return value


def text_rule(convention: conventions.Convention) -> str:
    """What ``GET /info`` says the server scores: hhrm's :data:`TEXT_RULE`, or the convention's fields."""
    if convention == conventions.HHRM:
        return TEXT_RULE
    c = convention
    return (
        f"reward_convention={c.name}: text={c.text}, eos={c.eos}, add_special_tokens={c.add_special_tokens}, "
        f"dedup_bos={c.dedup_bos}, read_at={c.read_at}, activation={c.activation}, max_length={c.max_length} "
        "(hhrm.reward.conventions); /score takes (prompt, response); /get_reward strips pad/EOS strings from both "
        "ends of each query first"
        + ("" if c.text == "concat" else ', then splits it after its prompt ("prompts" required)')
    )


Pairs = tuple[list[str], list[str]]


def score_pairs(data: dict, limit: int, tokenizer, convention: conventions.Convention) -> Pairs:
    """``POST /score``: the (prompt, response) pairs."""
    prompts, responses = string_list(data, "prompts", limit), string_list(data, "responses", limit)
    if len(prompts) != len(responses):
        raise RequestError(400, f"{len(prompts)} prompts but {len(responses)} responses: one response per prompt")
    return prompts, responses


def get_reward_pairs(data: dict, limit: int, tokenizer, convention: conventions.Convention) -> Pairs:
    """``POST /get_reward`` (OpenRLHF): each query with pad/EOS strings stripped from both ends. A concatenating
    convention scores it as the text (hhrm's re-appends the EOS); one that needs the prompt apart gets the query cut
    after its prompt (sent in ``prompts``, pad/EOS stripped too)."""
    queries = string_list(data, "query", limit)
    given = data.get("prompts") is not None
    prompts = string_list(data, "prompts", limit) if given else []
    if given and len(prompts) != len(queries):
        raise RequestError(400, f"{len(prompts)} prompts but {len(queries)} queries: one prompt per query")
    special = (tokenizer.pad_token, tokenizer.eos_token)
    queries = [strip_special(q, special) for q in queries]
    if convention.text == "concat":
        return [""] * len(queries), queries
    where = f"reward_convention={convention.name!r} (text={convention.text})"
    if not given:
        raise RequestError(
            400, f"{where} needs each query's prompt apart: send \"prompts\" (each query starting with its prompt), "
            "or use POST /score",
        )  # fmt: skip
    prompts = [strip_special(p, special) for p in prompts]
    wrong = next((i for i, (p, q) in enumerate(zip(prompts, queries)) if not q.startswith(p)), None)
    if wrong is not None:
        raise RequestError(400, f"query {wrong} does not start with its prompt: {where} splits each query after it")
    return prompts, [q[len(p) :] for p, q in zip(prompts, queries)]


# /get_reward's extra_logs from a source with members: per text, as OpenRLHF logs each extra_logs list per sample
EXTRA_LOGS = ["dummy_scores", "reward_mean", "reward_std"]


def score_body(scored: list[float] | dict) -> dict[str, Any]:
    """``POST /score``'s answer: ``rewards``; from a source with members (its summary) also ``mean``, ``std`` and
    ``members`` (E rewards) per text."""
    if not isinstance(scored, dict):
        return {"rewards": scored}
    return {"rewards": scored["reward"], "mean": scored["mean"], "std": scored["std"], "members": scored["members"]}


def get_reward_body(scored: list[float] | dict) -> dict[str, Any]:
    """``POST /get_reward``'s answer, OpenRLHF's fields; a source with members adds its per-text ``reward_mean`` and
    ``reward_std`` to ``extra_logs`` (which OpenRLHF's client passes through to its logs)."""
    rewards = scored["reward"] if isinstance(scored, dict) else scored
    extra: dict[str, Any] = {"dummy_scores": rewards}
    if isinstance(scored, dict):
        extra |= {"reward_mean": scored["mean"], "reward_std": scored["std"]}
    return {"rewards": rewards, "scores": rewards, "extra_logs": extra}


def strip_special(text: str, tokens: tuple[str, ...]) -> str:
    """``text`` without the given token strings at either end (repeatedly; in time linear in what is stripped, one
    copy at the end: a query of a million pads costs no more than its length)."""
    tokens = tuple(t for t in tokens if t)
    start, end, moved = 0, len(text), True
    while moved:
        moved = False
        for t in tokens:
            while text.startswith(t, start, end):
                start, moved = start + len(t), True
            while end - start >= len(t) and text.endswith(t, start, end):
                end, moved = end - len(t), True
    return text[start:end]


def check_chars(texts: list, limits: Limits) -> list:
    """Refuse (413) a text (or a text pair, its two sides together) over ``limits.max_text_chars`` characters before
    it is tokenized: it cannot fit ``max_length`` tokens."""
    sizes = [len(t) if isinstance(t, str) else sum(map(len, t)) for t in texts]
    long = [(i, n) for i, n in enumerate(sizes) if n > limits.max_text_chars]
    if long:
        i, n = long[0]
        raise RequestError(
            413,
            f"text {i} is {n} characters, over max_length={limits.max_length} tokens x {limits.token_chars} "
            f"characters a token at most = {limits.max_text_chars} ({len(long)} texts over it; refused before "
            "tokenizing)",
        )
    return texts


def encode_checked(tokenizer, pairs: Pairs, convention: conventions.Convention, limits: Limits) -> tuple:
    """``(ids, token type ids or None)`` of the pairs by the convention (:func:`conventions.encode_full`, in two steps
    so that each text's characters are checked before it is tokenized), refusing texts over ``max_length`` tokens."""
    try:
        texts = check_chars(conventions.texts(tokenizer, *pairs, convention), limits)
        ids, types = conventions.tokenize(tokenizer, texts, convention)
    except (TypeError, ValueError) as err:  # e.g. a lone surrogate (\\ud800) that UTF-8 cannot encode
        raise RequestError(400, f"a text cannot be tokenized ({type(err).__name__}: {str(err)[:200]})") from None
    long = [(i, len(x)) for i, x in enumerate(ids) if len(x) > limits.max_length]
    if long:
        (i, n), how = long[0], "text + EOS" if convention == conventions.HHRM else f"as {convention.name} encodes it"
        raise RequestError(
            413, f"text {i} is {n} tokens ({how}), over max_length={limits.max_length} ({len(long)} texts over it)"
        )
    return ids, types


def worker_error(response: Any) -> RequestError:
    """A model-process failure as LitServe returns it (a pickled exception, an HTTPException) -> its status."""
    if isinstance(response, bytes):
        try:
            response = pickle.loads(response)
        except Exception:  # an exception that does not unpickle: still a server error
            response = None
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and status >= 400:
        return RequestError(status, str(getattr(response, "detail", "")) or "error")
    return RequestError(500, "the model process failed on this batch (see the server log)")


def stats_summary(stats) -> dict[str, Any]:
    """The counters, and what a batch held on average: requests and texts per model call, texts per forward."""
    values = dict(zip(STATS, stats[:]))
    out: dict[str, Any] = {k: (round(v, 3) if k == "predict_seconds" else int(v)) for k, v in values.items()}
    calls, forwards = values["model_calls"], values["forwards"]
    out["requests_per_model_call"] = round(values["requests"] / calls, 3) if calls else None
    out["texts_per_model_call"] = round(values["texts"] / calls, 3) if calls else None
    out["texts_per_forward"] = round(values["texts"] / forwards, 3) if forwards else None
    out["padding_share"] = round(1 - values["tokens"] / values["padded_tokens"], 4) if forwards else None
    return out


# --------------------------------------------------------------------------------------------
# The port check


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port another program holds (uvicorn would log it and exit after the model loaded)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConnectionError(
                f"port={port} on {host}: cannot listen there ({err.strerror}); choose another --port"
            ) from None
