"""infer-tsv: input order, resume, rank split and merge, bad rows, questions alignment."""

import base64
import io
import json

import pytest
import torch
from typer.testing import CliRunner

from gitcli.cli import app
from gitcli.config import GenerationConfig
from gitcli.errors import GitcapError
from gitcli.infer_tsv import infer_tsv
from gitcli.model.checkpoint import load_checkpoint, save_checkpoint

GEN = GenerationConfig(max_new_tokens=4)


def _b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).eval()


@pytest.fixture
def image_tsv(tmp_path, scene_images):
    path = tmp_path / "test.img.tsv"
    path.write_text("".join(f"{100 + i}\t{_b64(im)}\n" for i, im in enumerate(scene_images)))
    return path


def _rows(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def _run(model, images, out, **kw):
    return infer_tsv(model, torch.device("cpu"), "fp32", images, out, GEN, batch_size=4, **kw)


def test_results_in_input_order_with_indexes_and_coco_json(model, image_tsv, tmp_path, scene_images):
    out = tmp_path / "res.tsv"
    report = _run(model, image_tsv, out, coco_json=tmp_path / "res.json")
    rows = _rows(out)
    assert [r[0] for r in rows] == [str(100 + i) for i in range(len(scene_images))]
    assert all(isinstance(json.loads(r[1])[0]["caption"], str) for r in rows)
    assert (tmp_path / "res.tsv.lineidx").is_file() and (tmp_path / "res.tsv.lineidx.8b").is_file()
    coco = json.loads((tmp_path / "res.json").read_text())
    assert coco[0]["image_id"] == 100 and isinstance(coco[0]["image_id"], int)
    assert report.written == len(scene_images) and not report.failed
    assert not list(tmp_path.glob("res.tsv.partial-*"))


def test_resume_skips_finished_rows(model, image_tsv, tmp_path):
    full = tmp_path / "full.tsv"
    _run(model, image_tsv, full)
    out = tmp_path / "res.tsv"
    done = _rows(full)[:2]
    # an interrupted run of the same inputs: its record, two rows finished, a third torn mid-line
    (tmp_path / "res.tsv.provenance.json").write_bytes((tmp_path / "full.tsv.provenance.json").read_bytes())
    (tmp_path / "res.tsv.partial-0.tsv").write_text(
        f"0\t{done[0][0]}\t{done[0][1]}\n1\t{done[1][0]}\t{done[1][1]}\n2\t102\t[{{\"capt")
    report = _run(model, image_tsv, out)
    assert report.skipped == 2 and report.written == len(_rows(full)) - 2
    assert out.read_text() == full.read_text()
    again = _run(model, image_tsv, out)  # everything done: nothing generated
    assert again.written == 0 and out.read_text() == full.read_text()


def test_ranks_split_rows_and_merge_in_order(model, image_tsv, tmp_path):
    single = tmp_path / "single.tsv"
    _run(model, image_tsv, single)
    out = tmp_path / "multi.tsv"
    r1 = _run(model, image_tsv, out, rank=1, world=2)
    assert r1.written == 3 and not out.exists()  # rank 1 only writes its part
    r0 = _run(model, image_tsv, out, rank=0, world=2)
    assert r0.written == 3 and r0.merged
    assert out.read_text() == single.read_text()


def test_questions_aligned_and_answered(model, image_tsv, tmp_path):
    qs = tmp_path / "test.question.tsv"
    lines = []
    for i in range(6):
        items = [{"question": "what color is the circle?", "question_id": 10 * i + j} for j in range(1 + i % 2)]
        lines.append(f"{100 + i}\t{json.dumps(items)}")
    qs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "vqa.tsv"
    report = _run(model, image_tsv, out, questions=qs, coco_json=tmp_path / "vqa.json")
    rows = _rows(out)
    assert [[a["question_id"] for a in json.loads(r[1])] for r in rows] == \
        [[10 * i + j for j in range(1 + i % 2)] for i in range(6)]
    assert report.outputs == 9
    assert len(json.loads((tmp_path / "vqa.json").read_text())) == 9


def test_misaligned_questions_are_refused(model, image_tsv, tmp_path):
    qs = tmp_path / "q.tsv"
    qs.write_text("".join(f"{200 + i}\t[{{\"question\": \"q\", \"question_id\": {i}}}]\n" for i in range(6)))
    with pytest.raises(GitcapError, match="key '200'"):
        _run(model, image_tsv, tmp_path / "x.tsv", questions=qs)
    qs.write_text("100\t[{\"question\": \"q\", \"question_id\": \"7\"}]\n" * 6)
    with pytest.raises(GitcapError, match="question_id"):
        _run(model, image_tsv, tmp_path / "x.tsv", questions=qs)


def test_bad_row_fails_alone_and_cli_exits_nonzero(tiny_checkpoint, image_tsv, tmp_path):
    lines = image_tsv.read_text().splitlines()
    lines[2] = "102\t%%%not-base64%%%"
    lines[4] = "104\t" + base64.b64encode(b"<html>hello</html>").decode()
    image_tsv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "res.tsv"
    result = CliRunner().invoke(app, ["infer-tsv", "--images", str(image_tsv), "--out", str(out), "-c",
                                      str(tiny_checkpoint), "--max-new-tokens", "3"])
    assert result.exit_code == 1, result.output
    assert "row 2" in result.output and "row 4" in result.output and "Traceback" not in result.output
    assert [r[0] for r in _rows(out)] == ["100", "101", "103", "105"]


def test_cli_static_cache_writes_the_same_results(tiny_checkpoint, image_tsv, tmp_path):
    """--cache static reaches the decoder and changes no output; 6 rows in batches of 4
    give two batch shapes, so the static state is rebuilt once on the way."""
    outputs = []
    for extra in ([], ["--cache", "static"]):
        out = tmp_path / f"res{len(outputs)}.tsv"
        result = CliRunner().invoke(app, ["infer-tsv", "--images", str(image_tsv), "--out", str(out), "-c",
                                          str(tiny_checkpoint), "--max-new-tokens", "4", "--batch-size", "4",
                                          "--beams", "2", "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 6


def _question_tsv(path, question="what color is the circle?"):
    items = lambda i: json.dumps([{"question": question, "question_id": i}])  # noqa: E731
    path.write_text("".join(f"{100 + i}\t{items(i)}\n" for i in range(6)))
    return path


def test_rerun_with_other_inputs_is_refused_and_overwrite_starts_over(model, image_tsv, tmp_path, tiny_captioner):
    out = tmp_path / "res.tsv"
    _run(model, image_tsv, out, questions=_question_tsv(tmp_path / "q.tsv"))
    before = out.read_text()
    other = load_checkpoint(save_checkpoint(tiny_captioner, tmp_path / "other")).eval()
    beams3 = GenerationConfig(max_new_tokens=4, beams=3)
    cpu = torch.device("cpu")
    refusals = [
        (lambda: _run(other, image_tsv, out, questions=tmp_path / "q.tsv"), "another model .*checkpoint .*other"),
        (lambda: infer_tsv(model, cpu, "fp32", image_tsv, out, beams3, questions=tmp_path / "q.tsv", batch_size=4),
         "--beams 1 then, 3 now"),
        (lambda: _run(model, image_tsv, out), "--questions then but not now"),
        (lambda: _run(model, image_tsv, out, questions=_question_tsv(tmp_path / "q2.tsv", "how many shapes?")),
         "another --questions TSV"),
    ]
    for attempt, difference in refusals:
        with pytest.raises(GitcapError, match=difference + ".*--overwrite.*another --out"):
            attempt()
        assert out.read_text() == before  # nothing written, nothing lost
    same = _run(model, image_tsv, out, questions=tmp_path / "q.tsv")  # the same inputs resume
    assert (same.skipped, same.written) == (6, 0) and out.read_text() == before
    fresh = infer_tsv(model, cpu, "fp32", image_tsv, out, beams3, batch_size=4, overwrite=True)
    assert (fresh.skipped, fresh.written) == (0, 6)
    assert "answer" not in out.read_text()  # captions now: the earlier answers were discarded
    resumed = infer_tsv(model, cpu, "fp32", image_tsv, out, beams3, batch_size=4)
    assert (resumed.skipped, resumed.written) == (6, 0)


def test_rows_without_a_record_are_not_trusted_and_the_cli_refuses_in_one_line(tiny_checkpoint, image_tsv, tmp_path):
    out = tmp_path / "res.tsv"
    out.write_text("100\t[{\"caption\": \"stale\"}]\n")  # rows from before records existed
    args = ["infer-tsv", "--images", str(image_tsv), "--out", str(out), "-c", str(tiny_checkpoint),
            "--max-new-tokens", "3", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no provenance record" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = CliRunner().invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "stale" not in out.read_text() and len(_rows(out)) == 6


def test_images_without_questions_flow_through_with_empty_rows(model, image_tsv, tmp_path):
    """test-dev is a subset of test2015's images: `gitcap tsv questions` writes [] for the
    others. Such a row has nothing to answer: it is written as [] and costs no decoding."""
    qs = tmp_path / "q.tsv"
    asked = {0: 2, 3: 1}  # rows with questions; the others have none
    qs.write_text("".join(
        f"{100 + i}\t{json.dumps([{'question': 'what color is the circle?', 'question_id': 10 * i + j} for j in range(asked.get(i, 0))])}\n"
        for i in range(6)))
    out = tmp_path / "vqa.tsv"
    report = _run(model, image_tsv, out, questions=qs, coco_json=tmp_path / "vqa.json")
    rows = _rows(out)
    assert [r[0] for r in rows] == [str(100 + i) for i in range(6)]
    assert [[a["question_id"] for a in json.loads(r[1])] for r in rows] == [[0, 1], [], [], [30], [], []]
    assert report.outputs == 3 and report.written == 6 and not report.failed
    assert sorted(a["question_id"] for a in json.loads((tmp_path / "vqa.json").read_text())) == [0, 1, 30]


def test_a_second_infer_tsv_into_the_same_out_is_refused_naming_the_first(tiny_checkpoint, image_tsv, tmp_path):
    """A real second process: refused in one line with the holder's pid, exit 2, before its
    model loads; another rank of the same output is not blocked (ranks share it by design)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gitcli.infer_tsv import output_lock

    out = tmp_path / "res.tsv"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with output_lock(out, rank=0):
        other_rank = _run(load_checkpoint(tiny_checkpoint).eval(), image_tsv, out, rank=1, world=2)
        assert other_rank.written == 3
        second = subprocess.run([sys.executable, "-m", "gitcli", "infer-tsv", "--images", str(image_tsv), "--out",
                                 str(out), "-c", str(tiny_checkpoint), "--device", "cpu"],
                                cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"pid {os.getpid()}" in second.stderr and "--out" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and not second.stdout
    assert not out.exists()  # the first one's output untouched


def test_cli_summary_on_stdout_and_out_checked_before_work(tiny_checkpoint, image_tsv, tmp_path):
    out = tmp_path / "res.tsv"
    args = ["infer-tsv", "--images", str(image_tsv), "-c", str(tiny_checkpoint), "--max-new-tokens", "2",
            "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "done now" in result.stdout and "done now" not in result.stderr
    (tmp_path / "adir").mkdir()
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "adir")])
    assert result.exit_code == 2 and "is a directory" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "new" / "res.tsv"), "--coco-json", str(tmp_path / "adir")])
    assert result.exit_code == 2 and "--coco-json" in result.output
    assert not (tmp_path / "new" / "res.tsv").exists()


def test_a_dtype_or_quant_override_or_a_broken_record_is_refused_too(model, image_tsv, tmp_path, tiny_checkpoint):
    out = tmp_path / "res.tsv"
    _run(model, image_tsv, out)
    bf16 = load_checkpoint(tiny_checkpoint, dtype="bf16").eval()
    with pytest.raises(GitcapError, match="another model configuration \\(dtype auto then, bf16 now\\)"):
        _run(bf16, image_tsv, out)
    quantised = load_checkpoint(tiny_checkpoint, quant="int8-weight").eval()
    with pytest.raises(GitcapError, match="another model configuration \\(quant none then, int8-weight now\\)"):
        _run(quantised, image_tsv, out)
    (tmp_path / "res.tsv.provenance.json").write_text("{not json")
    with pytest.raises(GitcapError, match="not valid JSON.*--overwrite"):
        _run(model, image_tsv, out)
