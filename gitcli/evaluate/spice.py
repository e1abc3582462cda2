"""SPICE through pycocoevalcap, only on request: it needs Stanford CoreNLP 3.6.0.

pycocoevalcap downloads CoreNLP (about 400 MB) from nlp.stanford.edu the first time
SPICE runs. Without network access that download fails; gitcap says so in one line
instead of a traceback.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

from gitcli.errors import GitcapError
from gitcli.evaluate.java import require_java

_DOWNLOAD_TIMEOUT_S = 30


def _spice_module():
    from pycocoevalcap.spice import spice

    return spice


def corenlp_jar() -> Path:
    """Where pycocoevalcap expects the CoreNLP jar that SPICE loads."""
    from pycocoevalcap.spice import get_stanford_models as g

    return Path(g.SPICEDIR) / g.SPICELIB / f"{g.JAR}.jar"


def ensure_corenlp() -> None:
    """Download CoreNLP like pycocoevalcap does, or fail with one clear line."""
    if corenlp_jar().exists():
        return
    from pycocoevalcap.spice import get_stanford_models as g

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        # pycocoevalcap prints its progress to stdout, which holds gitcap's results
        with contextlib.redirect_stdout(sys.stderr):
            g.get_stanford_models()
    except Exception as exc:  # urllib, zipfile and file-system errors alike
        raise GitcapError(
            f"SPICE cannot run: Stanford CoreNLP 3.6.0 is not at {corenlp_jar()} and could not be "
            f"downloaded ({type(exc).__name__}: {exc}); download stanford-corenlp-full-2015-12-09.zip "
            "elsewhere and copy its stanford-corenlp-3.6.0.jar and -models.jar there, or drop --spice"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def spice_score(gts: dict, res: dict) -> tuple[float, list[float]]:
    """Corpus SPICE and per-image SPICE (in the order of `gts`' keys)."""
    require_java("SPICE")
    ensure_corenlp()
    spice = _spice_module()
    try:
        score, per_sorted = spice.Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as exc:
        raise GitcapError(f"the SPICE jar failed (exit {exc.returncode}); it needs about 8 GB of memory") from None
    # pycocoevalcap's Spice returns per-image scores in sorted key order; map them back to
    # the caller's order so each image gets its own score.
    by_key = dict(zip(sorted(gts), per_sorted))
    return score, [by_key[k] for k in gts]
