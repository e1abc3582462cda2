"""Library messages a gitcap user can do nothing about, kept off their terminal.

- DeepSpeed, when installed, is imported by transformers' `save_pretrained` (through
  accelerate's model unwrapping) even when no DeepSpeed option was given, and on a
  machine without a GPU it prints "[WARNING] Setting accelerator to CPU ..." as it
  loads. Only that one record is dropped; DeepSpeed itself runs as it would (CPU is what
  it falls back to), so `train --zero` is unchanged.
- transformers draws a progress bar for every tiny save/load; gitcap shows its own.
"""

from __future__ import annotations

import logging

_CPU_FALLBACK = "Setting accelerator to CPU"


class _DropCpuFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CPU_FALLBACK)


def quiet_libraries() -> None:
    """Idempotent. The DeepSpeed filter sits on its named logger, which DeepSpeed's import
    reconfigures (level, handler) but keeps the filters of, so it works before the import."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropCpuFallbackNotice) for f in logger.filters):
        logger.addFilter(_DropCpuFallbackNotice())
