"""A reward server in a subprocess, for the bench and the tests (not the library: users run ``make serve-rm``).

:func:`launch` starts ``recipes/serve_rm.py`` on 127.0.0.1 and a free port and yields its URL once ``/health`` answers
200; on exit the server's whole process tree is stopped. :func:`request_json` is the small standard-library client the
tests and the bench talk to it with.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from hhrm.reward.watch import alive, kill

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "serve_rm.py"


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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch(model: str | Path, *args: str, ready_timeout: float = 600.0, log: Path | None = None):
    """``recipes/serve_rm.py`` on 127.0.0.1 and a free port, as a subprocess: a context manager that yields its base
    URL once ``/health`` answers 200 (at most ``ready_timeout`` seconds, else RuntimeError with the log's tail), and
    stops it whole on exit (SIGTERM, then SIGKILL to what is left of its tree after 30 s)."""
    port = free_port()
    cmd = [sys.executable, str(RECIPE), "--model_name_or_path", str(model), "--port", str(port), *args]
    return launch_process(cmd, f"http://127.0.0.1:{port}", ready_timeout, log)


@contextlib.contextmanager
def launch_process(cmd: Sequence[str], url: str, ready_timeout: float, log: Path | None = None) -> Iterator[str]:
    """Run ``cmd`` (a server listening at ``url``) in a session of its own; yield ``url`` once ``/health`` answers
    200 (at most ``ready_timeout`` seconds, else RuntimeError with the log's tail). On exit: SIGTERM, then after
    30 s SIGKILL to every process of its tree (its own sessions included) that is left."""
    out = open(log, "w+") if log else tempfile.TemporaryFile("w+")  # closed below
    proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tree: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + ready_timeout
        while (status := health(url)) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                out.seek(0)
                why = (
                    f"exited with {proc.returncode}"
                    if proc.poll() is not None
                    else f"not ready after {ready_timeout} s"
                )
                raise RuntimeError(f"reward server {why} (last /health: {status}); its output:\n{out.read()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        kill([p for p in tree.values() if alive(p)])  # what its sessions left behind
        proc.wait()
        out.close()


def health(url: str) -> int | None:
    """The status of ``GET url/health`` (None: no answer within 5 s)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None
