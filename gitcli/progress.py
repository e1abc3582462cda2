"""The one progress bar every long job shows (train, the feature-caching pass, fetch,
infer-tsv, tsv): a label, the bar, done/total with a unit, a free-text info column
(loss, images/s, ...) and the time left, on stderr so stdout stays for results.

Disabled (other ranks, `progress=False`, tests) it does nothing and costs nothing.
Only rich, no torch: the torch-free commands use it too.
"""

from __future__ import annotations

from typing import Any


class ProgressBar:
    def __init__(self, label: str, total: int | None, *, unit: str = "", enabled: bool = True,
                 console: Any = None, transient: bool = False) -> None:
        self.enabled = enabled
        self.completed = 0
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
        if unit:
            columns.append(TextColumn(unit))
        columns += [TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        self._progress = Progress(*columns, console=console or Console(stderr=True), transient=transient,
                                  refresh_per_second=4)
        self._task = self._progress.add_task(label, total=total, info="")

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._progress.stop()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.show(self.completed + n, info)

    def show(self, completed: int, info: str | None = None, *, total: int | None = None) -> None:
        """Set the count (and the info text, and the total when it changes)."""
        self.completed = completed
        if not self.enabled:
            return
        fields: dict[str, Any] = {"completed": completed}
        if info is not None:
            fields["info"] = info
        if total is not None:
            fields["total"] = total
        self._progress.update(self._task, **fields)
