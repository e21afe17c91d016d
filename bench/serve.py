"""The reward-model server under load: texts/s of ``recipes/serve_rm.py`` (LitServe) vs RewardScorer in-process.

Two entries, each its own section (one server each):

* ``serve`` (``serve_server_vs_scorer``): A = the server on the loopback address, started as a subprocess
  (``bench.servers.launch``, its defaults: ``max_batch_size`` 16, ``batch_timeout`` 5 ms; the bench's threads,
  device and dtype), loaded by ``CLIENTS`` client threads that each send their share of ``POST /score`` requests of
  1, 2, 4 or 8 texts one after another; a round is every request once, timed from the first send to the last answer.
* ``openrlhf`` (``serve_openrlhf_clients``): the same server under OpenRLHF's remote reward client (0.11,
  ``--remote_rm_url``): one text per ``POST /get_reward`` request (``{"query": [prompt + response], "prompts":
  [prompt]}``), ``OPENRLHF_CLIENTS`` of them in flight at once; the issue's goal: >= ``OPENRLHF_GOAL`` of B.

B = :class:`hhrm.reward.scoring.RewardScorer` in this process scoring the same texts in one call (no HTTP, no JSON,
one length sort over all texts: the ceiling). Both load the same folder: the preset's random-weight Llama reward
model saved with the bench tokenizer.

The texts: prompt + chosen texts of the bench data, every ``LONG_EVERY``-th one replaced by a ``LONG_TOKENS``-token
text (several dialogues joined and cut). Also reported: requests/s, p50/p99 latency, the batch fill the server
counted (requests and texts per model call, texts per forward; ``GET /stats``), the share of the round the model
process spent in ``predict`` and the largest reward difference between the two sides. Bounded: a fixed number of
requests per round, each with a timeout, and a round stops sending after ``ROUND_LIMIT_S``; the server is stopped
when the section ends, whatever happens.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hhrm.reward import scoring

from .common import Context, Side, build_model, compare, interleave, length_summary
from bench.servers import launch, request_json

CLIENTS = 8
REQUEST_SIZES = (1, 2, 4, 8)
OPENRLHF_CLIENTS = 64  # rollout samples in flight at once, each its own one-text request (OpenRLHF 0.11)
OPENRLHF_GOAL = 0.8  # the goal: the server at >= 0.8x in-process texts/s
OPENRLHF_TIMEOUT_S = 180.0  # OpenRLHF's client timeout
LONG_TOKENS = 512
LONG_EVERY = 4
ROUND_LIMIT_S = 600.0
REQUEST_TIMEOUT_S = 300.0
STAT_KEYS = ("model_calls", "requests", "texts", "forwards", "tokens", "padded_tokens", "predict_seconds")


def sample_pairs(ctx: Context, n: int) -> tuple[list[str], list[str]]:
    """``n`` (prompt, full text) pairs: prompt + chosen, every LONG_EVERY-th a LONG_TOKENS-token text (EOS included)
    whose prompt is its first dialogue's."""
    data, tok, rng = ctx.data, ctx.tokenizer, random.Random(5)
    prompts, texts = [], []
    for k in range(max(n, 2 * LONG_EVERY)):
        i = rng.randrange(len(data.prompts))
        if k % LONG_EVERY != LONG_EVERY - 1:
            prompts.append(data.prompts[i])
            texts.append(data.prompts[i] + data.chosen[i])
            continue
        ids: list[int] = []
        while len(ids) < LONG_TOKENS:
            j = rng.randrange(len(data.prompts))
            if not ids:
                prompts.append(data.prompts[j])
            ids += tok(data.prompts[j] + data.chosen[j], add_special_tokens=False)["input_ids"]
        texts.append(tok.decode(ids[: LONG_TOKENS - 1]))
    return prompts, texts


def sample_texts(ctx: Context) -> list[str]:
    """``score_texts`` texts of :func:`sample_pairs` (the ``serve`` section's)."""
    return sample_pairs(ctx, ctx.preset.score_texts)[1]


def make_requests(texts: list[str]) -> list[list[int]]:
    """Indices of ``texts`` per request: consecutive runs of 1, 2, 4, 8, 1, ... texts."""
    requests, start, k = [], 0, 0
    while start < len(texts):
        size = REQUEST_SIZES[k % len(REQUEST_SIZES)]
        requests.append(list(range(start, min(start + size, len(texts)))))
        start, k = start + size, k + 1
    return requests


def save_model(ctx: Context, folder: Path) -> None:
    """The preset's reward model (random weights) and the bench tokenizer, as a reward model folder."""
    model = build_model("seqcls", ctx.preset, ctx.tokenizer, torch.device("cpu"), ctx.dtype)
    model.config.pad_token_id = ctx.tokenizer.pad_token_id
    model.save_pretrained(folder)
    ctx.tokenizer.save_pretrained(folder)


def score_payload(texts: list[str]) -> Callable[[list[int]], dict[str, Any]]:
    """``POST /score`` bodies: the whole text as the response of an empty prompt."""
    return lambda idx: {"prompts": [""] * len(idx), "responses": [texts[i] for i in idx]}


def get_reward_payload(prompts: list[str], texts: list[str]) -> Callable[[list[int]], dict[str, Any]]:
    """``POST /get_reward`` bodies as OpenRLHF's client sends them: full texts under ``query``, their prompts."""
    return lambda idx: {"query": [texts[i] for i in idx], "prompts": [prompts[i] for i in idx]}


class LoadRun:
    """Side A's rounds: every request once from ``clients`` threads; latencies, rewards and the server's counters."""

    def __init__(
        self,
        url: str,
        n_texts: int,
        requests: list[list[int]],
        payload: Callable[[list[int]], dict[str, Any]],
        path: str = "/score",
        clients: int = CLIENTS,
        timeout: float = REQUEST_TIMEOUT_S,
    ):
        self.url, self.n_texts, self.requests, self.payload = url, n_texts, requests, payload
        self.path, self.clients, self.timeout = path, clients, timeout
        self.latencies: list[float] = []
        self.rewards: list[float | None] = [None] * n_texts
        self.rounds: list[dict[str, float]] = []  # per timed round: seconds, requests, and the /stats differences
        self.failures: list[str] = []

    def client(self, mine: list[list[int]], deadline: float, latencies: list[float]) -> None:
        for idx in mine:
            if time.monotonic() > deadline:
                self.failures.append("round time limit reached")
                return
            start = time.perf_counter()
            status, body = request_json(f"{self.url}{self.path}", self.payload(idx), timeout=self.timeout)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                self.failures.append(f"{status}: {body}")
                return
            for i, r in zip(idx, body["rewards"]):
                self.rewards[i] = r

    def round(self, timed: bool = True) -> float:
        before = request_json(f"{self.url}/stats")[1]
        shares = [self.requests[c :: self.clients] for c in range(self.clients)]
        latencies: list[list[float]] = [[] for _ in shares]
        deadline = time.monotonic() + ROUND_LIMIT_S
        threads = [threading.Thread(target=self.client, args=(s, deadline, lat)) for s, lat in zip(shares, latencies)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        if self.failures:
            raise RuntimeError(f"reward server load run failed: {self.failures[:3]}")
        after = request_json(f"{self.url}/stats")[1]
        self.max_requests = after["max_requests"]
        if timed:
            self.latencies += [x for lat in latencies for x in lat]
            self.rounds.append({"seconds": seconds} | {k: after[k] - before[k] for k in STAT_KEYS})
        return self.n_texts

    def details(self) -> dict[str, Any]:
        total = {k: sum(r[k] for r in self.rounds) for k in self.rounds[0]}
        ms = np.array(self.latencies) * 1000
        return {
            "requests_per_s": round(float(np.median([r["requests"] / r["seconds"] for r in self.rounds])), 2),
            "latency_ms": {q: round(float(np.percentile(ms, p)), 1) for q, p in (("p50", 50), ("p99", 99))}
            | {"max": round(float(ms.max()), 1), "requests": len(ms)},
            "requests_per_model_call": round(total["requests"] / total["model_calls"], 2),
            "max_requests_per_model_call": int(self.max_requests),
            "texts_per_model_call": round(total["texts"] / total["model_calls"], 2),
            "texts_per_forward": round(total["texts"] / total["forwards"], 2),
            "padding_share": round(1 - total["tokens"] / total["padded_tokens"], 3),
            "model_calls_per_round": round(total["model_calls"] / len(self.rounds), 1),
            # how much of a round the model process spent scoring: the rest is HTTP, queueing and batching waits
            "predict_share_of_round": round(total["predict_seconds"] / total["seconds"], 3),
        }


def server_args(ctx: Context) -> list[str]:
    bf16 = "true" if ctx.dtype == torch.bfloat16 else "false"  # the server runs bf16 or fp32
    return [
        *("--device", str(ctx.device), "--bf16", bf16, "--num_threads", str(torch.get_num_threads())),
        *("--log_level", "warning"),
    ]


@contextlib.contextmanager
def model_and_server(ctx: Context, *extra_args: str) -> Iterator[tuple[str, scoring.RewardScorer]]:
    """The server's URL and an in-process RewardScorer of the same saved model; the server stops on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rm"
        save_model(ctx, folder)
        scorer = scoring.RewardScorer.from_pretrained(
            folder, device=str(ctx.device), dtype=torch.bfloat16 if ctx.dtype == torch.bfloat16 else torch.float32
        )
        args = (*server_args(ctx), *extra_args)
        with launch(folder, *args, ready_timeout=600, log=Path(tmp) / "server.log") as url:
            yield url, scorer


def measure(ctx: Context, url: str, scorer, texts: list[str], load: LoadRun, label: str) -> tuple[Side, Side, dict]:
    """Both sides interleaved; the common details (text lengths, load figures, reward diff, the server's limits)."""
    local: dict[str, list[float]] = {}

    def in_process() -> float:
        local["rewards"] = scorer.score(texts)
        return len(texts)

    a = Side(label, load.round, warmup=lambda: load.round(timed=False))
    b = Side("RewardScorer in-process, one call", in_process, warmup=lambda: scorer.score(texts[:8]))
    interleave(ctx.clock, [a, b], ctx.preset.repeats)
    info = request_json(f"{url}/info")[1]["model"]
    diff = max(abs(x - y) for x, y in zip(load.rewards, local["rewards"]))
    lens = [len(x) for x in scoring.encode(ctx.tokenizer, texts)]
    details = {
        "clients": load.clients,
        "requests_per_round": len(load.requests),
        "texts_per_round": len(texts),
        "long_texts": {"tokens": LONG_TOKENS, "every": LONG_EVERY},
        "text_length": length_summary(lens),
        **load.details(),
        "max_abs_reward_diff": float(f"{diff:.3g}"),
        "server": {"limits": info["limits"], "device": info["device"], "dtype": info["dtype"]},
        "note": "server (HTTP and model processes) and the client threads share this machine; an idle server polls "
        "LitServe's queue",
    }
    return a, b, details


def summary(details: dict[str, Any]) -> str:
    lat = details["latency_ms"]
    return (
        f"{details['requests_per_s']} requests/s, latency p50 {lat['p50']} ms / p99 {lat['p99']} ms; per model call "
        f"{details['requests_per_model_call']} requests (max {details['max_requests_per_model_call']}), "
        f"{details['texts_per_model_call']} texts; {details['texts_per_forward']} texts per forward; predict "
        f"{details['predict_share_of_round']:.0%} of a round; max reward diff {details['max_abs_reward_diff']}"
    )


def run(ctx: Context) -> list[dict[str, Any]]:
    texts = sample_texts(ctx)
    requests = make_requests(texts)
    with model_and_server(ctx) as (url, scorer):
        load = LoadRun(url, len(texts), requests, score_payload(texts))
        label = f"server, {CLIENTS} clients, /score requests of {REQUEST_SIZES} texts"
        a, b, details = measure(ctx, url, scorer, texts, load, label)
    details["request_sizes"] = list(REQUEST_SIZES)
    entry = compare(
        "serve_server_vs_scorer",
        "Reward server texts/s (LitServe, concurrent clients on loopback) vs RewardScorer in-process, same texts",
        a,
        b,
        "texts/s",
        None,
        details,
    )
    entry["summary"] = summary(details)
    return [entry]


def run_openrlhf(ctx: Context, *server_extra: str) -> list[dict[str, Any]]:
    """``serve_openrlhf_clients``: OPENRLHF_CLIENTS threads, one text per ``POST /get_reward``; at least two
    requests per client (so each client sends its next one while others wait), else ``score_texts``."""
    prompts, texts = sample_pairs(ctx, max(ctx.preset.score_texts, 2 * OPENRLHF_CLIENTS))
    requests = [[i] for i in range(len(texts))]
    with model_and_server(ctx, *server_extra) as (url, scorer):
        load = LoadRun(
            url,
            len(texts),
            requests,
            get_reward_payload(prompts, texts),
            path="/get_reward",
            clients=OPENRLHF_CLIENTS,
            timeout=OPENRLHF_TIMEOUT_S,
        )
        label = f"server, {OPENRLHF_CLIENTS} clients, one-text /get_reward requests (OpenRLHF)"
        a, b, details = measure(ctx, url, scorer, texts, load, label)
    entry = compare(
        "serve_openrlhf_clients",
        f"Reward server texts/s under OpenRLHF's client ({OPENRLHF_CLIENTS} concurrent one-text /get_reward "
        f"requests on loopback) vs RewardScorer in-process, same texts; goal >= {OPENRLHF_GOAL}",
        a,
        b,
        "texts/s",
        OPENRLHF_GOAL,
        details,
    )
    entry["summary"] = summary(details)
    return [entry]
