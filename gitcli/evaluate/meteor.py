"""METEOR 1.5 through pycocoevalcap's jar, split over several jar processes.

pycocoevalcap's `Meteor` sends one `SCORE ||| refs ||| hyp` line per image to a single
jar, collects the statistics line each returns, then sends one `EVAL ||| stats ||| ...`
line and reads the per-image scores and the corpus score. The statistics of an image
depend only on that image, so gitcap computes them in several jar processes at once and
hands all of them, in the original order, to one `EVAL` call: the same bytes reach the
same aggregation code, so the scores are identical.

Each jar loads the paraphrase table cut down to the corpus (`gitcli.evaluate.paraphrase`)
instead of the whole one, which takes it from about 4 seconds of start-up to a fraction
of a second, with the same scores.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from pycocoevalcap.meteor import meteor as _meteor

from gitcli.errors import GitcapError
from gitcli.evaluate.java import JVM_FLAGS, require_java

_JAR_DIR = Path(_meteor.__file__).resolve().parent


def _clean_hypothesis(hypothesis: str) -> str:
    return hypothesis.replace("|||", "").replace("  ", " ")


def _score_line(hypothesis: str, references: Sequence[str]) -> str:
    # The same cleaning as pycocoevalcap's Meteor._stat: '|||' is the field separator.
    hypothesis = _clean_hypothesis(hypothesis)
    return " ||| ".join(("SCORE", " ||| ".join(references), hypothesis))


class _MeteorJar:
    """One `meteor-1.5.jar -stdio` process, started with pycocoevalcap's options."""

    def __init__(self, paraphrase_table: Path | None = None) -> None:
        java = require_java("METEOR")
        # pycocoevalcap's command plus JVM_FLAGS, which change speed, never results, and
        # the jar's own -a option where the paraphrase table is cut to the corpus.
        cmd = [java, "-jar", "-Xmx2G", *JVM_FLAGS, _meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        if paraphrase_table is not None:
            cmd += ["-a", str(paraphrase_table)]
        self.proc = subprocess.Popen(
            cmd, cwd=_JAR_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )

    def _exchange(self, lines: list[str], answers: int) -> list[str]:
        """Write `lines` from a thread while reading `answers` replies, so neither pipe fills up."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        stdin = self.proc.stdin

        def write() -> None:
            try:
                for line in lines:
                    stdin.write(f"{line}\n".encode())
                stdin.flush()
            except BrokenPipeError:
                pass  # the reader reports the dead process

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        replies = []
        for _ in range(answers):
            reply = self.proc.stdout.readline()
            if not reply:
                raise GitcapError("the METEOR jar (Java) stopped unexpectedly; is there enough memory for -Xmx2G?")
            replies.append(reply.decode().strip())
        writer.join()
        return replies

    def stats(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        return self._exchange([_score_line(h, refs) for h, refs in pairs], len(pairs))

    def evaluate(self, stats: Sequence[str]) -> tuple[float, list[float]]:
        eval_line = "EVAL" + "".join(f" ||| {s}" for s in stats)
        replies = self._exchange([eval_line], len(stats) + 1)
        return float(replies[-1]), [float(r) for r in replies[:-1]]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def segments_per_jar() -> int:
    """Fewest images worth a METEOR jar of their own.

    With the paraphrase table cut to the corpus a jar starts in well under a second of
    CPU, then scores about 2,000 images a second. An extra jar shortens the wall time
    only if a core is free for it and it then takes at least half a second of work.
    """
    return 1_000


def jars_for(images: int, free_cores: int) -> int:
    """How many jars to start for `images` images when `free_cores` cores are spare."""
    return max(1, min(free_cores, -(-images // segments_per_jar())))


class MeteorScorer:
    """METEOR jars for one corpus, started ahead of `score` so that their start-up
    overlaps other work.

    `hypotheses` and `references` (tokenized, one entry per image) let the jars load
    the paraphrase table cut to this corpus; without them, or where the corpus cannot
    be cut safely, they load the whole table. Call `score` once, with the same corpus.
    """

    def __init__(self, processes: int = 1, hypotheses: Sequence[str] | None = None,
                 references: Sequence[Sequence[str]] | None = None) -> None:
        self._tmp: Path | None = None
        table = None
        if hypotheses is not None and references is not None:
            table = self._cut_table(hypotheses, references)
        self.jars = [_MeteorJar(table) for _ in range(max(1, processes))]  # JVM start-ups overlap

    def _cut_table(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> Path | None:
        from gitcli.evaluate.paraphrase import write_corpus_table

        segments = [_clean_hypothesis(h) for h in hypotheses] + [r for refs in references for r in refs]
        self._tmp = Path(tempfile.mkdtemp(prefix="gitcap-meteor-"))
        path = self._tmp / "paraphrase.gz"
        try:
            kept = write_corpus_table(segments, path)
        except OSError:  # e.g. no room for the index: the whole table scores the same
            kept = None
        return path if kept is not None else None

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """Corpus METEOR and per-image METEOR, identical to pycocoevalcap's `Meteor`.

        `hypotheses[i]` is the tokenized result of image i, `references[i]` its
        tokenized references.
        """
        n = len(hypotheses)
        if n == 0:
            raise GitcapError("nothing to score: no images")
        jars = self.jars[: max(1, min(len(self.jars), n))]
        bounds = [round(i * n / len(jars)) for i in range(len(jars) + 1)]
        pairs = list(zip(hypotheses, references))
        parts: list[list[str]] = [[] for _ in jars]
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                parts[i] = jars[i].stats(pairs[bounds[i] : bounds[i + 1]])
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jars))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        # One EVAL over all statistics, in image order: the jar's own aggregation.
        return jars[0].evaluate([s for part in parts for s in part])

    def close(self) -> None:
        for jar in getattr(self, "jars", []):
            jar.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

