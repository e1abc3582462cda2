"""Quiet access to model hubs: gitcap reports a failed load in one line of its own."""

from __future__ import annotations

import contextlib
import logging


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
