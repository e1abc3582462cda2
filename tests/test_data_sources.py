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


def test_synthetic_source_mixes_captions_and_questions():
    records, load, _ = build_source(DataConfig(source="synthetic", synthetic_size=5, task="both"))
    assert sum(r.question is None for r in records) == 5
    assert all(r.target for r in records)
    assert sum(r.question is not None for r in records) > 10
    vqa_only, _, _ = build_source(DataConfig(source="synthetic", synthetic_size=5, task="vqa"))
    assert all(r.question for r in vqa_only)
