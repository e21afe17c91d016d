"""A client of hhrm's reward-model server (``recipes/serve_rm.py``): the rewards of prompt + response, remotely.

RAFT scores through it when ``reward_model_url`` is set, with the same interface as the in-process
:class:`hhrm.reward.scoring.RewardScorer` (``score_pairs``), so the loop does not care where the model runs. The
server applies the one reward rule (text + EOS, read at the EOS) with ``RewardScorer`` itself, so the rewards
are the in-process ones.

Transport failures (refused connection, timeout, a 5xx answer) are retried ``retries`` times with a growing
pause; then the call fails with a ``ConnectionError`` naming the URL, and a RAFT run stopped there resumes at
its scoring stage. A 4xx answer is the server refusing the request: it is not retried, and its one-line error
is raised as a ``ValueError``. Only the standard library is used (urllib), so the client adds no dependency.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

logger = logging.getLogger(__name__)


class RemoteRewardScorer:
    """``score_pairs(prompts, responses)`` through ``POST <url>/score``; ``info`` is the server's ``GET /info``."""

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        retries: int = 3,
        batch_size: int = 64,
        setting: str = "reward_model_url",
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{setting}={url!r}: expected an http(s):// address, e.g. http://127.0.0.1:8000")
        if timeout <= 0 or retries < 0 or batch_size < 1:
            raise ValueError(f"{setting}: timeout={timeout} must be > 0, retries={retries} >= 0, batch_size >= 1")
        self.url, self.timeout, self.retries, self.setting = url.rstrip("/"), timeout, retries, setting
        # LitServe's /info: {"model": hhrm's metadata, "server": ...}. Fails now, naming the URL, if nothing serves.
        self.info: dict[str, Any] = self.request("GET", "/info").get("model") or {}
        if "text_rule" not in self.info:
            raise ConnectionError(f"{setting}={url!r}: /info does not describe an hhrm reward server ({self.info})")
        limit = self.info.get("limits", {}).get("max_texts_per_request")
        self.batch_size = min(batch_size, int(limit)) if limit else batch_size

    def identity(self) -> dict[str, Any]:
        """What the server serves (its model folder and that folder's weight files), not where: part of RAFT's
        resume check, so a run resumes against the same model served at another address."""
        return {k: self.info.get(k) for k in ("model_name_or_path", "weights", "max_length", "dtype", "text_rule")}

    def score_pairs(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Reward of each ``prompt + response``, in order, ``batch_size`` pairs per request."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rewards: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = {"prompts": prompts[start : start + self.batch_size]}
            chunk["responses"] = responses[start : start + self.batch_size]
            got = self.request("POST", "/score", chunk).get("rewards")
            if not isinstance(got, list) or len(got) != len(chunk["prompts"]):
                raise ConnectionError(
                    f"{self.setting}={self.url!r}: /score answered {len(got) if isinstance(got, list) else got!r} "
                    f"rewards for {len(chunk['prompts'])} pairs: is this an hhrm reward server?"
                )
            rewards += [float(r) for r in got]
        return rewards

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
