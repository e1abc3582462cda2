"""What `gitcap fetch` shows: the live progress bar (the shared ProgressBar) and the outcome table."""

from __future__ import annotations

import io

from rich.console import Console

from gitcli.fetch.report import FetchProgress, outcome_table


def test_fetch_progress_counts_and_draws_the_shared_bar():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with FetchProgress(console, total=5) as progress:
        progress.row_done("ok", 1000)
        progress.row_done("http_404", 0)
        progress.add_counts({"ok": 2, "timeout": 1}, 3000)
    assert progress.counts == {"ok": 3, "http_404": 1, "timeout": 1} and progress.bytes == 4000
    drawn = buffer.getvalue()
    assert "fetch" in drawn and "5/5" in drawn and "rows" in drawn and "60% ok" in drawn


def test_disabled_progress_still_counts_and_draws_nothing():
    buffer = io.StringIO()
    with FetchProgress(Console(file=buffer), total=2, enabled=False) as progress:
        progress.row_done("ok", 10)
    assert progress.counts == {"ok": 1} and buffer.getvalue() == ""


def test_outcome_table_puts_ok_first_and_marks_transient_statuses():
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(outcome_table({"http_404": 1, "ok": 2, "http_503": 3}, "this run"))
    lines = [line for line in buffer.getvalue().splitlines() if "http_" in line or " ok " in line]
    assert [line.split()[1] for line in lines] == ["ok", "http_503", "http_404"]
    assert "transient: --retry-failed" in lines[1] and "transient" not in lines[2]
