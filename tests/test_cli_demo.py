"""A shortened `gitcap demo` learns: far better than the untrained model."""

import json

import pytest

from typer.testing import CliRunner

from gitcli.cli import app


@pytest.mark.slow
def test_short_demo_beats_the_untrained_model(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(out), "--steps", "250", "--train-scenes", "600",
                                      "--held-out", "30"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "demo.json").read_text())
    before, after = report["untrained"], report["trained"]
    assert before["CIDEr"] < 0.5
    assert after["CIDEr"] > before["CIDEr"] + 0.5 and after["CIDEr"] > 3 * before["CIDEr"]
    assert after["vqa_exact_match"] > before["vqa_exact_match"] + 0.2
    assert "gitcap train --preset tiny" in report["equivalent_command"]
    # the kept checkpoint captions a held-out scene afterwards
    from gitcli.data.synthetic import make_scene

    make_scene(1, 0).image.save(tmp_path / "scene.png")
    caption = CliRunner().invoke(app, ["caption", str(tmp_path / "scene.png"), "--checkpoint", str(out)])
    assert caption.exit_code == 0 and caption.stdout.strip()
    # a second demo into the same folder is refused with one line
    again = CliRunner().invoke(app, ["demo", "--output-dir", str(out)])
    assert again.exit_code != 0 and "already holds" in again.output
