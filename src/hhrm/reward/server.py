"""The reward-model server: a reward model folder (or a reward ensemble) behind HTTP on LitServe, scored by its
reward convention.

Endpoints (JSON in and out; every refusal is ``{"error": "<one line>"}`` with a 4xx status, see
:mod:`hhrm.reward.protocol`):

* ``POST /score``: ``{"prompts": [str], "responses": [str]}`` -> ``{"rewards": [float]}``, the reward of each
  ``(prompt, response)`` exactly as :class:`hhrm.reward.scoring.RewardScorer` scores it under the server's
  ``reward_convention`` (:mod:`hhrm.reward.conventions`; hhrm's: text + EOS, read at the EOS).
* ``POST /get_reward``: OpenRLHF's remote reward protocol (its ``--remote_rm_url``): ``{"query": [full texts],
  "prompts": [str]}`` -> ``{"rewards": [float], "scores": [float], "extra_logs": {"dummy_scores": [float]}}``,
  what OpenRLHF's ``serve_rm`` answers; other keys (``labels``, ``metas``) are ignored. A convention that needs the
  prompt apart (a chat template, a text pair) requires ``prompts`` (:func:`hhrm.reward.protocol.get_reward_pairs`).
* An ensemble (``reward_ensemble``: E folders, one reward by ``reward_aggregation``; or any source with member
  rewards, :mod:`hhrm.reward.server_model`): ``/score`` also answers ``mean``, ``std`` and ``members`` (E rewards)
  per text, and ``/get_reward`` adds ``reward_mean`` and ``reward_std`` (per text) to ``extra_logs``; ``rewards``
  is the rule's. A single folder answers exactly as above.
* ``GET /health`` (200 ``ok`` once the model is loaded; 503 before, and once the model process or LitServe's queue
  is gone), ``GET /info`` (LitServe's; under ``model``: the model path, its ``convention`` and the text rule that
  follows, max length, the limits),
  ``GET /stats`` (counters: model calls, requests and texts per call, texts per forward, refusals by status).
  Nothing else answers (404), no ``/docs`` nor ``/openapi.json`` either.

Each request is checked and tokenized in the HTTP process before it is queued, and what it may cost is bounded
before any work that grows with it (:mod:`hhrm.reward.protocol`): the body (``max_request_bytes``, by default
what ``max_texts_per_request`` texts at the character cap need), its JSON outside strings, then each text's
characters (``max_length`` x the longest token, so a text that fits is never refused and a huge one is never
tokenized). LitServe's dynamic batching hands the model process up to ``max_batch_size`` queued requests (waiting
at most ``batch_timeout``); their texts are flattened into one :meth:`RewardScorer.score_ids` call (which sorts them
by length and cuts forwards of at most ``reward_batch_size`` texts and ``max_tokens_per_batch`` padded tokens; an
ensemble: one per member), and the rewards are split back per request. A request gets no answer within
``request_timeout``: 504; a dead model process or queue: 503 within a second, and the server ends (exit 1) so that
whoever runs it restarts it (:mod:`hhrm.reward.watch`). ``recipes/serve_rm.py`` runs the server as a child that
dies with it, whole.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field

import torch
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from hhrm import finite, model_checks, runtime
from hhrm.reward import conventions, ensemble, sources
from hhrm.reward.protocol import (
    EXTRA_LOGS,
    STATS,
    Limits,
    RequestError,
    check_port,
    encode_checked,
    get_reward_body,
    get_reward_pairs,
    limits,
    load_object,
    score_body,
    score_pairs,
    stats_summary,
    text_rule,
    worker_error,
)
from hhrm.reward.server_model import RewardAPI, build_source, with_members
from hhrm.reward.watch import BackendState, GuardedServer

__all__ = ["RewardAPI", "RewardSpec", "ServeConfig", "build_server", "serve"]  # RewardAPI: server_model's

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the addresses LitServer.run binds


@dataclass
class ServeConfig:
    """The reward-model server: which model, where it listens, its device, and its limits."""

    model_name_or_path: str = field(
        default=None,
        metadata={"help": "Reward model folder (the output of `make rm`) or hub id (required, or reward_ensemble)."},
    )
    reward_ensemble: list[str] | None = sources.setting("reward_ensemble")
    reward_aggregation: str = sources.setting("reward_aggregation")
    reward_uwo_lambda: float = sources.setting("reward_uwo_lambda")
    host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "127.0.0.1 (this machine only), or 0.0.0.0 / :: (no authentication!)",
            "choices": list(HOSTS),
        },
    )
    port: int = field(default=8000, metadata={"help": "TCP port (1024-65535)."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N. Default: cuda if available."})
    bf16: bool | None = field(
        default=None, metadata={"help": "None: bf16 on a bf16-capable GPU, fp32 elsewhere (fp32 on --device cpu)."}
    )
    max_batch_size: int = field(
        default=16, metadata={"help": "Requests LitServe merges into one model call, at most (dynamic batching)."}
    )
    batch_timeout: float = field(
        default=0.005,
        metadata={"help": "Seconds LitServe waits for more requests before a model call (> 0: 0 polls without rest)."},
    )
    max_texts_per_request: int = field(
        default=256, metadata={"help": "Texts (queries or prompt/response pairs) per request, at most; more: 413."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per text (text + EOS), at most; longer: 413. Default: the model's positions."},
    )
    max_request_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Request body size in bytes, at most; more: 413. Default: what max_texts_per_request texts of "
            "max_length x the longest token characters need, each character JSON-escaped (6 bytes), plus 64 KiB; at "
            "most 32 MiB (GET /info shows it)."
        },
    )
    reward_convention: str | None = sources.setting("reward_convention")
    reward_batch_size: int = sources.setting("reward_batch_size")
    max_tokens_per_batch: int = field(
        default=32_768, metadata={"help": "Padded tokens per reward-model forward, at most (RewardScorer)."}
    )
    request_timeout: float = field(
        default=180.0,
        metadata={"help": "Seconds a request may wait for its rewards; then 504 (180: OpenRLHF's client wait)."},
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads of the model process (torch.set_num_threads). Default: torch's."}
    )
    log_level: str = field(
        default="info",
        metadata={"help": "Server log level (info logs each request).", "choices": ["debug", "info", "warning"]},
    )

    def __post_init__(self) -> None:
        finite.check_finite_settings(self)
        if self.model_name_or_path and self.reward_ensemble:
            raise ValueError(
                "model_name_or_path and reward_ensemble are both set: give one folder, or the ensemble's folders only"
            )
        if not (self.model_name_or_path or self.reward_ensemble):
            raise ValueError(
                "model_name_or_path is required: the reward model folder to serve (make serve-rm MODEL=...), or "
                "reward_ensemble: its folders"
            )
        ensemble.check_settings(self)  # the ensemble's rule and its members' count
        if self.host not in HOSTS:
            raise ValueError(f"host={self.host!r}: LitServe binds one of {HOSTS} (127.0.0.1: this machine only)")
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"port={self.port}: must be within 1024-65535")
        counts = ("max_batch_size", "max_texts_per_request", "reward_batch_size", "max_tokens_per_batch")
        bad = [f"{k}={getattr(self, k)}" for k in counts if getattr(self, k) < 1]
        optional = ("max_length", "num_threads", "max_request_bytes")
        bad += [f"{k}={getattr(self, k)}" for k in optional if (getattr(self, k) or 1) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be >= 1")
        if not 0 < self.batch_timeout < self.request_timeout:
            raise ValueError(
                f"batch_timeout={self.batch_timeout}, request_timeout={self.request_timeout}: need "
                "0 < batch_timeout < request_timeout"
            )
        self.device = self.device or runtime.default_device()
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r}: expected cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r}: no CUDA device here; use --device cpu")
        if self.reward_convention is not None:
            conventions.by_name(self.reward_convention)

    @property
    def dtype(self):
        """hhrm's precision rule, except that an unset ``bf16`` is fp32 on a CPU even where a GPU exists."""
        return runtime.torch_dtype(False if self.bf16 is None and self.device == "cpu" else self.bf16)


# --------------------------------------------------------------------------------------------
# The HTTP side (a LitSpec: LitServe's way to give one LitAPI its own routes) and the model side (a LitAPI)


class RewardSpec(LitSpec):
    """``/score``, ``/get_reward`` and ``/stats`` in LitServe's HTTP process, all feeding the one model queue; each
    request is checked against :class:`Limits` (fixed at start) before it is queued."""

    def __init__(self, model: sources.RewardSource, config: ServeConfig, limits: Limits, stats, backend: BackendState):
        super().__init__()
        self.api_path = "/score"  # LitServe keys the model queue and the worker by this path
        self.tokenizer, self.convention = model.tokenizer, model.convention
        self.config, self.limits, self.stats = config, limits, stats
        self.backend = backend  # the server's, in the HTTP process: set once the model process or queue is gone
        self.errors: dict[str, int] = {}

    def __getstate__(self) -> dict:
        return super().__getstate__() | {"tokenizer": None}  # the model process has its own

    def pre_setup(self, lit_api) -> None:
        self._endpoints = []
        self.add_endpoint("/score", self.score, ["POST"])
        self.add_endpoint("/get_reward", self.get_reward, ["POST"])
        self.add_endpoint("/stats", self.read_stats, ["GET"])

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    async def score(self, request: Request) -> JSONResponse:
        scored = await self.serve(request, score_pairs)
        return scored if isinstance(scored, JSONResponse) else JSONResponse(score_body(scored))

    async def get_reward(self, request: Request) -> JSONResponse:
        scored = await self.serve(request, get_reward_pairs)
        return scored if isinstance(scored, JSONResponse) else JSONResponse(get_reward_body(scored))

    async def serve(self, request: Request, pairs_of) -> list[float] | dict | JSONResponse:
        """Rewards of the request's texts (a source with members: its summary), or the error response (the request
        never reaches the model then)."""
        try:
            try:
                body = await request.body()
            except ClientDisconnect:
                raise RequestError(400, "the client disconnected before sending the whole body") from None
            except Exception as err:  # LitServe's max_payload_size check raises an HTTPException (413) as it reads
                status = getattr(err, "status_code", 400)
                limit = f"the body is too large: over max_request_bytes={self.limits.max_request_bytes} bytes"
                raise RequestError(status, limit if status == 413 else str(getattr(err, "detail", err))) from None
            return await self.rewards(await asyncio.to_thread(self.checked_ids, body, pairs_of))
        except RequestError as err:
            key = str(err.status)
            self.errors[key] = self.errors.get(key, 0) + 1
            return JSONResponse({"error": err.message}, status_code=err.status)

    def checked_ids(self, body: bytes, pairs_of) -> tuple:
        """``(ids, token type ids or None)`` of the body's pairs by the convention, each limit checked before the
        work it bounds (off the event loop)."""
        data = load_object(body, self.limits.max_structure_bytes)
        pairs = pairs_of(data, self.limits.max_texts_per_request, self.tokenizer, self.convention)
        return encode_checked(self.tokenizer, pairs, self.convention, self.limits)

    async def rewards(self, ids: tuple) -> list[float] | dict:
        """Queue one request for the model process and wait for its rewards (as LitServe's own specs do), at most
        ``request_timeout`` seconds (504); 503 once the model process or LitServe's queue is gone."""
        if self.backend.down:
            raise RequestError(503, self.backend.down)
        uid, event = str(uuid.uuid4()), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        try:
            self.request_queue.put_nowait((self.response_queue_id, uid, time.monotonic(), ids))
            await asyncio.wait_for(event.wait(), self.config.request_timeout)
        except TimeoutError:  # before OSError, of which it is a subclass
            timeout = self.config.request_timeout
            raise RequestError(
                504, f"no rewards within request_timeout={timeout} s: the model process is busy or stuck"
            )
        except (OSError, EOFError):  # the queue manager is gone; the watch stops the server
            raise RequestError(503, "LitServe's queue manager is gone: the server is stopping; retry once restarted")
        finally:
            item = self.response_buffer.pop(uid, None)
        response, status = item.response
        if status == LitAPIStatus.ERROR:
            raise worker_error(response)
        return response

    async def read_stats(self) -> JSONResponse:
        return JSONResponse(stats_summary(self.stats) | {"errors": dict(self.errors)})


# --------------------------------------------------------------------------------------------
# The server


def model_positions(path: str) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def build_server(config: ServeConfig) -> GuardedServer:
    """The LitServer, after the checks that refuse to start: not a reward model (or members that cannot be one
    ensemble), a convention that cannot score it, a length over the model's positions, a port in use. Nothing is
    loaded here but the tokenizer; the model process loads the model(s)."""
    source = build_source(config)
    tokenizer = source.tokenizer
    known = [p for p in map(model_positions, config.reward_ensemble or [config.model_name_or_path]) if p is not None]
    positions = min(known) if known else None  # an ensemble's: its members' fewest
    max_length = config.max_length or positions
    if max_length is None:
        raise ValueError("max_length: the model's config states no positions (max_position_embeddings); set it")
    if positions is not None and max_length > positions:
        raise ValueError(f"max_length={max_length}: over the model's {positions} positions (max_position_embeddings)")
    check_port(config.host, config.port)
    request_limits = limits(tokenizer, max_length, config.max_texts_per_request, config.max_request_bytes)
    stats = multiprocessing.get_context("spawn").Array("d", len(STATS), lock=False)  # one writer: the model process
    backend = BackendState()
    spec = RewardSpec(source, config, request_limits, stats, backend)
    api = RewardAPI(config, spec, stats)
    endpoints = ["POST /score", "POST /get_reward", "GET /health", "GET /info", "GET /stats"]
    metadata = server_metadata(config, source, request_limits, positions) | {"endpoints": endpoints}
    return GuardedServer(
        api,
        backend=backend,
        routes=endpoints,
        accelerator="cuda" if config.device.startswith("cuda") else "cpu",
        devices=1,
        workers_per_device=1,
        timeout=config.request_timeout,
        model_metadata=metadata,
        max_payload_size=request_limits.max_request_bytes,
    )


def server_metadata(config: ServeConfig, source, request_limits: Limits, positions: int | None) -> dict:
    """What ``GET /info`` says under ``model``: what scores (hhrm's client reads ``weights`` and ``convention`` into
    the source's identity), how, and the limits. An ensemble adds ``ensemble``: its folders and rule."""
    tokenizer, convention = source.tokenizer, source.convention
    batching = {k: getattr(config, k) for k in ("max_batch_size", "batch_timeout", "request_timeout")}
    if config.reward_ensemble:
        what = {
            "model_name_or_path": source.describe(),
            "weights": [model_checks.weights_identity(str(m)) for m in config.reward_ensemble],
            "ensemble": {
                "members": [str(m) for m in config.reward_ensemble],
                "aggregation": config.reward_aggregation,
                "uwo_lambda": config.reward_uwo_lambda,
            },
        }
    else:
        path = str(config.model_name_or_path)
        what = {"model_name_or_path": path, "weights": model_checks.weights_identity(path)}
    if with_members(source):  # what each answer holds beyond the rewards
        what["fields"] = {"/score": ["rewards", "mean", "std", "members"], "/get_reward extra_logs": EXTRA_LOGS}
    return what | {
        "convention": convention.name,
        "text_rule": text_rule(convention),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "max_length": request_limits.max_length,
        "model_positions": positions,
        "device": config.device,
        "dtype": str(config.dtype).removeprefix("torch."),
        "limits": asdict(request_limits) | batching,
        "scorer": {"reward_batch_size": config.reward_batch_size, "max_tokens_per_batch": config.max_tokens_per_batch},
    }


def serve(server: GuardedServer, config: ServeConfig) -> None:
    """Run until stopped by SIGINT (Ctrl-C) or SIGTERM: one HTTP process, one model process on ``config.device``.

    Both signals take LitServe's graceful shutdown, which stops the HTTP and model processes too (on a plain
    SIGTERM LitServe's main process would die alone and leave them holding the port); SIGINT also where the
    server was started with it ignored (``cmd &`` in a script). A dead model process or queue manager ends the
    server with exit code 1 and one line instead (:class:`hhrm.reward.watch.GuardedServer`)."""
    main_pid = os.getpid()

    def stop(signum, frame) -> None:
        if os.getpid() != main_pid:
            return  # a forked helper (LitServe's queue manager) that inherited this: the main process stops it
        server.stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.run(
            host=config.host,
            port=config.port,
            num_api_servers=1,
            log_level=config.log_level,
            generate_client_file=False,
        )
    except (EOFError, OSError) as err:  # LitServe's main thread waits on its queue manager, which is gone
        if not server.stopping:
            server.end(f"LitServe's queue manager is gone ({type(err).__name__}: {err})")
