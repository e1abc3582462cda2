"""Matching results to labels by key: strict by default, or the intersection on request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, TypeVar

from gitcli.errors import GitcapError

R = TypeVar("R")
L = TypeVar("L")


@dataclass
class Alignment:
    """How many keys were dropped from each side (0 unless the intersection was asked for)."""

    results_without_labels: int = 0
    labels_without_results: int = 0

    @property
    def dropped(self) -> int:
        return self.results_without_labels + self.labels_without_results


def align_keys(
    results: Mapping[str, R], labels: Mapping[str, L], *, allow_missing: bool = False, what: str = "images"
) -> tuple[dict[str, R], dict[str, L], Alignment]:
    """(results, labels) restricted to common keys, in the labels' order.

    Without `allow_missing`, any key on one side only is an error naming the counts.
    """
    no_labels = [k for k in results if k not in labels]
    no_results = [k for k in labels if k not in results]
    if (no_labels or no_results) and not allow_missing:
        parts = []
        if no_results:
            parts.append(f"{len(no_results)} labelled {what} have no result (e.g. {no_results[0]!r})")
        if no_labels:
            parts.append(f"{len(no_labels)} results have no label (e.g. {no_labels[0]!r})")
        raise GitcapError("; ".join(parts) + "; pass --allow-missing to score the intersection")
    keys = [k for k in labels if k in results]
    if not keys:
        raise GitcapError(f"results and labels have no {what} in common")
    return (
        {k: results[k] for k in keys},
        {k: labels[k] for k in keys},
        Alignment(results_without_labels=len(no_labels), labels_without_results=len(no_results)),
    )
