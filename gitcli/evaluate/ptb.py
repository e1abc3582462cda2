"""Stanford PTB tokenization exactly as pycocoevalcap's `PTBTokenizer` does it.

pycocoevalcap writes a group's captions one per line (a `\\n` inside a caption becomes a
space), runs the jar with `-preserveLines` and pairs the n-th output line with the n-th
caption. The jar also ends a line at `\\r` (`\\r\\n` once), `\\v`, `\\f`, U+2028 and
U+2029 (found by feeding it every code point; U+0085 is read as "..."), so a caption
holding one of them becomes two lines and every later caption of its group is paired
with its neighbour's tokens. `COCOEvalCap.evaluate()` scores exactly that pairing.

gitcap reproduces it structurally instead of by counting output lines: it cuts the text
into the jar's own lines in Python (`jar_lines`), so no line it sends contains a break,
and pairs line n with caption n as pycocoevalcap does. References and results go through
one launch, each group followed by a marker line; the output must hold every marker at
its own line number, or the launch is refused, never paired by guesswork.
"""

from __future__ import annotations

import os
import re
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
# Where the jar's lexer ends a line.
_JAR_LINE_BREAK = re.compile("\r\n|[\n\r\x0b\x0c\u2028\u2029]")
# Ends each group in the shared launch: a lowercase word the jar returns unchanged.
_GROUP_END = "gitcapendofgroup"


def jar_lines(captions: list[str]) -> list[str]:
    """The lines the jar reads when pycocoevalcap writes `captions` to its input file."""
    return _JAR_LINE_BREAK.split("\n".join(c.replace("\n", " ") for c in captions))


def breaks_lines(caption: str) -> bool:
    """Whether the jar cuts this caption in two where pycocoevalcap expects one line: the
    captions after it in its group are then paired with the wrong tokens, in COCOEvalCap
    and so in gitcap."""
    text = caption.replace("\n", " ")
    # A final '\r' meets the '\n' that ends the caption's line: one break, not two.
    return _JAR_LINE_BREAK.search(text[:-1] if text.endswith("\r") else text) is not None


def _run_jar(lines: list[str]) -> list[str]:
    """Tokenize `lines` (no line breaks inside) in one jar launch; returns the raw output lines."""
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
    # The jar writes one '\n' per line break it read and none after the last line.
    return proc.stdout.decode().split("\n")


def _clean(line: str) -> str:
    return " ".join(w for w in line.rstrip().split(" ") if w not in _DROP)


def tokenize_groups(*groups: list[list[str]]) -> tuple[list[list[str]], ...]:
    """Tokenize several groups (e.g. references, results) of per-image caption lists.

    Each group is a list (one entry per image) of caption lists. Returns the same
    structure, tokenized and lowercased, punctuation tokens removed, each caption paired
    with the jar line pycocoevalcap pairs it with. (The jar's lines are never fewer than
    the captions: every caption ends at a break.)
    """
    per_group = [jar_lines([c for caps in group for c in caps]) for group in groups]
    sent: list[str] = []
    ends: list[int] = []
    for lines in per_group:
        sent.extend(lines)
        ends.append(len(sent))
        sent.append(_GROUP_END)
    out = _run_jar(sent)
    if len(out) != len(sent) or any(out[i] != _GROUP_END for i in ends):
        raise GitcapError(
            f"the PTB tokenizer's output does not line up with its input ({len(out)} lines for {len(sent)}, "
            "or a group's end marker moved), so its tokens cannot be paired with the captions; "
            "please report this with the captions that caused it"
        )
    result = []
    start = 0
    for group, end in zip(groups, ends):
        image_of_caption = [i for i, caps in enumerate(group) for _ in caps]
        shaped: list[list[str]] = [[] for _ in group]
        # pycocoevalcap's zip(image_id, lines): caption n takes line n; extra lines are dropped.
        for i, line in zip(image_of_caption, out[start:end]):
            shaped[i].append(_clean(line))
        start = end + 1
        result.append(shaped)
    return tuple(result)
