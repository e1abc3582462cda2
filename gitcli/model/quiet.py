"""Library messages a gitcap user can do nothing about, kept off their terminal.

- DeepSpeed, when installed, is imported by transformers' `save_pretrained` (through
  accelerate's model unwrapping) even when no DeepSpeed option was given, and on a
  machine without a GPU it prints "[WARNING] Setting accelerator to CPU ..." as it
  loads. Only that one record is dropped; DeepSpeed itself runs as it would (CPU is what
  it falls back to), so `train --zero` is unchanged.
- torchao registers its Enum types with torch's pytree at import, which newer torch
  answers with a deprecation warning per type: about torchao's code, not the user's.
- bitsandbytes, imported on a CPU (by peft, or for --quant bnb-int8), says it found no
  optional `kernels` package for 4-bit matmuls, which gitcap never uses.
- transformers draws a progress bar for every tiny save/load; gitcap shows its own.

Each filter drops one message on its named logger and nothing else. A library that
configures its logger at import keeps the filters, so they work when set before it.
"""

from __future__ import annotations

import logging

# logger name -> the start of the one message dropped from it
_DROPPED = {
    "DeepSpeed": "Setting accelerator to CPU",
    "torch.utils._pytree": "%s is an Enum subclass and is now natively supported",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
}


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def install_log_filters() -> None:
    """Idempotent and import-free (cheap enough for the command line's start)."""
    for name, start in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(start))


def quiet_libraries() -> None:
    """Idempotent: the log filters, and no transformers progress bars."""
    from transformers.utils import logging as hf_logging

    install_log_filters()
    hf_logging.disable_progress_bar()
