"""Stanford PTB tokenization exactly as pycocoevalcap's `PTBTokenizer` does it.

pycocoevalcap writes a group's captions (all references, or all results) one per line to
a file (a `\\n` inside a caption becomes a space), runs the jar on it with
`-preserveLines` and pairs the n-th output line with the n-th caption, dropping any
lines left over. gitcap does the same, one jar launch per group, the two groups at once.

The jar's lexer also ends a line at `\\r`, `\\v`, `\\f`, U+2028 or U+2029, but not
everywhere: inside what it reads as an e-mail address or a URL (`a@b\\u2028`) the
character stays part of the token, and `\\r\\n` is one break. A caption holding such a break
becomes two lines and every later caption of its group is paired with its neighbour's
tokens; `COCOEvalCap.evaluate()` scores exactly that pairing, and so does gitcap. No
model of the lexer is kept here: the pairing is whatever the jar's own output gives, so
it cannot drift from pycocoevalcap's whatever the text.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pycocoevalcap.tokenizer import ptbtokenizer as _ptb

from gitcli.errors import GitcapError
from gitcli.evaluate.java import JVM_FLAGS, require_java

_JAR_DIR = Path(_ptb.__file__).resolve().parent
_JAR = _ptb.STANFORD_CORENLP_3_4_1_JAR
# The tokens pycocoevalcap drops after tokenizing (its PUNCTUATIONS list).
_DROP = frozenset(_ptb.PUNCTUATIONS)


@dataclass
class Tokenized:
    """One group, tokenized: per image, its captions' tokens (space-separated, lowercased,
    punctuation tokens dropped), and how many more lines the jar returned than the group
    has captions (line breaks it found inside captions)."""

    captions: list[list[str]]
    extra_lines: int


def _run_jar(text: str) -> list[str]:
    """One jar launch on `text` (pycocoevalcap's input file); returns the raw output lines."""
    java = require_java("caption scoring")
    # pycocoevalcap writes its temp file into the (possibly read-only) package folder;
    # the jar reads any path, so ours goes to the system temp dir.
    fd, path = tempfile.mkstemp(prefix="gitcap-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
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


def tokenize_group(group: list[list[str]]) -> Tokenized:
    """Tokenize one group (per image, its captions) as pycocoevalcap's `PTBTokenizer` does."""
    image_of_caption = [i for i, caps in enumerate(group) for _ in caps]
    out = _run_jar("\n".join(c.replace("\n", " ") for caps in group for c in caps))
    shaped: list[list[str]] = [[] for _ in group]
    for i, line in zip(image_of_caption, out):  # pycocoevalcap's zip(image_id, lines)
        shaped[i].append(_clean(line))
    if any(caps and not tokens for caps, tokens in zip(group, shaped)):
        # pycocoevalcap would leave the image out, and COCOEvalCap fail on the missing key
        raise GitcapError(
            f"the PTB tokenizer returned {len(out)} lines for {len(image_of_caption)} captions, so some "
            "images have no tokens; please report this with the captions that caused it"
        )
    return Tokenized(shaped, max(0, len(out) - len(image_of_caption)))


def tokenize_groups(*groups: list[list[str]]) -> tuple[Tokenized, ...]:
    """`tokenize_group` for each group (e.g. references, results), the launches in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        return tuple(pool.map(tokenize_group, groups))
