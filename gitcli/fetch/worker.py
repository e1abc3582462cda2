"""Image work in worker processes, so that decoding/resizing (CPU) overlaps the network.

The settings are installed once per process by the pool initializer instead of being
sent with every image; results come back as plain tuples.
"""

from __future__ import annotations

import signal

from gitcli.formats.images import ImageRejected, ImageSettings, normalize_image

_settings = ImageSettings()


def init_worker(settings: ImageSettings, ignore_sigint: bool = True) -> None:
    global _settings
    _settings = settings
    if ignore_sigint:
        # Ctrl-C is handled once, by the main process, which then shuts the pool down;
        # workers printing their own KeyboardInterrupt tracebacks would only be noise
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_image(data: bytes) -> tuple:
    """("ok", jpeg, width, height, original_width, original_height) or
    ("rejected", outcome, detail)."""
    try:
        n = normalize_image(data, _settings)
    except ImageRejected as r:
        return ("rejected", r.cause, r.detail)
    return ("ok", n.jpeg, n.width, n.height, n.original_width, n.original_height)
