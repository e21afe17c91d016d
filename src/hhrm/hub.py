"""Whether the Hugging Face hub may and can be used from here: the offline settings, and a quick reachability
check, so that a name that is no local path and cannot be fetched is refused at once instead of after a minute
of hub retries and a traceback."""

from __future__ import annotations

import functools
import os

TRUTHY = {"1", "on", "yes", "true"}


def offline_variable(names: tuple[str, ...] = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) -> str | None:
    """The variable that forbids contacting the hub (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, or ``names``),
    or ``None``."""
    from huggingface_hub import constants

    on = [name for name in names if os.environ.get(name, "").strip().lower() in TRUTHY]
    return on[0] if on else "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub's host (``huggingface_hub.constants.ENDPOINT``, or the proxy in front of it) takes a TCP
    connection within about ``timeout`` seconds; asked once per process and host. Where it does not, a missing path
    shaped like a hub id is refused at once, not after a minute of hub retries and a traceback."""
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = url.hostname or "", url.port or 80
    return _connects(host, port, timeout)


@functools.cache
def _connects(host: str, port: int, timeout: float) -> bool:
    import socket
    import threading

    found: list = []

    def resolve() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError:
            pass

    resolver = threading.Thread(target=resolve, daemon=True)  # getaddrinfo takes no timeout: a slow DNS is waited
    resolver.start()  # for in a daemon thread, which never holds up the exit
    resolver.join(timeout)
    for family, kind, proto, _, address in list(found)[:4]:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                return True
        except OSError:
            continue
    return False
