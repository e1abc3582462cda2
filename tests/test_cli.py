"""The command line: help, start-up cost, and one-line errors for user mistakes."""

import io
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gitcli.cli import COMMANDS, app

runner = CliRunner()


def test_import_does_not_load_torch():
    code = "import sys, gitcli.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def _all_commands():
    import importlib

    import typer

    for name, module, attr in COMMANDS:
        target = getattr(importlib.import_module(f"gitcli.cli.{module}"), attr)
        if isinstance(target, typer.Typer):  # a group: each of its subcommands
            for sub in target.registered_commands:
                yield [name, sub.name or sub.callback.__name__.replace("_", "-")]
        else:
            yield [name]


@pytest.mark.parametrize("command", list(_all_commands()), ids=" ".join)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "gitcap" in result.output


def test_version():
    from gitcli import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def _one_error_line(result):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_caption_prints_one_line_per_image(tiny_checkpoint, scene_images, tmp_path):
    for i, im in enumerate(scene_images[:3]):
        im.save(tmp_path / f"{i}.png")
    result = runner.invoke(app, ["caption", str(tmp_path), "-c", str(tiny_checkpoint), "--max-new-tokens", "4",
                                 "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / f"{i}.png") for i in range(3)]


def test_ask_json(tiny_checkpoint, scene_images, tmp_path):
    scene_images[0].save(tmp_path / "x.png")
    result = runner.invoke(app, ["ask", str(tmp_path / "x.png"), "what color is the circle?", "-c",
                                 str(tiny_checkpoint), "--json", "--beams", "2", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    record = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][0])
    assert record["question"] == "what color is the circle?" and isinstance(record["answer"], str)


def test_caption_static_cache_prints_the_same_captions(tiny_checkpoint, scene_images, tmp_path):
    for i, im in enumerate(scene_images[:3]):
        im.save(tmp_path / f"{i}.png")
    outputs = []
    for extra in ([], ["--cache", "static"], ["--cache", "static", "--beams", "2"], ["--beams", "2"]):
        result = runner.invoke(app, ["caption", str(tmp_path), "-c", str(tiny_checkpoint), "--max-new-tokens", "5",
                                     "--batch-size", "2", *extra])
        assert result.exit_code == 0, result.output
        outputs.append([line for line in result.stdout.splitlines() if "\t" in line])
    assert outputs[0] == outputs[1] and outputs[2] == outputs[3] and len(outputs[0]) == 3


def test_missing_image(tiny_checkpoint, tmp_path):
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "nope.jpg"), "-c", str(tiny_checkpoint)]))
    assert "not found" in line


def test_not_an_image_and_truncated_jpeg(tiny_checkpoint, scene_images, tmp_path):
    (tmp_path / "page.jpg").write_text("<html>not an image</html>")
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "page.jpg"), "-c", str(tiny_checkpoint)]))
    assert "not an image" in line
    buf = io.BytesIO()
    scene_images[0].save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "cut.jpg"), "-c", str(tiny_checkpoint)]))
    assert "cannot decode" in line


def test_foreign_checkpoint_directory(tmp_path, scene_images):
    scene_images[0].save(tmp_path / "x.png")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "gitcap.json").write_text('{"model_type": "bert"}')
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "x.png"), "-c", str(tmp_path / "ck")]))
    assert "not a gitcap checkpoint" in line


def test_bad_options_are_one_line(tiny_checkpoint, tmp_path, scene_images):
    scene_images[0].save(tmp_path / "x.png")
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "x.png"), "-c", str(tiny_checkpoint),
                                               "--beams", "2", "--temperature", "0.7"]))
    assert "exclusive" in line
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "x.png"), "-c", str(tiny_checkpoint),
                                               "--compile"]))
    assert "--compile needs --cache static" in line
    line = _one_error_line(runner.invoke(app, ["ask", str(tmp_path / "x.png"), "what?", "-c", str(tiny_checkpoint),
                                               "--cache", "paged"]))
    assert "--cache must be one of dynamic, static" in line
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "x.png"), "-c", str(tiny_checkpoint),
                                               "--device", "cuda:7"]))
    assert "cuda" in line.lower()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixel data: what a decompression bomb's
    header looks like (the real ones add a few hundred KB of zlib stream)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_images_over_the_pixel_limit_or_of_other_formats_are_refused_from_the_header(tiny_checkpoint, scene_images,
                                                                                    tmp_path):
    """60 MP is under Pillow's own bomb limit (it would be decoded, a GB and more); the
    limit is fetch's 50 MP, read from the header; --max-pixels moves it."""
    (tmp_path / "big.png").write_bytes(_png_header_only(10_000, 6_000))
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "big.png"), "-c", str(tiny_checkpoint)]))
    assert "10000x6000" in line and "50000000 pixels" in line
    scene_images[0].save(tmp_path / "small.png")
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "small.png"), "-c", str(tiny_checkpoint),
                                               "--max-pixels", "1000"]))
    assert "more than the limit of 1000 pixels" in line
    scene_images[0].save(tmp_path / "scene.ppm")  # Pillow reads PPM (and EPS, PSD, ...); a photo is none of them
    line = _one_error_line(runner.invoke(app, ["caption", str(tmp_path / "scene.ppm"), "-c", str(tiny_checkpoint)]))
    assert "is not an image" in line
