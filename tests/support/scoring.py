"""Helpers of the formats/evaluate/CLI-scoring tests: tiny images, JSON files, a CLI runner.

A plain module rather than conftest.py, so other test suites keep their own conftest.
Import the `cli` fixture by name to use it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(color: tuple[int, int, int] = (20, 200, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def cli():
    """Run `gitcap ARGS...` in-process; returns the click Result."""
    from typer.testing import CliRunner

    from gitcli.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return run
