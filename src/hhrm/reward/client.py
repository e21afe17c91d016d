"""HTTP clients of reward servers: each is a reward source (:mod:`hhrm.reward.sources`) whose model runs elsewhere.

- :class:`HhrmServer`: hhrm's own server (``make serve-rm``), ``POST /score``; it scores with ``RewardScorer`` under
  the convention it was started with, so the rewards are the in-process ones.
- :class:`OpenRLHFServer`: any server speaking OpenRLHF's ``POST /get_reward`` (``{"query": [prompt + response]}``
  -> ``{"rewards": [...]}``); it applies its own convention to the text it gets.
- :class:`VLLMServer`: a vLLM-served sequence classifier, ``POST /classify`` or ``/pooling`` with the raw logit
  (``use_activation: false``, as verl asks). vLLM reads the true last token of what it is sent, so hhrm builds the
  token ids here by the reward model's convention (its tokenizer: the folder vLLM serves) and sends the ids.

Transport failures (refused connection, timeout, a 5xx answer) are retried ``retries`` times with a growing
pause; then the call fails with a ``ConnectionError`` naming the URL, and a RAFT run stopped there resumes at
its scoring stage. A 4xx answer is the server refusing the request: it is not retried, and its one-line error
is raised as a ``ValueError``. Only the standard library is used (urllib), so the clients add no dependency.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from typing import Any

logger = logging.getLogger(__name__)


class HttpSource:
    """What every reward server client shares: the URL, JSON requests with retries, chunked scoring."""

    api = ""  # the reward_api value that builds this client
    resident = True  # nothing to load here: the model is the server's

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 3, batch_size: int = 64, setting=""):
        self.setting = setting or "url"
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{self.setting}={url!r}: expected an http(s):// address, e.g. http://127.0.0.1:8000")
        if timeout <= 0 or retries < 0 or batch_size < 1:
            raise ValueError(
                f"{self.setting}: timeout={timeout} must be > 0, retries={retries} >= 0, batch_size={batch_size} >= 1"
            )
        self.url, self.timeout, self.retries, self.batch_size = url.rstrip("/"), timeout, retries, batch_size

    def describe(self) -> str:
        return f"{self.url} ({self.api})"

    def identity(self) -> dict[str, Any]:
        """What scores, for RAFT's resume check; a server that cannot say which model it serves is its address."""
        return {"api": self.api, "url": self.url}

    def gathered(self):
        return nullcontext()  # the model is not in this process: nothing to gather under ZeRO-3

    def release(self) -> None:
        """Nothing to free here: the model's memory is the server's."""

    def score_pairs(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Reward of each ``(prompt, response)``, in order, ``batch_size`` pairs per request."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rewards: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk_p, chunk_r = prompts[start : start + self.batch_size], responses[start : start + self.batch_size]
            got = self.score_chunk(chunk_p, chunk_r)
            if not isinstance(got, list) or len(got) != len(chunk_p):
                raise ConnectionError(
                    f"{self.setting}={self.url!r}: answered {len(got) if isinstance(got, list) else got!r} rewards "
                    f"for {len(chunk_p)} texts: is reward_api={self.api!r} what this server speaks?"
                )
            rewards += [float(r) for r in got]
        return rewards

    def score_chunk(self, prompts: list[str], responses: list[str]) -> list:
        raise NotImplementedError

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON request, retried on transport errors and 5xx answers; a 4xx answer raises ``ValueError``."""
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt, 30.0))
            req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
            req.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code < 500:
                    raise ValueError(
                        f"{self.setting}={self.url!r}: {method} {path} refused ({e.code}): {detail}"
                    ) from None
                last = f"{e.code} {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            logger.warning(
                "%s %s%s failed (attempt %d of %d): %s", method, self.url, path, attempt + 1, self.retries + 1, last
            )
        raise ConnectionError(
            f"{self.setting}={self.url!r}: {method} {path} failed {self.retries + 1} times ({last}); start the "
            f"reward server (make serve-rm MODEL=... PORT=...) or fix the URL, then re-run: RAFT resumes at the "
            f"stage that failed"
        )


class HhrmServer(HttpSource):
    """hhrm's reward server (``make serve-rm``): ``POST /score``; ``info`` is its ``GET /info``."""

    api = "hhrm"

    def __init__(self, url: str, *args, **kwargs):
        super().__init__(url, *args, **kwargs)
        # LitServe's /info: {"model": hhrm's metadata, "server": ...}. Fails now, naming the URL, if nothing serves.
        self.info: dict[str, Any] = self.request("GET", "/info").get("model") or {}
        if "text_rule" not in self.info:
            raise ConnectionError(
                f"{self.setting}={url!r}: /info does not describe an hhrm reward server ({self.info}); for another "
                "server set reward_api (openrlhf, vllm-classify, vllm-pooling)"
            )
        limit = self.info.get("limits", {}).get("max_texts_per_request")
        self.batch_size = min(self.batch_size, int(limit)) if limit else self.batch_size

    def identity(self) -> dict[str, Any]:
        """What the server serves (its model folder, that folder's weight files, its convention), not where: a run
        resumes against the same model served at another address."""
        keys = ("model_name_or_path", "weights", "max_length", "dtype", "text_rule", "convention")
        extra = ("ensemble",)  # only where served: a single-model server's identity is as it always was
        return (
            {"api": self.api}
            | {k: self.info.get(k) for k in keys}
            | {k: self.info[k] for k in extra if k in self.info}
        )

    @property
    def with_members(self) -> bool:
        """Whether the server answers member rewards (an ensemble: ``make serve-rm`` with ``reward_ensemble``)."""
        return "fields" in self.info

    def score_chunk(self, prompts: list[str], responses: list[str]) -> list:
        return self.request("POST", "/score", {"prompts": prompts, "responses": responses}).get("rewards")

    def score_members(self, prompts: list[str], responses: list[str]) -> dict[str, list]:
        """An ensemble server's ``Ensemble.score_members``: per text ``reward`` (by its rule), ``mean``, ``std`` and
        ``members`` (E rewards), ``batch_size`` pairs per request."""
        if not self.with_members:
            raise ValueError(f"{self.setting}={self.url!r} serves one reward model: it has no member rewards")
        out: dict[str, list] = {"reward": [], "mean": [], "std": [], "members": []}
        for start in range(0, len(prompts), self.batch_size):
            body = {
                "prompts": prompts[start : start + self.batch_size],
                "responses": responses[start : start + self.batch_size],
            }
            got = self.request("POST", "/score", body)
            for key, field in (("reward", "rewards"), ("mean", "mean"), ("std", "std"), ("members", "members")):
                out[key] += got[field]
        return out


class OpenRLHFServer(HttpSource):
    """A server speaking OpenRLHF's ``POST /get_reward``: the full texts in ``query`` (with the prompts beside them,
    as OpenRLHF's client sends), rewards out; the server applies its own convention."""

    api = "openrlhf"

    def score_chunk(self, prompts: list[str], responses: list[str]) -> list:
        body = {"query": [p + r for p, r in zip(prompts, responses)], "prompts": prompts}
        return self.request("POST", "/get_reward", body).get("rewards")


class VLLMServer(HttpSource):
    """A vLLM-served classifier: token ids built here by ``convention`` (with the served model's ``tokenizer``),
    ``POST /classify`` (``data[i].probs[0]``) or ``/pooling`` (``data[i].data``), raw logits, activation here."""

    def __init__(self, url: str, *args, tokenizer, convention, model: str | None = None, endpoint="classify", **kw):
        super().__init__(url, *args, **kw)
        self.api, self.endpoint = f"vllm-{endpoint}", endpoint
        self.tokenizer, self.convention, self.model = tokenizer, convention, model

    def identity(self) -> dict[str, Any]:
        return {"api": self.api, "model": self.model, "convention": self.convention.name}

    def score_chunk(self, prompts: list[str], responses: list[str]) -> list:
        import math

        from hhrm.reward import conventions

        ids = conventions.encode(self.tokenizer, prompts, responses, self.convention)
        body: dict[str, Any] = {"input": ids, "use_activation": False}
        if self.model:
            body["model"] = self.model
        data = self.request("POST", f"/{self.endpoint}", body).get("data")
        if not isinstance(data, list):
            return data
        rows = sorted(data, key=lambda d: d.get("index", 0))
        raw = [r["probs"][0] if self.endpoint == "classify" else _first(r["data"]) for r in rows]
        if self.convention.activation == "sigmoid":
            return [1.0 / (1.0 + math.exp(-x)) for x in raw]
        return raw


def _first(value):
    """The first number of a pooling output (a list for one label, nested for token-level poolers)."""
    while isinstance(value, list):
        value = value[0]
    return value


def _error_text(e: urllib.error.HTTPError) -> str:
    """The server's one-line JSON error (``{"error": ...}`` or FastAPI's ``{"detail": ...}``), else the body."""
    raw = e.read().decode(errors="replace")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return raw.strip()[:300] or e.reason
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body)[:300]
    return str(body)[:300]
