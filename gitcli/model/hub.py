"""Access to model hubs, offline first: gitcap reports a failed load in one line of its own.

On clusters the hub is usually out of reach. Instead of letting every library retry its
downloads (huggingface_hub retries each request with backoff: half a minute of warnings
per file), gitcap checks once per process whether the hub's host can be reached at all,
and when it cannot, switches huggingface_hub to offline mode so that every later lookup
answers from the local cache at once.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
from urllib.parse import urlsplit

_TRUE = ("1", "true", "yes", "on")
_reachable: bool | None = None


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Raise the named loggers (the empty name is the root logger) to CRITICAL for a block.

    open_clip, transformers and huggingface_hub log warnings, retries and errors of their
    own while loading; gitcap turns a failure into one readable line instead.
    """
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _probe_address() -> tuple[str, int]:
    """Where a hub request would first connect: the HTTPS proxy if one is set, else the hub."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    default_port = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default_port


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub (or the proxy in front of it) accepts a connection; asked once
    per process. False when the user turned the hub off (HF_HUB_OFFLINE=1)."""
    global _reachable
    if _reachable is None:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
            _reachable = False
        else:
            try:
                socket.create_connection(_probe_address(), timeout=timeout).close()
                _reachable = True
            except OSError:
                _reachable = False
        if not _reachable:
            _go_offline()
    return _reachable


def _go_offline() -> None:
    """Every later hub lookup of this process answers from the cache, without retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # read at call time; the variable only at import
    except ImportError:
        pass


def did_you_mean(name: str, known: list[str]) -> str:
    """' (did you mean X?)' for a close spelling among `known`, else ''."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""
