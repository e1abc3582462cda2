"""Finding the Java runtime that pycocoevalcap's tokenizer, METEOR and SPICE jars need."""

from __future__ import annotations

import shutil

from gitcli.errors import GitcapError


def require_java(what: str) -> str:
    """Return the `java` executable, or fail with one line saying what needs it."""
    java = shutil.which("java")
    if java is None:
        raise GitcapError(
            f"{what} needs Java (pycocoevalcap runs Stanford's PTB tokenizer and the METEOR jar); "
            "install a Java runtime (e.g. `apt install default-jre-headless`) and put `java` on PATH"
        )
    return java
