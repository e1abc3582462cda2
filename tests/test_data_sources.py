"""Every training source is read correctly; broken images are skipped and counted."""

import io

import pytest

from gitcli.config import DataConfig, TrainConfig
from gitcli.data.sources import build_source
from gitcli.data.synthetic import SyntheticSet
from gitcli.model.tiny import tiny_model_config
from gitcli.train.loop import train


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scenes():
    data = SyntheticSet(10, seed=4)
    return [data[i] for i in range(len(data))]


@pytest.fixture
def shard_folder(tmp_path, scenes):
    from gitcli.formats.shards import TarShardWriter, write_stats

    folder = tmp_path / "shards"
    folder.mkdir()
    writer = TarShardWriter(folder, 0)
    for row, scene in enumerate(scenes):
        jpeg = _jpeg(scene.image)
        if row == 3:
            jpeg = jpeg[: len(jpeg) // 3]  # truncated
        writer.add(f"{row:09d}", jpeg, scene.captions[0], {"url": f"http://x/{row}"})
    writer.commit()
    write_stats(folder, 0, {"ok": len(scenes)})
    # an incomplete shard (no stats file) is not read
    partial = TarShardWriter(folder, 1)
    partial.add("000010000", _jpeg(scenes[0].image), "never read", {})
    partial.commit()
    return folder


def test_shards_are_indexed_with_captions(shard_folder, scenes):
    records, load, _ = build_source(DataConfig(source=str(shard_folder)))
    assert [r.target for r in records] == [s.captions[0] for s in scenes]
    assert [r.key for r in records] == [f"{i:09d}" for i in range(len(scenes))]
    assert load(records[0].image).size == scenes[0].image.size
    pattern = str(shard_folder / "{00000..00000}.tar")
    assert len(build_source(DataConfig(source=pattern))[0]) == len(scenes)


def test_training_on_shards_skips_and_counts_the_broken_image(shard_folder, tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=5, device="cpu", save_every=100)
    result = train(tiny_model_config(), DataConfig(source=str(shard_folder), num_workers=0), cfg, progress=False)
    assert result.steps == 2
    assert result.skipped_images == 1  # the truncated JPEG, seen once in 10 samples


def test_cc_tsv_with_image_root(tmp_path, scenes):
    root = tmp_path / "images"
    root.mkdir()
    lines = []
    for row, scene in enumerate(scenes[:6]):
        lines.append(f"{scene.captions[0]}\thttp://example.com/{row}.jpg")
        if row != 2:  # row 2 was never downloaded
            (root / f"{row:08d}.jpg").write_bytes(_jpeg(scene.image))
    (root / "00000004.jpg").write_text("<html>not an image</html>")
    tsv = tmp_path / "train.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    records, load, notes = build_source(DataConfig(source=str(tsv), image_root=str(root)))
    assert notes["missing images"] == 1
    assert [r.key for r in records] == ["00000000", "00000001", "00000003", "00000004", "00000005"]
    assert records[2].target == scenes[3].captions[0]
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=5, device="cpu", save_every=100)
    result = train(tiny_model_config(), DataConfig(source=str(tsv), image_root=str(root), num_workers=0), cfg,
                   progress=False)
    assert result.skipped_images == 1
    assert result.data_notes == {"missing images": 1}  # shown in the training summary


def test_synthetic_source_mixes_captions_and_questions():
    records, load, _ = build_source(DataConfig(source="synthetic", synthetic_size=5, task="both"))
    assert sum(r.question is None for r in records) == 5
    assert all(r.target for r in records)
    assert sum(r.question is not None for r in records) > 10
    vqa_only, _, _ = build_source(DataConfig(source="synthetic", synthetic_size=5, task="vqa"))
    assert all(r.question for r in vqa_only)


def _write_image_tsv(path, keyed_images):
    import base64

    lines = [f"{key}\t{base64.b64encode(_jpeg(im) if not isinstance(im, bytes) else im).decode()}"
             for key, im in keyed_images]
    path.write_text("\n".join(lines) + "\n")


def test_git_image_tsv_with_captions(tmp_path, scenes):
    import json

    images = tmp_path / "train.img.tsv"
    _write_image_tsv(images, [(str(100 + i), s.image) for i, s in enumerate(scenes[:4])])
    captions = tmp_path / "train.caption.tsv"
    captions.write_text("".join(
        f"{100 + i}\t{json.dumps([{'caption': c} for c in s.captions])}\n" for i, s in enumerate(scenes[:3])))
    records, load, notes = build_source(DataConfig(source=str(images), captions=str(captions)))
    assert notes["images without captions"] == 1
    assert [(r.key, r.target) for r in records] == [(str(100 + i), c) for i, s in enumerate(scenes[:3]) for c in s.captions]
    assert load(records[-1].image).size == scenes[2].image.size


def _vqa_files(tmp_path, scenes):
    import json

    questions, annotations = [], []
    for i, s in enumerate(scenes[:4]):
        q, a = s.qa[0]
        questions.append({"image_id": 42 + i, "question": q, "question_id": 1000 + i})
        humans = [a] * 6 + ["something"] * 4 if i != 1 else ["yes"] * 3 + ["no"] * 3 + ["two"] * 4
        annotations.append({"question_id": 1000 + i, "image_id": 42 + i, "question_type": "how many",
                            "answer_type": "other", "multiple_choice_answer": humans[0],
                            "answers": [{"answer": h, "answer_id": k + 1} for k, h in enumerate(humans)]})
    qf, af = tmp_path / "q.json", tmp_path / "a.json"
    qf.write_text(json.dumps({"questions": questions}))
    af.write_text(json.dumps({"annotations": annotations}))
    return qf, af


def test_vqa_json_over_a_coco_folder_and_over_an_image_tsv(tmp_path, scenes):
    qf, af = _vqa_files(tmp_path, scenes)
    folder = tmp_path / "val2014"
    folder.mkdir()
    for i, s in enumerate(scenes[:3]):  # the 4th image is missing
        (folder / f"COCO_val2014_{42 + i:012d}.jpg").write_bytes(_jpeg(s.image))
    records, load, notes = build_source(DataConfig(source=str(folder), questions=str(qf), annotations=str(af)))
    assert notes["questions without image"] == 1
    assert [r.question for r in records] == [s.qa[0][0] for s in scenes[:3]]
    # the target is the most common human answer: "two" (4 votes) beats "yes" and "no" (3 each)
    assert [r.target for r in records] == [scenes[0].qa[0][1], "two", scenes[2].qa[0][1]]
    assert load(records[0].image).size == scenes[0].image.size

    tsv = tmp_path / "val.img.tsv"
    _write_image_tsv(tsv, [(str(42 + i), s.image) for i, s in enumerate(scenes[:4])])
    records, load, notes = build_source(DataConfig(source=str(tsv), questions=str(qf), annotations=str(af)))
    assert len(records) == 4 and notes["questions without image"] == 0
    assert load(records[3].image).size == scenes[3].image.size
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, device="cpu", save_every=100)
    result = train(tiny_model_config(), DataConfig(source=str(tsv), questions=str(qf), annotations=str(af),
                                                  num_workers=0), cfg, progress=False)
    assert result.steps == 1 and result.skipped_images == 0


def test_unknown_source_is_a_clear_error(tmp_path):
    from gitcli.errors import GitcapError

    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(GitcapError, match="cannot tell what kind of data"):
        build_source(DataConfig(source=str(tmp_path / "x.csv")))


def test_validation_on_a_git_tsv_picks_best(tmp_path, scenes):
    """`--val-data` takes any source: one caption per image scored against all of its own."""
    import json

    from gitcli.train.validate import make_validator

    images = tmp_path / "val.img.tsv"
    _write_image_tsv(images, [(str(i), s.image) for i, s in enumerate(scenes[:4])])
    captions = tmp_path / "val.caption.tsv"
    captions.write_text("".join(f"{i}\t{json.dumps([{'caption': c} for c in s.captions])}\n"
                                for i, s in enumerate(scenes[:4])))
    validator = make_validator(DataConfig(source=str(images), captions=str(captions)), 3, DataConfig())
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=4, device="cpu", save_every=2)
    result = train(tiny_model_config(), DataConfig(source="synthetic", synthetic_size=8, num_workers=0), cfg,
                   validator=validator, progress=False)
    reports = [json.loads(line)["validation"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if "validation" in line]
    assert len(reports) == 2
    assert all(r["captions"] == 3 and r["questions"] == 0 and r["CIDEr"] is not None for r in reports)
    assert result.best_score == max(r["score"] for r in reports)
    assert (tmp_path / "run" / "best" / "gitcap.json").is_file()


def test_a_shard_member_declaring_gigabytes_is_skipped_and_noted(tmp_path):
    from support.shards import sparse_member_tar

    from gitcli.formats.shards import write_stats

    sparse_member_tar(tmp_path / "00000.tar", declared=3 << 30)
    write_stats(tmp_path, 0, {"ok": 2})
    records, load, notes = build_source(DataConfig(source=str(tmp_path)))
    assert [(r.key, r.target) for r in records] == [("000000001", "caption 1")]
    assert notes == {"oversized tar members skipped": 1}


def test_cc_tsv_rows_are_numbered_as_fetch_numbers_them(tmp_path, scenes):
    """A carriage return inside a caption splits no row: row N is the image fetch saved as N."""
    import gzip

    from gitcli.formats.cc import read_rows

    root = tmp_path / "images"
    root.mkdir()
    for row in range(3):
        (root / f"{row:08d}.jpg").write_bytes(_jpeg(scenes[row].image))
    tsv = tmp_path / "train.tsv.gz"  # gzip is recognised by its bytes, like fetch does
    with gzip.open(tsv, "wb") as f:
        f.write(b"a red\rcircle\thttp://x/0.jpg\nsecond\thttp://x/1.jpg\nthird\thttp://x/2.jpg\n")
    records, _, notes = build_source(DataConfig(source=str(tsv), image_root=str(root)))
    assert [(r.key, r.target) for r in records] == [("00000000", "a red\rcircle"), ("00000001", "second"),
                                                    ("00000002", "third")]
    assert [(f"{r.index:08d}", r.caption) for r in read_rows(tsv)] == [(r.key, r.target) for r in records]
    assert notes == {"missing images": 0}
