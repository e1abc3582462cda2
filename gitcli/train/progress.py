"""The rich progress bar that training and the feature-caching pass show."""

from __future__ import annotations


class ProgressBar:
    """Label, bar, done/total, a free-text info column and the time left; does nothing
    when disabled (other ranks, `progress=False`)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.progress.add_task(label, total=total, info="")

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)

    def show(self, completed: int, info: str = "") -> None:
        if self.enabled:
            self.progress.update(self.task, completed=completed, info=info)
