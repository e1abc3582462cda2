"""METEOR's paraphrase table cut to a corpus: the same entries matter, the same scores come out."""

from __future__ import annotations

import gzip
import random
import shutil

import numpy as np
import pytest

from gitcli.errors import GitcapError
from gitcli.evaluate import meteor, paraphrase
from gitcli.evaluate.paraphrase import ParaphraseIndex, build_index, meteor_tokens, write_corpus_table

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")

WORDS = ["a", "dog", "cat", "man", "runs", "on", "the", "grass", "in", "park", "big", "small", "red"]


def _fake_table(path, entries):
    """A table in METEOR's format: probability, reference phrase, paraphrase."""
    with gzip.open(path, "wb") as f:
        f.write("".join(f"0.5\n{ref}\n{par}\n" for ref, par in entries).encode())


def _random_entries(rng, count):
    def phrase():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))

    entries = [(phrase(), phrase()) for _ in range(count)]
    return entries + entries[:5]  # repeated entries are kept as repeated


def _occurs(phrase, segments):
    words = phrase.split()
    return any(seg[i : i + len(words)] == words for seg in segments for i in range(len(seg) - len(words) + 1))


def _read_table(path):
    lines = gzip.decompress(path.read_bytes()).decode().split("\n")
    assert lines[-1] == ""
    return list(zip(lines[1:-1:3], lines[2:-1:3]))


@pytest.fixture()
def small_index(tmp_path):
    rng = random.Random(0)
    entries = _random_entries(rng, 400)
    table = tmp_path / "paraphrase-test.gz"
    _fake_table(table, entries)
    return ParaphraseIndex.open(table, cache=tmp_path / "cache"), entries


def test_index_keeps_exactly_the_entries_whose_two_phrases_occur(small_index, tmp_path):
    index, entries = small_index
    rng = random.Random(1)
    for _ in range(20):
        segments = [[rng.choice(WORDS + ["unknown"]) for _ in range(rng.randint(0, 8))] for _ in range(rng.randint(1, 4))]
        kept = index.kept_entries(segments).tolist()
        expected = [i for i, (ref, par) in enumerate(entries) if _occurs(ref, segments) and _occurs(par, segments)]
        assert kept == expected
        out = tmp_path / "cut.gz"
        index.write_table(np.asarray(kept, dtype=np.int64), out)
        assert _read_table(out) == [entries[i] for i in expected]  # file order, text unchanged
    assert index.kept_entries([[]]).size == 0


def test_phrases_sharing_a_code_keep_more_never_less(small_index, monkeypatch, tmp_path):
    index, entries = small_index
    # Rebuild with a code that collides on purpose: only the last word counts.
    monkeypatch.setattr(paraphrase, "_MULTIPLIER", np.uint64(0))
    table = tmp_path / "paraphrase-collide.gz"
    _fake_table(table, entries)
    colliding = ParaphraseIndex.open(table, cache=tmp_path / "cache2")
    segments = [["a", "dog", "runs", "on", "the", "grass"], ["the", "big", "red", "cat"]]
    exact = set(index.kept_entries(segments).tolist())
    loose = set(colliding.kept_entries(segments).tolist())
    assert exact and exact < loose


def test_the_index_is_built_once_and_reused(tmp_path, monkeypatch):
    table = tmp_path / "p.gz"
    _fake_table(table, [("a dog", "a cat")])
    ParaphraseIndex.open(table, cache=tmp_path / "c")
    monkeypatch.setattr(paraphrase, "build_index", lambda *a: pytest.fail("rebuilt"))
    assert ParaphraseIndex.open(table, cache=tmp_path / "c").kept_entries([["a", "dog", "a", "cat"]]).tolist() == [0]


def test_a_table_with_a_broken_line_count_is_refused(tmp_path):
    table = tmp_path / "p.gz"
    table.write_bytes(gzip.compress(b"0.5\na dog\n"))
    with pytest.raises(GitcapError, match="not a METEOR paraphrase table"):
        build_index(table, tmp_path / "index")


def test_plain_lines_are_their_own_tokens(monkeypatch):
    monkeypatch.setattr(paraphrase, "_normalise", lambda lines: pytest.fail(f"normaliser run on {lines}"))
    assert meteor_tokens(["a dog  on 2 legs", ""]) == [["a", "dog", "on", "2", "legs"], []]


@needs_java
def test_other_lines_get_the_jars_own_normalisation():
    # METEOR splits "'s" and "n't" its own way, drops the dots of "u.s.", splits dashes
    # between letters and keeps "10,000" whole.
    assert meteor_tokens(["a man 's t-shirt , made in the u.s. ...", "he does n't", "café at 10,000 feet"]) == [
        ["a", "man", "'", "s", "t", "shirt", ",", "made", "in", "the", "us", "..."],
        ["he", "does", "n", "'t"],
        ["café", "at", "10,000", "feet"],
    ]


def test_segments_the_jar_would_split_differently_are_not_cut(tmp_path):
    assert write_corpus_table(["a dog | a cat"], tmp_path / "cut.gz") is None
    assert write_corpus_table(["a dog\ra cat"], tmp_path / "cut.gz") is None


@needs_java
@pytest.mark.slow  # pycocoevalcap's METEOR loads its whole paraphrase table
def test_the_cut_table_gives_the_jar_the_same_statistics_as_the_whole_table(tmp_path):
    """The real table and the real jar: every statistic the jar returns is the same."""
    pairs = [
        ("a man is riding a bike down the street", ["a person riding a bicycle on a road", "a guy on a bike"]),
        ("a lot of people are standing outside", ["many people stand outside a building", "a large crowd outdoors"]),
        ("a man 's t-shirt with a u.s. flag", ["the shirt of a man shows the american flag", "a tee shirt"]),
        ("he does n't want to eat the cake", ["he is not willing to eat a piece of cake", "he refuses cake"]),
        ("a café at 10,000 feet ... really", ["a coffee shop high in the mountains", "a cafe up high"]),
        ("two dogs are playing with each other", ["a couple of dogs play together", "two puppies playing"]),
    ]
    hypotheses = [h for h, _ in pairs]
    references = [r for _, r in pairs]
    cut = tmp_path / "cut.gz"
    kept = write_corpus_table(hypotheses + [r for refs in references for r in refs], cut)
    assert kept is not None and 0 < kept < 100_000
    empty = tmp_path / "empty.gz"
    empty.write_bytes(gzip.compress(b""))

    def stats(table):
        jar = meteor._MeteorJar(table)
        try:
            lines = jar.stats(pairs)
            return lines, jar.evaluate(lines)
        finally:
            jar.close()

    whole = stats(None)
    assert stats(cut) == whole
    # ...and the paraphrases matter for this corpus, so the comparison can fail.
    assert stats(empty)[0] != whole[0]
