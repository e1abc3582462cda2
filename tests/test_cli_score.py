import json
import shutil

import pytest

from support.scoring import cli, write_json  # noqa: F401  (cli is a fixture)
from gitcli.formats.tsv import json_cell, write_tsv


def _one_error_line(result):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    return result.output


def _humans(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


@pytest.fixture
def vqa_files(tmp_path):
    anns = write_json(
        tmp_path / "ann.json",
        {
            "annotations": [
                {"question_id": 1, "image_id": 5, "question_type": "how many", "answer_type": "number", "answers": _humans(*["2"] * 10)},
                {"question_id": 2, "image_id": 5, "question_type": "what color", "answer_type": "other", "answers": _humans("red", "red", *["blue"] * 8)},
            ]
        },
    )
    questions = write_json(
        tmp_path / "q.json",
        {"questions": [{"question_id": 1, "image_id": 5, "question": "How many?"}, {"question_id": 2, "image_id": 5, "question": "Color?"}]},
    )
    return anns, questions


def test_vqa_json_normalises_and_fills(tmp_path, cli, vqa_files):
    _, questions = vqa_files
    results = tmp_path / "vqa.tsv"
    write_tsv(results, [["5", json_cell([{"question_id": 2, "answer": "The Red."}])]])
    out = tmp_path / "submission.json"
    result = cli("vqa-json", "--results", results, "--questions", questions, "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 questions had no result" in result.output
    assert json.loads(out.read_text()) == [{"question_id": 1, "answer": ""}, {"question_id": 2, "answer": "red"}]


def test_vqa_json_rejects_duplicates_and_foreign_ids(tmp_path, cli, vqa_files):
    _, questions = vqa_files
    dup = tmp_path / "dup.tsv"
    dup.write_text('{"answer": "a", "question_id": 1}\n{"answer": "b", "question_id": 1}\n', encoding="utf-8")
    assert "answered twice" in _one_error_line(cli("vqa-json", "--results", dup, "--out", tmp_path / "s.json"))
    foreign = tmp_path / "f.tsv"
    foreign.write_text('{"answer": "a", "question_id": 77}\n', encoding="utf-8")
    assert "not in" in _one_error_line(cli("vqa-json", "--results", foreign, "--questions", questions, "--out", tmp_path / "s.json"))
    bad = tmp_path / "b.tsv"
    bad.write_text('5\t[{"answer": "a", "question_id": 1}\n', encoding="utf-8")
    assert "not valid JSON" in _one_error_line(cli("vqa-json", "--results", bad, "--out", tmp_path / "s.json"))


def test_score_vqa_answers_exactly_as_given(tmp_path, cli, vqa_files):
    anns, questions = vqa_files
    # "Two" against ten unanimous "2": the official metric does not normalise -> 0
    results = write_json(tmp_path / "sub.json", [{"question_id": 1, "answer": "Two"}, {"question_id": 2, "answer": "Red"}])
    out = tmp_path / "acc.json"
    result = cli("score-vqa", "--results", results, "--annotations", anns, "--questions", questions, "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["overall"] == 30.0
    assert data["perAnswerType"] == {"number": 0.0, "other": 60.0}
    assert data["perQuestionType"] == {"how many": 0.0, "what color": 60.0}
    assert data["perQuestion"] == {"1": 0.0, "2": 60.0}
    assert "overall" in result.output


def test_score_vqa_missing_answers(tmp_path, cli, vqa_files):
    anns, questions = vqa_files
    results = write_json(tmp_path / "sub.json", [{"question_id": 2, "answer": "red"}])
    assert "--allow-missing" in _one_error_line(cli("score-vqa", "-r", results, "-a", anns, "-q", questions))
    result = cli("score-vqa", "-r", results, "-a", anns, "-q", questions, "--allow-missing")
    assert result.exit_code == 0 and "1 have no result" in result.output


def _caption_files(tmp_path):
    labels = tmp_path / "test.caption.tsv"
    write_tsv(
        labels,
        [
            ["1", json_cell([{"caption": "A dog runs on the beach."}, {"caption": "a brown dog running in the sand"}])],
            ["2", json_cell([{"caption": "Two cats sleep on a sofa."}, {"caption": "cats sleeping on a couch"}])],
            ["3", json_cell([{"caption": "A red bus on the street."}, {"caption": "a bus driving down a road"}])],
        ],
    )
    results = tmp_path / "results.tsv"
    write_tsv(results, [[k, json_cell([{"caption": c}])] for k, c in [("1", "a dog running on the beach"), ("2", "a cat on a sofa"), ("3", "a red bus")]])
    return labels, results


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")
@pytest.mark.slow  # METEOR's paraphrase table
def test_score_coco_writes_scores_json(tmp_path, cli, monkeypatch):
    from gitcli.evaluate import paraphrase

    labels, results = _caption_files(tmp_path)
    # a COCO results JSON with one image fewer: --allow-missing scores the intersection
    coco_results = write_json(tmp_path / "r.json", [{"image_id": 1, "caption": "a dog running on the beach"}, {"image_id": 2, "caption": "a cat on a sofa"}])
    out = tmp_path / "new" / "folder" / "scores.json"  # folders that do not exist yet
    monkeypatch.setattr(paraphrase, "index_ready", lambda *a, **k: False)  # as on a machine's first run
    result = cli("score-coco", "--results", coco_results, "--labels", labels, "--allow-missing", "--out", out)
    assert result.exit_code == 0, result.output
    # the table on stdout (what `> scores.txt` captures), messages on stderr
    assert "CIDEr" in result.stdout and "METEOR" in result.stdout and "dropped" not in result.stdout
    assert "dropped 1 labelled images" in result.stderr and "CIDEr" not in result.stderr
    # the one long step says what it does in a plain line, not only in a spinner
    assert "indexing METEOR's paraphrase table, once per machine" in result.stderr
    data = json.loads(out.read_text())
    assert set(data["scores"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert set(data["per_image"]) == {"1", "2"}
    assert data["images"] == 2 and data["dropped"]["labels_without_results"] == 1
    assert data["versions"]["pycocoevalcap"] and data["inputs"]["labels"].endswith("test.caption.tsv")
    assert 0 < data["scores"]["Bleu_1"] <= 1


def test_score_coco_input_errors_are_one_line(tmp_path, cli):
    labels, results = _caption_files(tmp_path)
    short = write_json(tmp_path / "r.json", [{"image_id": 1, "caption": "x"}])
    assert "--allow-missing" in _one_error_line(cli("score-coco", "-r", short, "-l", labels))
    wrong_type = write_json(tmp_path / "w.json", [{"image_id": [1], "caption": "x"}])
    assert "image_id must be" in _one_error_line(cli("score-coco", "-r", wrong_type, "-l", labels))
    two = tmp_path / "two.tsv"
    write_tsv(two, [["1", json_cell([{"caption": "a"}, {"caption": "b"}])]])
    assert "exactly one" in _one_error_line(cli("score-coco", "-r", two, "-l", labels))
    assert "not found" in _one_error_line(cli("score-coco", "-r", tmp_path / "none.tsv", "-l", labels))


def test_score_coco_without_java(tmp_path, cli, monkeypatch):
    labels, results = _caption_files(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "needs Java" in _one_error_line(cli("score-coco", "-r", results, "-l", labels))


def test_help_has_examples(cli):
    for command in (["score-coco"], ["vqa-json"], ["score-vqa"], ["tsv", "images"], ["tsv", "captions"], ["tsv", "questions"]):
        result = cli(*command, "--help")
        assert result.exit_code == 0 and "Example" in result.output, command


def test_score_coco_spice_without_corenlp_fails_fast(tmp_path, cli, monkeypatch):
    from pycocoevalcap.spice import get_stanford_models as g

    from gitcli.evaluate import spice

    labels, results = _caption_files(tmp_path)
    monkeypatch.setattr(spice, "corenlp_jar", lambda: tmp_path / "absent.jar")
    monkeypatch.setattr(g, "get_stanford_models", lambda: pytest.fail("pycocoevalcap downloader called"))
    # fails before any scoring starts (no Java launch needed to see this error)
    assert "SPICE needs Stanford CoreNLP 3.6.0" in _one_error_line(cli("score-coco", "-r", results, "-l", labels, "--spice"))


def test_vqa_flow_on_test_dev_whose_questions_cover_a_subset_of_the_images(tmp_path, cli):
    # test-dev asks about a subset of test2015's images: the question TSV holds [] for
    # the others, inference answers nothing there, and the submission is still checked
    # against the questions file.
    from support.scoring import jpeg_bytes

    from gitcli.formats.tsv import iter_tsv

    root = tmp_path / "test2015"
    root.mkdir()
    ids = [101, 102, 103, 104]
    for i in ids:
        (root / f"COCO_test2015_{i:012d}.jpg").write_bytes(jpeg_bytes((i, 0, 0)))
    info = write_json(tmp_path / "image_info_test2015.json", {"images": [{"id": i, "file_name": f"COCO_test2015_{i:012d}.jpg"} for i in ids]})
    test_dev = [{"image_id": 103, "question": "What is it?", "question_id": 1030}, {"image_id": 101, "question": "Is it red?", "question_id": 1010}]
    test_dev_json = write_json(tmp_path / "test-dev.json", {"questions": test_dev})
    test_all_json = write_json(tmp_path / "test2015.json", {"questions": [*test_dev, {"image_id": 104, "question": "Why?", "question_id": 1040}]})

    img, qtsv = tmp_path / "test.img.tsv", tmp_path / "test-dev.question.tsv"
    assert cli("tsv", "images", info, "--image-root", root, "--out", img).exit_code == 0
    result = cli("tsv", "questions", test_dev_json, "--images", img, "--out", qtsv)
    assert result.exit_code == 0, result.output
    assert "2 images have no question" in result.output
    rows = [(key, json.loads(cell)) for key, cell in iter_tsv(qtsv)]
    assert [(k, [q["question_id"] for q in qs]) for k, qs in rows] == [("101", [1010]), ("102", []), ("103", [1030]), ("104", [])]

    # what inference writes: one result row per question row, [] where nothing was asked
    results = tmp_path / "test-dev.tsv"
    write_tsv(results, [[k, json_cell([{"question_id": q["question_id"], "answer": "Yes."} for q in qs])] for k, qs in rows])
    sub = tmp_path / "submission.json"
    result = cli("vqa-json", "--results", results, "--questions", test_dev_json, "--out", sub)
    assert result.exit_code == 0, result.output
    assert "had no result" not in result.output
    assert json.loads(sub.read_text()) == [{"question_id": 1030, "answer": "yes"}, {"question_id": 1010, "answer": "yes"}]

    # against all of test2015, the questions test-dev lacks are counted and answered ""
    result = cli("vqa-json", "--results", results, "--questions", test_all_json, "--out", sub)
    assert result.exit_code == 0 and "1 questions had no result" in result.output
    assert json.loads(sub.read_text())[-1] == {"question_id": 1040, "answer": ""}

    # a row left out (or answered []) is a missing answer, still counted
    write_tsv(results, [[k, json_cell([] if k == "103" else [{"question_id": q["question_id"], "answer": "no"} for q in qs])] for k, qs in rows])
    result = cli("vqa-json", "--results", results, "--questions", test_dev_json, "--out", sub)
    assert result.exit_code == 0 and "1 questions had no result" in result.output


def test_score_vqa_table_goes_to_stdout_of_a_real_process(tmp_path, vqa_files):
    import os
    import subprocess
    import sys

    anns, questions = vqa_files
    results = write_json(tmp_path / "sub.json", [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "red"}])
    table = tmp_path / "acc.txt"
    with table.open("w") as stdout:  # `gitcap score-vqa ... > acc.txt`
        proc = subprocess.run(
            [sys.executable, "-m", "gitcli", "score-vqa", "-r", results, "-a", anns, "-q", questions, "--out", tmp_path / "x" / "acc.json"],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=dict(os.environ, COLUMNS="100"),
        )
    assert proc.returncode == 0, proc.stderr
    assert "overall" in table.read_text() and "80.00" in table.read_text()
    assert "wrote" in proc.stderr and "overall" not in proc.stderr
    assert json.loads((tmp_path / "x" / "acc.json").read_text())["overall"] == 80.0


def _writing_commands(tmp_path, vqa_files):
    """Every command of this area that writes --out, with inputs it accepts."""
    from support.scoring import jpeg_bytes

    anns, questions = vqa_files
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "5.jpg").write_bytes(jpeg_bytes())
    image_tsv = tmp_path / "img.tsv"
    write_tsv(image_tsv, [["5", "eA=="]])
    coco = write_json(tmp_path / "coco.json", {"images": [{"id": 5, "file_name": "5.jpg"}], "annotations": [{"id": 1, "image_id": 5, "caption": "a dog"}]})
    results = write_json(tmp_path / "sub.json", [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "red"}])
    labels, captions = _caption_files(tmp_path)
    return {
        "tsv images": ["tsv", "images", folder],
        "tsv captions": ["tsv", "captions", coco],
        "tsv questions": ["tsv", "questions", questions, "--images", image_tsv],
        "vqa-json": ["vqa-json", "-r", results, "-q", questions],
        "score-vqa": ["score-vqa", "-r", results, "-a", anns, "-q", questions],
        "score-coco": ["score-coco", "-r", captions, "-l", labels],
    }


def test_every_writing_command_creates_a_missing_out_folder(tmp_path, cli, vqa_files, monkeypatch):
    from gitcli.evaluate import captions

    # score-coco's scoring itself is tested above: here only where its output goes
    monkeypatch.setattr(captions, "evaluate_captions", lambda res, refs, metrics, **kw: captions.CaptionScores({m: 0.5 for m in metrics}))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")
    for name, args in _writing_commands(tmp_path, vqa_files).items():
        out = tmp_path / "new" / name.replace(" ", "-") / "out.file"
        result = cli(*args, "--out", out)
        assert result.exit_code == 0, (name, result.output)
        assert out.is_file(), name


def test_every_writing_command_refuses_a_directory_as_out_before_any_work(tmp_path, cli, vqa_files, monkeypatch):
    from gitcli.evaluate import captions

    monkeypatch.setattr(captions, "evaluate_captions", lambda *a, **k: pytest.fail("scored before checking --out"))
    for name, args in _writing_commands(tmp_path, vqa_files).items():
        output = _one_error_line(cli(*args, "--out", tmp_path))
        assert "is a directory" in output and len(output.strip().splitlines()) == 1, (name, output)
