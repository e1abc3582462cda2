"""METEOR's English paraphrase table, cut down to the entries a corpus can use.

The METEOR 1.5 jar that pycocoevalcap runs reads its whole paraphrase table at start-up:
5.3 million entries (62 MB gzipped), about 4 CPU-seconds, more than it then spends
scoring 5,000 images. Its paraphrase module (`ParaphraseMatcher` over a
`ParaphraseTransducer`) only uses an entry when the entry's reference phrase occurs as
a run of whole tokens in one sentence of a pair and its paraphrase in the other; the
usable entries of a phrase come back in file order, and word ids are only compared for
equality. So a table that keeps, in the original order, every entry whose two phrases
both occur somewhere in the corpus gives the jar the same matches, alignments and
scores. gitcap writes such a table per corpus and passes it with the jar's own `-a`
option.

"Occurs" is decided on the tokens the jar itself scores: each segment normalised by
METEOR's `Normalizer` (the jar's own class, run as a program; lines made only of
lowercase ASCII letters, digits and spaces, which it leaves as they are, skip that
step) and lowercased. Tokens become n-grams of up to the table's longest phrase.

The table is indexed once per machine (15-30 seconds, 135 MB) into gitcap's cache:
the distinct phrases sorted by a 64-bit code computed from their word ids, and each
entry as a pair of phrase ids. A corpus's n-grams get the same codes, so finding the
phrases it holds is a binary search per n-gram. Two phrases sharing a code can only
keep an entry that is not needed, never drop one that is.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from gitcli.errors import GitcapError
from gitcli.evaluate.java import JVM_FLAGS, require_java

INDEX_VERSION = 1
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: codes of different phrases rarely meet
# Lines METEOR's normaliser provably leaves unchanged (no punctuation, no uppercase).
_PLAIN = re.compile(r"[a-z0-9 ]*")


def cache_root() -> Path:
    """Where gitcap keeps what it builds once per machine: `$GITCAP_CACHE_DIR`, else
    `$XDG_CACHE_HOME/gitcap`, else `~/.cache/gitcap`."""
    if os.environ.get("GITCAP_CACHE_DIR"):
        return Path(os.environ["GITCAP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gitcap"


def meteor_jar_dir() -> Path:
    from pycocoevalcap.meteor import meteor as _meteor

    return Path(_meteor.__file__).resolve().parent


def default_table() -> Path:
    """The English paraphrase table that pycocoevalcap's METEOR jar loads by default."""
    return meteor_jar_dir() / "data" / "paraphrase-en.gz"


# ---- normalised tokens ------------------------------------------------------------------
def meteor_tokens(segments: Sequence[str]) -> list[list[str]]:
    """The tokens the METEOR jar scores for each segment (`-l en -norm`): normalised by
    its own `Normalizer`, then lowercased."""
    tokens: list[list[str] | None] = [s.split() if _PLAIN.fullmatch(s) else None for s in segments]
    others = [i for i, t in enumerate(tokens) if t is None]
    if others:
        for i, line in zip(others, _normalise([segments[i] for i in others])):
            tokens[i] = line.lower().split()
    return tokens  # type: ignore[return-value]


def _normalise(segments: list[str]) -> list[str]:
    """Run METEOR's `Normalizer` (English, punctuation kept, as `-norm` does) over lines."""
    if any(ch in s for s in segments for ch in "\n\r|"):
        # A line break would split a segment into lines, and '|' could move the jar's
        # ' ||| ' field boundaries: the tokens it scores are then not known here.
        raise _Unfilterable("a segment holds a line break or '|'")
    java = require_java("METEOR")
    from pycocoevalcap.meteor import meteor as _meteor

    # UTF-8 both ways: the class reads stdin and writes stdout in the platform charset.
    cmd = [java, "-Dfile.encoding=UTF-8", "-Dsun.stdout.encoding=UTF-8", "-Dstdout.encoding=UTF-8", *JVM_FLAGS,
           "-cp", _meteor.METEOR_JAR, "edu.cmu.meteor.util.Normalizer", "en", "true"]
    proc = subprocess.run(cmd, input="".join(f"{s}\n" for s in segments).encode(), cwd=meteor_jar_dir(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = proc.stdout.decode().split("\n")
    if proc.returncode != 0 or len(lines) != len(segments) + 1:
        raise _Unfilterable("METEOR's normaliser did not answer line for line")
    return lines[:-1]


class _Unfilterable(Exception):
    """The corpus cannot be matched safely against a cut table; use the whole one."""


# ---- the index ----------------------------------------------------------------------------
def _phrase_codes(ids: np.ndarray) -> np.ndarray:
    """Codes of phrases given as rows of word ids (1-based, 0 = padding after the phrase)."""
    codes = np.zeros(ids.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in ids.T:
            live = column != 0
            codes[live] = codes[live] * _MULTIPLIER + column[live].astype(np.uint64)
    return codes


def index_dir(table: Path | None = None, cache: Path | None = None) -> Path:
    """Where the index of `table` lives; a reinstalled or changed table gets a new one."""
    stat = (table or default_table()).stat()
    return (cache or cache_root()) / f"meteor-paraphrase-v{INDEX_VERSION}-{stat.st_size}-{stat.st_mtime_ns}"


def index_ready(table: Path | None = None, cache: Path | None = None) -> bool:
    return (index_dir(table, cache) / "meta.json").exists()


class ParaphraseIndex:
    """The table indexed for cutting: vocabulary, phrases sorted by code, entries."""

    def __init__(self, directory: Path) -> None:
        meta = json.loads((directory / "meta.json").read_text())
        self.max_length: int = meta["max_length"]
        self.empty_phrases: list[int] = meta["empty_phrases"]
        # Java reads the table as UTF-8, replacing malformed bytes; so does this.
        words = (directory / "words.txt").read_bytes().decode(errors="replace").split("\n")
        self.word_id = {w: i + 1 for i, w in enumerate(words)}
        self.codes = np.load(directory / "codes.npy", mmap_mode="r")
        self.entries = np.load(directory / "entries.npy", mmap_mode="r")
        self.offsets = np.load(directory / "offsets.npy", mmap_mode="r")
        self.text = (directory / "phrases.txt").read_bytes()

    @classmethod
    def open(cls, table: Path | None = None, cache: Path | None = None) -> "ParaphraseIndex":
        """The index of `table` (default: the jar's English table), built on first use."""
        directory = index_dir(table, cache)
        table = table or default_table()
        if not (directory / "meta.json").exists():
            with _exclusive(directory.with_name(directory.name + ".lock")):  # one builder at a time
                if not (directory / "meta.json").exists():
                    build_index(table, directory)
        return cls(directory)

    def kept_entries(self, segments: Iterable[Sequence[str]]) -> np.ndarray:
        """Indices (ascending) of the entries whose two phrases occur in `segments`,
        each given as its list of tokens."""
        present = np.zeros(len(self.codes), dtype=bool)
        corpus = self._ngram_codes(segments)
        if corpus.size:
            lo = np.searchsorted(self.codes, corpus, side="left")
            hi = np.searchsorted(self.codes, corpus, side="right")
            hits = hi > lo
            # Mark every phrase in [lo, hi): almost always one, several on a shared code.
            marks = np.zeros(len(self.codes) + 1, dtype=np.int32)
            np.add.at(marks, lo[hits], 1)
            np.add.at(marks, hi[hits], -1)
            present = np.cumsum(marks[:-1]) > 0
        # An empty paraphrase matches anywhere: its entries stay whenever their
        # reference phrase occurs.
        present[self.empty_phrases] = True
        return np.flatnonzero(present[self.entries[:, 0]] & present[self.entries[:, 1]])

    def _ngram_codes(self, segments: Iterable[Sequence[str]]) -> np.ndarray:
        """Codes of every n-gram (n up to the longest phrase) of words the table knows."""
        ids: list[int] = []
        for tokens in segments:
            ids.extend(self.word_id.get(t, 0) for t in tokens)
            ids.append(0)  # an unknown word or a segment's end breaks every n-gram
        flat = np.asarray(ids, dtype=np.uint64)
        found = []
        codes = np.zeros_like(flat)
        alive = np.ones(flat.shape, dtype=bool)
        with np.errstate(over="ignore"):
            for n in range(self.max_length):
                # codes[i] becomes the code of the n+1 words starting at i
                nxt = np.zeros_like(flat)
                nxt[: flat.size - n] = flat[n:]
                alive &= nxt != 0
                codes = codes * _MULTIPLIER + nxt
                found.append(codes[alive])
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)

    def phrase(self, pid: int) -> bytes:
        return self.text[int(self.offsets[pid]) : int(self.offsets[pid + 1]) - 1]

    def write_table(self, kept: np.ndarray, path: Path) -> None:
        """Write the entries `kept` in the table's own format (gzip; probability line,
        reference phrase, paraphrase). The jar does not read the probability, so each
        entry gets 0."""
        text, pairs = self.text, self.entries[kept]
        bounds = [self.offsets[pairs[:, side]].tolist() for side in (0, 1)]
        ends = [self.offsets[pairs[:, side] + 1].tolist() for side in (0, 1)]
        parts = [b"0\n" + text[rs:re_] + text[ps:pe] for rs, re_, ps, pe in zip(bounds[0], ends[0], bounds[1], ends[1])]
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(b"".join(parts))


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock` (where the platform has flock)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            import fcntl
        except ImportError:  # no flock here: concurrent builders still rename atomically
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_index(table: Path, directory: Path) -> None:
    """Index `table` into `directory` (written beside it and renamed, so a reader never
    sees half an index and two builders cannot clash)."""
    data = gzip.decompress(table.read_bytes())
    lines = data.split(b"\n")
    del data
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) % 3:
        raise GitcapError(f"{table} is not a METEOR paraphrase table (its line count is not a multiple of 3)")
    refs, pars = lines[1::3], lines[2::3]
    del lines
    # Phrase ids in order of first appearance; one dict operation per entry side.
    phrase_id: dict[bytes, int] = {}
    entries = np.empty((len(refs), 2), dtype=np.uint32)
    entries[:, 0] = [phrase_id.setdefault(p, len(phrase_id)) for p in refs]
    entries[:, 1] = [phrase_id.setdefault(p, len(phrase_id)) for p in pars]
    phrases = list(phrase_id)
    del refs, pars, phrase_id
    # The jar splits phrases with StringTokenizer (space, tab, newline, CR, form feed);
    # this table uses single spaces only, so a phrase is its words joined by one space.
    split = [[w for w in p.split(b" ") if w] for p in phrases]
    lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
    max_length = int(lengths.max(initial=1))
    word_id: dict[bytes, int] = {}
    flat = np.fromiter((word_id.setdefault(w, len(word_id) + 1) for ws in split for w in ws),
                       dtype=np.uint32, count=int(lengths.sum()))
    del split
    # Scatter the flat word ids into rows padded with 0 (one numpy call, not 2.6M).
    rows = np.repeat(np.arange(len(phrases)), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = np.zeros((len(phrases), max_length), dtype=np.uint32)
    ids[rows, cols] = flat
    del flat, rows, cols
    codes = _phrase_codes(ids)
    del ids
    # Phrases sorted by code, so a phrase's id is its position in the code array.
    order = np.argsort(codes, kind="stable")
    new_id = np.empty_like(order)
    new_id[order] = np.arange(order.size)
    entries = new_id[entries].astype(np.uint32)
    phrases = [phrases[i] for i in order.tolist()]
    empty = np.flatnonzero(lengths[order] == 0).tolist()
    offsets = np.zeros(len(phrases) + 1, dtype=np.uint64)
    np.cumsum(np.fromiter(map(len, phrases), dtype=np.uint64, count=len(phrases)) + 1, out=offsets[1:])
    words = list(word_id)

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        np.save(tmp / "codes.npy", codes[order])
        np.save(tmp / "entries.npy", entries)
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "phrases.txt").write_bytes(b"".join(p + b"\n" for p in phrases))
        (tmp / "words.txt").write_bytes(b"\n".join(words))
        (tmp / "meta.json").write_text(json.dumps({
            "version": INDEX_VERSION, "source": str(table), "entries": len(entries), "phrases": len(phrases),
            "words": len(words), "max_length": max_length,
            "empty_phrases": empty}))
        try:
            tmp.rename(directory)
        except OSError:  # another process finished first: its index is as good
            if not (directory / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_corpus_table(segments: Sequence[str], path: Path, *, table: Path | None = None,
                       cache: Path | None = None) -> int | None:
    """Write to `path` the cut table for METEOR segments exactly as the jar receives them
    (hypotheses and references). Returns the number of entries kept, or None where the
    corpus cannot be cut safely (the caller then uses the whole table)."""
    try:
        tokens = meteor_tokens(segments)
    except _Unfilterable:
        return None
    index = ParaphraseIndex.open(table, cache)
    kept = index.kept_entries(tokens)
    index.write_table(kept, path)
    return int(kept.size)
