"""SPICE through pycocoevalcap, only on request: it needs Stanford CoreNLP 3.6.0.

pycocoevalcap's own answer to a missing CoreNLP is to download a 400 MB zip over plain
HTTP at first use, with no checksum, and then run the jars inside it. gitcap never lets
it: SPICE runs only with CoreNLP's two jars already in pycocoevalcap's `spice/lib`
folder, put there by the user from a download they checked (the one-line error says
where from and how), and gitcap checks that they are whole jars of CoreNLP before
starting Java. The download is refused rather than pinned: Stanford publishes no
checksum for its zip, so there is no digest gitcap could honestly pin.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

from gitcli.errors import GitcapError
from gitcli.evaluate.java import require_java

CORENLP_VERSION = "3.6.0"
# Maven Central serves both jars over HTTPS with a `.sha1` file beside each.
MAVEN_URL = f"https://repo1.maven.org/maven2/edu/stanford/nlp/stanford-corenlp/{CORENLP_VERSION}/"
# An entry each jar must hold: a truncated download or another file is refused.
_MAIN_ENTRY = "edu/stanford/nlp/pipeline/StanfordCoreNLP.class"
_MODELS_PREFIX = "edu/stanford/nlp/models/"


def _spice_module():
    from pycocoevalcap.spice import spice

    return spice


def corenlp_jar() -> Path:
    """Where pycocoevalcap's SPICE jar loads CoreNLP from (its models jar sits beside it)."""
    from pycocoevalcap.spice import get_stanford_models as g

    return Path(g.SPICEDIR) / g.SPICELIB / f"{g.JAR}.jar"


def models_jar() -> Path:
    jar = corenlp_jar()
    return jar.with_name(f"{jar.stem}-models.jar")


def how_to_install() -> str:
    """Where the jars go and how to get a verified copy of each."""
    name = f"stanford-corenlp-{CORENLP_VERSION}"
    return (
        f"download {name}.jar and {name}-models.jar from {MAVEN_URL} (HTTPS), check each with "
        f"`sha1sum` against the .sha1 file beside it there, and put both in {corenlp_jar().parent}/"
    )


def _check_jar(path: Path, *, holds: str) -> str | None:
    """Why `path` is not a whole CoreNLP jar holding `holds` (an entry or a prefix), or None."""
    try:
        with zipfile.ZipFile(path) as jar:
            names = jar.namelist()
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path} is not a whole jar ({exc})"
    if not any(n == holds or (holds.endswith("/") and n.startswith(holds)) for n in names):
        return f"{path} is not CoreNLP {CORENLP_VERSION}'s jar (no {holds})"
    return None


def ensure_corenlp() -> None:
    """Check CoreNLP's jars before any scoring starts, or fail with one line saying how
    to install a verified copy. Nothing is downloaded."""
    problem = _check_jar(corenlp_jar(), holds=_MAIN_ENTRY) or _check_jar(models_jar(), holds=_MODELS_PREFIX)
    if problem:
        raise GitcapError(
            f"SPICE needs Stanford CoreNLP {CORENLP_VERSION}, which gitcap does not download unchecked: {problem}; "
            f"{how_to_install()} (or drop --spice)"
        )


def spice_score(gts: dict, res: dict) -> tuple[float, list[float]]:
    """Corpus SPICE and per-image SPICE (in the order of `gts`' keys)."""
    require_java("SPICE")
    ensure_corenlp()
    spice = _spice_module()
    # Spice() calls pycocoevalcap's downloader first thing: let it only check, never fetch.
    spice.get_stanford_models = ensure_corenlp
    try:
        score, per_sorted = spice.Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as exc:
        raise GitcapError(f"the SPICE jar failed (exit {exc.returncode}); it needs about 8 GB of memory") from None
    # pycocoevalcap's Spice returns per-image scores in sorted key order; map them back to
    # the caller's order so each image gets its own score.
    by_key = dict(zip(sorted(gts), per_sorted))
    return score, [by_key[k] for k in gts]
