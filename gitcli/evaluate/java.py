"""Finding the Java runtime that pycocoevalcap's tokenizer, METEOR and SPICE jars need."""

from __future__ import annotations

import shutil

from gitcli.errors import GitcapError

# pycocoevalcap's jars live briefly: load data, process a few thousand sentences, exit.
# The C2 optimising compiler spends more CPU than it saves on such runs (and competes
# for the cores with the other scorers), so the JVM stops at C1. Since Java 17 all
# floating point is strict IEEE (JEP 306): the compiler tier cannot change a score, and
# the parity test and the benchmark check that the scores are identical.
JVM_FLAGS = ("-XX:TieredStopAtLevel=1",)


def require_java(what: str) -> str:
    """Return the `java` executable, or fail with one line saying what needs it."""
    java = shutil.which("java")
    if java is None:
        raise GitcapError(
            f"{what} needs Java (pycocoevalcap runs Stanford's PTB tokenizer and the METEOR jar); "
            "install a Java runtime (e.g. `apt install default-jre-headless`) and put `java` on PATH"
        )
    return java
