"""The reward server's processes on LitServe: only the documented routes, no request left waiting on a dead backend,
and a server that is stopped (or killed) whole.

LitServe runs four processes: its main one (here :class:`GuardedServer`), the queue manager (multiprocessing's,
forked: the request and response queues live there), the model process (the inference worker, spawned) and the
HTTP process (uvicorn, forked). LitServe alone answers 504 only when the model process takes a request that waited
too long, so a request queued when the model process or the manager dies is never answered. Here:

* The HTTP process watches the main, manager and model processes every ``WATCH_INTERVAL`` seconds. Once one is gone,
  every waiting request is answered 503 (:class:`BackendGone`, one line), and so is every later one; ``/health``
  answers 503 with the reason.
* The main process watches the manager, model and HTTP processes. Once one is gone, and no stop was asked for, it
  waits ``GRACE`` seconds (the 503s go out), kills the server's other processes and exits 1 with one line
  ``hhrm: error: ...``, so whoever runs the server (a supervisor, an orchestrator) sees it end and can restart it.
  If the main process is gone first, the HTTP process ends the others and itself the same way.
* Only ``/health``, ``/info`` and the spec's routes answer: no ``/`` index and no ``/docs``, ``/redoc`` or
  ``/openapi.json`` (Swagger UI would load scripts from a CDN); anything else is 404 ``{"error": "<one line>"}``.

Foundation code: LitServe, psutil and the standard library only (``bench/servers.py`` starts a server in a subprocess
for the tests and the bench, and stops its whole tree with :func:`kill`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager

import litserve as ls
import psutil
from fastapi import Depends, Request, Response
from litserve.utils import LitAPIStatus, WorkerSetupStatus
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from hhrm.lifetime import alive

logger = logging.getLogger(__name__)

WATCH_INTERVAL = 0.25  # seconds between two looks at the server's processes
GRACE = 1.0  # seconds the main process leaves the HTTP process to answer 503 before it ends the server


class BackendGone(Exception):
    """What a request waiting on a dead backend is answered: 503 and one line (``status_code``/``detail`` as
    LitServe's own HTTPException carries them)."""

    status_code = 503

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class BackendState:
    """Shared by the server and its spec in the HTTP process: why the backend is down (None while it is up)."""

    def __init__(self) -> None:
        self.down: str | None = None


def _watched(named_pids: dict[str, int]) -> dict[str, psutil.Process]:
    out = {}
    for name, pid in named_pids.items():
        with contextlib.suppress(psutil.Error):
            out[name] = psutil.Process(pid)  # pins the start time: a reused pid does not count as alive
    return out


def kill(procs: Sequence[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid():
                proc.kill()


class GuardedServer(ls.LitServer):
    """A LitServer that serves only its documented routes and never outlives its backend (see the module)."""

    def __init__(self, *args, backend: BackendState, routes: Sequence[str], **kwargs):
        self.backend, self.routes, self.stopping = backend, list(routes), False
        super().__init__(*args, disable_openapi_url=True, **kwargs)  # no /openapi.json, so no /docs nor /redoc
        self.app.add_exception_handler(HTTPException, self._http_error)

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        return JSONResponse(
            {"error": f"{where}: {exc.detail}; this server answers {', '.join(self.routes)}"},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    def _register_internal_endpoints(self) -> None:
        """LitServe's ``/info``, this server's ``/health``, and no ``/`` index."""
        super()._register_internal_endpoints()
        drop = {"/", self.healthcheck_path}
        self.app.router.routes = [r for r in self.app.router.routes if getattr(r, "path", None) not in drop]
        auth = [Depends(self.setup_auth())]
        self.app.add_api_route(self.healthcheck_path, self._health, methods=["GET"], dependencies=auth)

    async def _health(self) -> Response:
        if self.backend.down:
            return Response(f"down: {self.backend.down}", status_code=503)
        try:
            statuses = list(self.workers_setup_status.values())
        except Exception:  # the manager (which holds these statuses) is gone; the watch says so within a moment
            return Response("down: LitServe's queue manager does not answer", status_code=503)
        if statuses and all(s == WorkerSetupStatus.READY for s in statuses):
            return Response("ok", status_code=200)
        return Response("not ready", status_code=503)

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        self._main_pid, self._manager_pid = os.getpid(), manager._process.pid
        return manager

    def _backend_pids(self) -> dict[str, int]:
        pids = {"LitServe's queue manager": self._manager_pid}
        pids.update({f"the model process (pid {w.pid})": w.pid for w in self.inference_workers})
        return pids

    # ---- in the HTTP process

    @asynccontextmanager
    async def lifespan(self, app):
        watch = asyncio.get_running_loop().create_task(self._watch_backend(), name="hhrm-backend-watch")
        try:
            async with super().lifespan(app):
                yield
        finally:
            watch.cancel()

    async def _watch_backend(self) -> None:
        procs = _watched({"the server's main process": self._main_pid, **self._backend_pids()})
        while not (gone := [name for name, proc in procs.items() if not alive(proc)]):
            await asyncio.sleep(WATCH_INTERVAL)
        self.backend.down = f"{gone[0]} is gone: the server is stopping; retry once it is restarted"
        logger.warning("reward server: %s", self.backend.down)
        for item in list(self.response_buffer.values()):
            if not item.event.is_set():
                item.response = (BackendGone(self.backend.down), LitAPIStatus.ERROR)
                item.event.set()
        if "the server's main process" in gone:  # nobody else is left to end the server
            await asyncio.sleep(GRACE)
            kill(list(procs.values()))
            os._exit(1)

    # ---- in the main process

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:
        """Replaces LitServe's monitor (which shuts down from its thread while the main thread still waits on the
        manager): end the server once any of its processes is gone, unless a stop was asked for."""
        pids = self._backend_pids() | {f"the HTTP process (pid {w.pid})": w.pid for w in uvicorn_workers.values()}
        procs = _watched(pids)

        def monitor() -> None:
            while not (gone := [name for name, proc in procs.items() if not alive(proc)]) or self.stopping:
                time.sleep(WATCH_INTERVAL)
            time.sleep(GRACE)  # the HTTP process answers what waits with 503 first
            if not self.stopping:
                self.end(f"{gone[0]} is gone")

        threading.Thread(target=monitor, name="hhrm-server-watch", daemon=True).start()

    def end(self, reason: str) -> None:
        """Kill the server's other processes and exit 1 with one line (a broken backend: nothing to shut down)."""
        print(f"hhrm: error: the reward server stopped: {reason}; restart it (see the log above)", file=sys.stderr)
        sys.stderr.flush()
        kill(psutil.Process().children(recursive=True))
        os._exit(1)
