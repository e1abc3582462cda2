import base64
import json

from support.scoring import cli, jpeg_bytes, png_bytes, write_json  # noqa: F401  (cli is a fixture)
from gitcli.formats.tsv import iter_tsv, read_caption_tsv, read_lineidx


def _one_error_line(result):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    return result.output


def test_images_from_a_folder(tmp_path, cli):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "b.png").write_bytes(png_bytes())
    (folder / "a.jpg").write_bytes(jpeg_bytes())
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "photos.img.tsv"
    result = cli("tsv", "images", folder, "--out", out)
    assert result.exit_code == 0, result.output
    rows = list(iter_tsv(out))
    assert [r[0] for r in rows] == ["a", "b"]  # file stems, sorted
    assert base64.b64decode(rows[1][1]) == (folder / "b.png").read_bytes()  # bytes as stored
    assert (tmp_path / "photos.img.tsv.lineidx").exists() and (tmp_path / "photos.img.tsv.lineidx.8b").exists()
    assert len(read_lineidx(out, build=False)) == 2


def test_images_refuses_a_non_image(tmp_path, cli):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"GIF89a not really")
    assert "not a JPEG or PNG" in _one_error_line(cli("tsv", "images", folder, "--out", tmp_path / "x.tsv"))


def _coco_files(tmp_path):
    root = tmp_path / "val2014"
    root.mkdir()
    for i in (11, 22, 33):
        (root / f"COCO_val2014_{i:012d}.jpg").write_bytes(jpeg_bytes((i, i, i)))
    coco = write_json(
        tmp_path / "captions_val2014.json",
        {
            "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (11, 22, 33)],
            "annotations": [
                {"id": 1, "image_id": 22, "caption": "Zwei Hunde im Schnee."},
                {"id": 2, "image_id": 11, "caption": "A cat."},
                {"id": 3, "image_id": 22, "caption": "two dogs 🐕"},
                {"id": 4, "image_id": 33, "caption": "a bus"},
            ],
        },
    )
    split = write_json(
        tmp_path / "dataset_coco.json",
        {"images": [{"cocoid": 33, "split": "test"}, {"cocoid": 11, "split": "train"}, {"cocoid": 22, "split": "test"}]},
    )
    return root, coco, split


def test_images_and_captions_from_coco_with_karpathy_split(tmp_path, cli):
    root, coco, split = _coco_files(tmp_path)
    img = tmp_path / "test.img.tsv"
    result = cli("tsv", "images", coco, "--image-root", root, "--split", split, "--out", img)
    assert result.exit_code == 0, result.output
    assert [r[0] for r in iter_tsv(img)] == ["33", "22"]  # COCO ids, split order

    cap = tmp_path / "test.caption.tsv"
    result = cli("tsv", "captions", coco, "--split", split, "--out", cap)
    assert result.exit_code == 0, result.output
    assert read_caption_tsv(cap) == {"33": ["a bus"], "22": ["Zwei Hunde im Schnee.", "two dogs 🐕"]}

    everything = tmp_path / "all.caption.tsv"
    assert cli("tsv", "captions", coco, "--out", everything).exit_code == 0
    assert list(read_caption_tsv(everything)) == ["11", "22", "33"]


def test_coco_images_need_an_image_root(tmp_path, cli):
    _, coco, _ = _coco_files(tmp_path)
    assert "--image-root" in _one_error_line(cli("tsv", "images", coco, "--out", tmp_path / "x.tsv"))


def test_questions_align_with_the_image_tsv(tmp_path, cli):
    root, coco, split = _coco_files(tmp_path)
    img = tmp_path / "val.img.tsv"
    assert cli("tsv", "images", coco, "--image-root", root, "--out", img).exit_code == 0
    questions = write_json(
        tmp_path / "q.json",
        {
            "questions": [
                {"image_id": 33, "question": "What color is the bus?", "question_id": 330},
                {"image_id": 11, "question": "Is it a cat?", "question_id": 110},
                {"image_id": 33, "question": "How many wheels?", "question_id": 331},
            ]
        },
    )
    out = tmp_path / "val.question.tsv"
    result = cli("tsv", "questions", questions, "--images", img, "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 images have no question" in result.output
    rows = list(iter_tsv(out))
    assert [r[0] for r in rows] == [r[0] for r in iter_tsv(img)] == ["11", "22", "33"]
    assert json.loads(rows[2][1]) == [
        {"question": "What color is the bus?", "question_id": 330},
        {"question": "How many wheels?", "question_id": 331},
    ]
    assert json.loads(rows[1][1]) == []

    # a question about an image the TSV lacks: misaligned, one clear line
    orphan = write_json(tmp_path / "o.json", {"questions": [{"image_id": 99, "question": "?", "question_id": 1}]})
    assert "not in" in _one_error_line(cli("tsv", "questions", orphan, "--images", img, "--out", out))
    # wrong id type
    bad = write_json(tmp_path / "b.json", {"questions": [{"image_id": 11, "question": "?", "question_id": "1"}]})
    assert "question_id must be an integer" in _one_error_line(cli("tsv", "questions", bad, "--images", img, "--out", out))
