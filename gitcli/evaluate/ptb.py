"""Stanford PTB tokenization exactly as pycocoevalcap's `PTBTokenizer` does it.

`COCOEvalCap` launches the tokenizer jar twice (references, then results). gitcap
tokenizes both in one launch: the jar runs with `-preserveLines`, so every input line
is tokenized on its own and one launch gives the same lines as two. If a caption holds a
character the jar itself treats as a line break, the line count no longer matches and we
fall back to separate launches, so the alignment is always COCOEvalCap's.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from pycocoevalcap.tokenizer import ptbtokenizer as _ptb

from gitcli.errors import GitcapError
from gitcli.evaluate.java import JVM_FLAGS, require_java

_JAR_DIR = Path(_ptb.__file__).resolve().parent
_JAR = _ptb.STANFORD_CORENLP_3_4_1_JAR
# The tokens pycocoevalcap drops after tokenizing (its PUNCTUATIONS list).
_DROP = frozenset(_ptb.PUNCTUATIONS)


def _run_jar(lines: list[str]) -> list[str]:
    """Tokenize `lines` (no newlines inside) in one jar launch; returns the raw output lines."""
    java = require_java("caption scoring")
    # pycocoevalcap writes its temp file into the (possibly read-only) package folder;
    # the jar reads any path, so ours goes to the system temp dir.
    fd, path = tempfile.mkstemp(prefix="gitcap-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write("\n".join(lines).encode())
        # pycocoevalcap's command; the C1-only JIT flag (see gitcli.evaluate.java)
        # makes this short run cheaper and cannot change its output.
        cmd = [java, *JVM_FLAGS, "-cp", _JAR, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        proc = subprocess.run(cmd, cwd=_JAR_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise GitcapError(f"the PTB tokenizer (Java) failed: {tail[0]}")
    return proc.stdout.decode().split("\n")


def _clean(line: str) -> str:
    return " ".join(w for w in line.rstrip().split(" ") if w not in _DROP)


def _tokenize_flat(lines: list[str]) -> list[str] | None:
    """Tokenized lines, or None when the jar's output does not align line for line."""
    out = _run_jar(lines)
    # The jar ends its output with a newline, so a well-aligned output has one extra
    # empty element after splitting.
    if len(out) not in (len(lines), len(lines) + 1) or (len(out) == len(lines) + 1 and out[-1] != ""):
        return None
    return [_clean(line) for line in out[: len(lines)]]


def _tokenize_like_pycocoevalcap(lines: list[str]) -> list[str]:
    """The exact pycocoevalcap behaviour, including zip's truncation on misalignment."""
    out = _run_jar(lines)
    return [_clean(line) for _, line in zip(lines, out)]


def tokenize_groups(*groups: list[list[str]]) -> tuple[list[list[str]], ...]:
    """Tokenize several groups (e.g. references, results) of per-image caption lists.

    Each group is a list (one entry per image) of caption lists. Returns the same
    structure, tokenized and lowercased, punctuation tokens removed.
    """
    flats = [[c.replace("\n", " ") for caps in group for c in caps] for group in groups]
    tokens = _tokenize_flat([c for flat in flats for c in flat])
    if tokens is not None:
        per_group, start = [], 0
        for flat in flats:
            per_group.append(tokens[start : start + len(flat)])
            start += len(flat)
    else:  # one launch per group, as COCOEvalCap does
        per_group = [_tokenize_like_pycocoevalcap(flat) for flat in flats]
    result = []
    for group, toks in zip(groups, per_group):
        it = iter(toks)
        shaped = []
        for caps in group:
            shaped.append([t for _, t in zip(caps, it)])
        result.append(shaped)
    return tuple(result)
