"""`metrics.jsonl`: one JSON line per logged step and per validation, each step once.

A resumed run continues from its checkpoint's step (a new one from 0), so the lines a
killed run wrote after that step are cut away first (atomically: the old file or the cut one, never half);
the resumed run then writes them again. The file is fsynced whenever a checkpoint is
about to be published, so every line up to a checkpoint's step is on disk before
`latest` can name that checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gitcli.formats.atomic import fsync_dir, write_text

METRICS_FILE = "metrics.jsonl"


def lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of `path` for steps <= `step`; a half-written last line (a kill) is dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    return kept


class MetricsLog:
    """Appends records to `run_dir/metrics.jsonl`, cut back first to the lines of steps up to
    `start_step`, the step the run starts from (0 for a new run)."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        if self.path.exists():
            kept = lines_up_to(self.path, start_step)
            write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Make every line written so far durable (before a checkpoint is published)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        fsync_dir(self.path.parent)  # the file's own name, the first time

    def close(self) -> None:
        self._file.close()
