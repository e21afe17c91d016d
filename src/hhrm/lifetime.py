"""A run's lifetime: child processes that die with the process that started them, and output folders that one run
writes at a time.

* :func:`supervise` runs a command as a child in a session (and process group) of its own, with
  ``HHRM_PARENT_PID`` naming the supervisor. Every hhrm entry point calls :func:`exit_with_parent`, which, when that
  variable is set, starts a watchdog thread: once the supervisor is gone (``kill -9`` included, which no signal
  handler sees), the watchdog kills the child's whole process group, so nothing it started (accelerate's ranks,
  LitServe's manager, model and HTTP processes, the resource tracker) is left running or holding a port.
* :func:`lock_folder` holds an exclusive ``flock`` on ``<folder>/.hhrm.lock`` for the life of the process, so a
  second run into the same folder is refused in one line instead of racing the first. The kernel drops the lock
  when the process dies, however it dies: a stale lock file never blocks a later run (and a process that ends
  normally, or releases the folder, removes the file).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PARENT_ENV = "HHRM_PARENT_PID"
LOCK_FILE = ".hhrm.lock"
_held: dict[Path, int] = {}  # folder -> open lock fd, kept for the life of the process
_watching: set[int] = set()


# --------------------------------------------------------------------------------------------
# Children that die with their parent


def alive(proc) -> bool:
    """Whether ``proc`` (a ``psutil.Process``) still runs: a zombie does not count, nor another process that reuses
    its pid. psutil tells a reused pid by the start time counted since boot; the wall-clock ``create_time()`` moves
    whenever the system clock is adjusted, and comparing it once made a healthy run take its supervisor for dead."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def own_session() -> bool:
    """Whether this process's group is the group of a session of its own (as :func:`supervise` starts it), so that
    killing the group kills this run's processes and nothing of the shell or program around it."""
    return os.getpgrp() == os.getsid(0)


def watch_parent(pid: int, interval: float = 0.5) -> threading.Thread | None:
    """A daemon thread that ends this run once process ``pid`` is gone: its whole process group when the group is
    a session of its own (:func:`own_session`), else this process alone. Returns the thread (None if ``pid`` is
    this process or already watched)."""
    if pid == os.getpid() or pid in _watching:
        return None
    proc = _process(pid)
    if proc is None:  # already gone before we looked: end now
        _end_run(pid)
    _watching.add(pid)

    def watch() -> None:
        while alive(proc):
            time.sleep(interval)
        _end_run(pid)

    thread = threading.Thread(target=watch, name=f"hhrm-watch-{pid}", daemon=True)
    thread.start()
    return thread


def _end_run(pid: int) -> None:
    logger.warning("the process that started this run (pid %d) is gone: stopping this run", pid)
    if own_session():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with_parent() -> threading.Thread | None:
    """Watch the supervisor named by ``HHRM_PARENT_PID`` (set by :func:`supervise`), if any. Every entry point
    calls this first; it does nothing for a process started any other way."""
    value = os.environ.get(PARENT_ENV, "").strip()
    if not value.isdigit():
        return None
    return watch_parent(int(value))


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``HHRM_PARENT_PID`` set to this process."""
    return dict(os.environ if env is None else env) | {PARENT_ENV: str(os.getpid())}


def supervise(cmd: Sequence[str], env: Mapping[str, str] | None = None, **popen_kwargs) -> int:
    """Run ``cmd`` to its end as a child that dies with this process; returns its exit code.

    The child gets a session of its own and ``HHRM_PARENT_PID``; SIGINT and SIGTERM sent to this process are passed
    to the child's whole group, and whatever is left of the group when the child ends (or this process fails) is
    killed. If this process is killed outright, the child's watchdog (:func:`exit_with_parent`) ends the group.
    """
    proc = subprocess.Popen(list(cmd), env=child_env(env), start_new_session=True, **popen_kwargs)
    forward = {}

    def pass_on(signum, frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            forward[sig] = signal.signal(sig, pass_on)
    try:
        return proc.wait()
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # what the child left behind in its group
        proc.wait()


# --------------------------------------------------------------------------------------------
# One run per folder


def lock_folder(folder: str | os.PathLike, setting: str = "output_dir") -> Path | None:
    """Hold ``<folder>/.hhrm.lock`` exclusively until this process ends; refuse in one line if another run holds it.

    Only the main process of a launch (``RANK`` 0 or unset) locks: the other ranks are the same run. Re-locking a
    folder this process holds is a no-op. Returns the lock file (None on other ranks).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    path = Path(folder).resolve()
    if path in _held:
        return path / LOCK_FILE
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(
                f"{setting}={str(folder)!r} is being written by another run ({holder}); wait for it to finish, "
                f"stop it, or choose another {setting}"
            ) from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # its holder released it and removed the file between our open and flock: take the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _held[path] = fd
    return lock


def unlock_folder(folder: str | os.PathLike) -> None:
    """Release a lock taken by :func:`lock_folder` and remove its file (a process's locks are released when it
    ends anyway; at a normal exit their files are removed too, so a refused run leaves no file behind).

    The file is removed while still locked; :func:`lock_folder` re-checks after locking that its file is still the
    one at the path, so a run that opened the removed file retries on a new one instead of sharing the folder."""
    path = Path(folder).resolve()
    fd = _held.pop(path, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            if _same_file(fd, path / LOCK_FILE):
                os.unlink(path / LOCK_FILE)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@atexit.register
def _unlock_all() -> None:
    for folder in list(_held):
        unlock_folder(folder)


# A forked child (a data-loader worker) shares the lock but must not release it nor remove its file at its exit.
os.register_at_fork(after_in_child=_held.clear)
