"""The reward server's request protocol: what ``POST /score`` and ``POST /get_reward`` accept, and every refusal.

Pure functions of the request body and the reward tokenizer (no server, no model), so the HTTP process checks and
tokenizes each request alone before it is queued: a bad request is answered 4xx with ``{"error": "<one line>"}``
and never joins a batch. Texts are tokenized once, by :func:`hhrm.scoring.encode` (text + EOS, the tokenizer's own
special tokens kept), and the model process scores those ids.

* ``/score``: ``{"prompts": [str], "responses": [str]}``, as many of each; the text is ``prompt + response``.
* ``/get_reward`` (OpenRLHF's remote reward protocol): ``{"query": [str], "prompts": [str] (optional)}``; each query
  is a full prompt + response text; pad and EOS strings are stripped from its ends and one EOS appended.

Statuses: 400 for a body that is not a JSON object, a missing/empty/non-string list, mismatched counts or a text
that cannot be tokenized; 413 for a request over ``max_texts_per_request`` texts or a text over ``max_length``
tokens (and LitServe's own 413 for a body over ``max_request_bytes``); 500 if the model process fails on a batch,
504 if a request waited in LitServe's queue over ``request_timeout``.

Also here: the ``GET /stats`` summary, the port check, and a standard-library JSON client (``request_json``).
"""

from __future__ import annotations

import json
import pickle
import socket
import urllib.error
import urllib.request
from typing import Any

from hhrm import scoring

TEXT_RULE = (
    "reward of text + EOS (EOS appended unless the text ends with it), tokenized by the reward tokenizer's own "
    "__call__ (its special tokens kept), read at that EOS; /score's text is prompt + response; /get_reward strips "
    "pad/EOS strings from both ends of each query first"
)
# What the model process counts (a shared array; GET /stats)
STATS = ("model_calls", "requests", "texts", "forwards", "tokens", "padded_tokens", "predict_seconds", "max_requests")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(message.split())


def load_object(body: bytes) -> dict:
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


def score_texts(data: dict, limit: int, tokenizer) -> list[str]:
    """``POST /score``: prompt + response of each pair."""
    prompts, responses = string_list(data, "prompts", limit), string_list(data, "responses", limit)
    if len(prompts) != len(responses):
        raise RequestError(400, f"{len(prompts)} prompts but {len(responses)} responses: one response per prompt")
    return [p + r for p, r in zip(prompts, responses)]


def get_reward_texts(data: dict, limit: int, tokenizer) -> list[str]:
    """``POST /get_reward`` (OpenRLHF): each query with pad/EOS strings stripped from both ends (EOS re-appended by
    :func:`hhrm.scoring.encode`)."""
    queries = string_list(data, "query", limit)
    if data.get("prompts") is not None and len(string_list(data, "prompts", limit)) != len(queries):
        raise RequestError(400, f"{len(data['prompts'])} prompts but {len(queries)} queries: one prompt per query")
    return [strip_special(q, (tokenizer.pad_token, tokenizer.eos_token)) for q in queries]


def strip_special(text: str, tokens: tuple[str, ...]) -> str:
    """``text`` without the given token strings at either end (repeatedly)."""
    tokens = tuple(t for t in tokens if t)
    while True:
        before = text
        for t in tokens:
            text = text.removeprefix(t).removesuffix(t)
        if text == before:
            return text


def encode_checked(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """The one tokenization (:func:`hhrm.scoring.encode`), refusing texts over ``max_length`` tokens."""
    try:
        ids = scoring.encode(tokenizer, texts)
    except (TypeError, ValueError) as err:  # e.g. a lone surrogate (\\ud800) that UTF-8 cannot encode
        raise RequestError(400, f"a text cannot be tokenized ({type(err).__name__}: {str(err)[:200]})") from None
    long = [(i, len(x)) for i, x in enumerate(ids) if len(x) > max_length]
    if long:
        i, n = long[0]
        raise RequestError(
            413, f"text {i} is {n} tokens (text + EOS), over max_length={max_length} ({len(long)} texts over it)"
        )
    return ids


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
# Sockets, and the small client the tests and the bench use (standard library only)


def request_json(url: str, payload: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    """``(status, decoded JSON or text)`` of a GET (``payload`` None) or a JSON POST; HTTP errors are returned."""
    data = None if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
