"""--cache-features: the frozen tower's features computed once into safetensors chunks, reused,
resumed after an interruption, refused when built for another tower or data, and trained
from with the same loss as the live tower."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from gitcli.config import DataConfig, TrainConfig
from gitcli.data.datasets import CachedFeatureDataset, Collator, RecordDataset
from gitcli.data.features import FeatureStore
from gitcli.formats.atomic import temporary_path
from gitcli.data.sources import SyntheticImages, synthetic_records
from gitcli.errors import GitcapError
from gitcli.model.captioner import build_captioner
from gitcli.model.tiny import tiny_model_config
from gitcli.train.features import build_feature_cache
from gitcli.train.loop import train

REPO = Path(__file__).resolve().parents[1]
DATA = DataConfig(synthetic_size=10, task="both", num_workers=0)
CHUNK = 4  # 10 images -> chunks of 4, 4, 2


def _frozen(vocab, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_captioner(tiny_model_config(train_vision=False, **overrides), vocabulary=vocab)
    model.train()  # as in a training run: the pass must switch the tower to eval and back
    return model


def _records(data=DATA):
    return synthetic_records(data.synthetic_size, data.synthetic_seed, data.task)


def _cache(model, root, data=DATA, **kw):
    return build_feature_cache(model, _records(data), SyntheticImages(data.synthetic_seed), data, str(root),
                               batch_size=3, device=torch.device("cpu"), precision="fp32", progress=False,
                               chunk=CHUNK, **kw)


@pytest.fixture
def tower_calls(monkeypatch):
    """Counts the images that go through the tower."""
    from gitcli.model import captioner as cap

    seen = []
    real = cap.Captioner.vision_features

    def counting(self, pixel_values):
        seen.append(len(pixel_values))
        return real(self, pixel_values)

    monkeypatch.setattr(cap.Captioner, "vision_features", counting)
    return seen


def test_cache_is_written_in_fp16_safetensors_then_reused(vocab, tmp_path, tower_calls):
    model = _frozen(vocab)
    model.vision.train()  # not the mode a frozen tower trains in: the pass must give it back as it was
    reader, index = _cache(model, tmp_path / "f")
    files = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert files == ["chunk-00000.safetensors", "chunk-00001.safetensors", "chunk-00002.safetensors", "meta.json"]
    assert sum(tower_calls) == 10 and model.vision.training  # each image once; its mode restored
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["images"] == 10 and meta["dtype"] == "float16" and meta["shape"] == [16, 128]
    with safe_open(str(tmp_path / "f" / "chunk-00002.safetensors"), framework="pt") as f:
        assert f.get_tensor("features").dtype == torch.float16 and f.get_tensor("features").shape == (2, 16, 128)
    # records of one scene (its caption, its questions) share the scene's entry
    records = _records()
    assert len(index) == len(records) > 10 and {records[i].image for i in range(len(records))} == set(range(10))
    assert all(index[i] == records[i].image for i in range(len(records)))
    # the stored features are the tower's, to fp16 rounding
    model.eval()
    pixels = torch.stack([model.image_transform()(SyntheticImages(0)(i)) for i in (0, 9)])
    with torch.no_grad():
        live = model.vision_features(pixels)
    torch.testing.assert_close(torch.stack([reader[0], reader[9]]).float(), live, rtol=2e-3, atol=2e-3)
    # a second run finds the cache complete: no image is decoded, the tower never runs
    tower_calls.clear()
    again, _ = _cache(_frozen(vocab), tmp_path / "f")
    assert tower_calls == []
    assert torch.equal(again[7], reader[7])


def test_an_interrupted_cache_continues_where_it_stopped(vocab, tmp_path, monkeypatch, tower_calls):
    real = FeatureStore.write_chunk
    written = []

    def dies_after_one(self, k, features, ok):
        if written:
            # the kill lands mid-write: a temporary file is left, the chunk is not published
            temporary_path(self.chunk_path(k)).write_bytes(b"half a chunk")
            raise KeyboardInterrupt
        real(self, k, features, ok)
        written.append(k)

    monkeypatch.setattr(FeatureStore, "write_chunk", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        _cache(_frozen(vocab), tmp_path / "f")
    assert sorted(p.name for p in (tmp_path / "f").glob("chunk-*")) == ["chunk-00000.safetensors"]
    monkeypatch.setattr(FeatureStore, "write_chunk", real)
    tower_calls.clear()
    resumed, _ = _cache(_frozen(vocab), tmp_path / "f")
    assert sum(tower_calls) == 10 - CHUNK  # only the missing chunks were computed
    assert not list((tmp_path / "f").glob(".*.tmp-*"))
    whole, _ = _cache(_frozen(vocab), tmp_path / "whole")
    for i in range(10):
        assert torch.equal(resumed[i], whole[i])


@pytest.mark.parametrize("change,field", [
    ({"seed": 1}, "tower weights"),  # the tiny tower is random: another seed, other weights
    ({"grid": False, "mapping": "linear"}, "feature kind"),
    ({"data": DataConfig(synthetic_size=11, task="both", num_workers=0)}, "training images"),
    ({"data": DataConfig(synthetic_size=10, synthetic_seed=3, task="both", num_workers=0)}, "training images"),
])
def test_a_cache_built_for_something_else_is_refused(vocab, tmp_path, change, field):
    _cache(_frozen(vocab), tmp_path / "f")
    before = sorted((tmp_path / "f").iterdir())
    change = dict(change)
    data = change.pop("data", DATA)
    seed = change.pop("seed", 0)
    with pytest.raises(GitcapError) as err:
        _cache(_frozen(vocab, seed=seed, **change), tmp_path / "f", data=data)
    message = str(err.value)
    assert f"different {field}" in message and "--cache-features" in message and "\n" not in message
    assert sorted((tmp_path / "f").iterdir()) == before  # refused, not rebuilt


def test_a_directory_that_is_not_a_cache_is_refused(vocab, tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(GitcapError, match="not a gitcap feature cache"):
        _cache(_frozen(vocab), tmp_path / "f")


def test_loss_from_cached_features_matches_the_live_tower(vocab, tmp_path):
    model = _frozen(vocab)
    data = DataConfig(synthetic_size=10, task="captions", num_workers=0)  # one record per image
    records = _records(data)[:8]
    reader, index = _cache(model, tmp_path / "f", data=data)
    live_ds = RecordDataset(records, SyntheticImages(0), model.image_transform(), model.tokenizer, model.config)
    cached_ds = CachedFeatureDataset(records, index, reader, model.tokenizer, model.config)
    live = Collator(model.tokenizer.pad_token_id)([live_ds[i] for i in range(len(records))])
    cached = Collator(model.tokenizer.pad_token_id, "features")([cached_ds[i] for i in range(len(records))])
    assert torch.equal(live["input_ids"], cached["input_ids"]) and "pixel_values" not in cached
    text = (cached["input_ids"], cached["attention_mask"], cached["labels"])
    with torch.no_grad():
        live_loss, live_logits = model(live["pixel_values"], *text)
        cached_loss, cached_logits = model(None, *text, features=cached["features"])
        # the check can fail: the features of other images give other logits
        _, wrong_logits = model(None, *text, features=cached["features"].roll(1, dims=0))
    # fp16 storage rounds features by <= 2^-11 relative; the loss moves far less than 1e-3
    assert float(cached_loss) == pytest.approx(float(live_loss), rel=1e-3)
    off = (cached_logits - live_logits).abs().max()
    assert off < 1e-2 and (wrong_logits - live_logits).abs().max() > 20 * off


def _run(tmp_path, name, **overrides):
    opts = {"output_dir": str(tmp_path / name), "max_steps": 6, "batch_size": 4, "lr": 2e-3, "save_every": 3,
            "log_every": 1, "device": "cpu", "seed": 0, "keep_last": 5}
    opts.update(overrides)
    return TrainConfig(**opts)


def test_training_from_the_cache_matches_live_and_resumes(vocab, tmp_path):
    frozen = tiny_model_config(train_vision=False)
    live = train(frozen, DATA, _run(tmp_path, "live"), progress=False)
    feats = str(tmp_path / "feats")
    full = train(frozen, DATA, _run(tmp_path, "full", cache_features=feats), progress=False)
    assert full.losses == pytest.approx(live.losses, rel=2e-3)
    first = train(frozen, DATA, _run(tmp_path, "cut", cache_features=feats), progress=False, stop_after=3)
    rest = train(frozen, DATA, _run(tmp_path, "cut", cache_features=feats, resume=True), progress=False)
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    config = json.loads((tmp_path / "cut" / "train_config.json").read_text())
    assert config["train"]["cache_features"] == feats


def test_cache_features_with_a_trained_tower_is_refused_in_one_line(tmp_path):
    from gitcli.cli import app

    result = CliRunner().invoke(app, ["train", "--lm", "gpt2", "--train-vision", "--cache-features",
                                      str(tmp_path / "f"), "-o", str(tmp_path / "run")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--cache-features needs a frozen vision tower" in errors[0]
    assert not (tmp_path / "f").exists() and not (tmp_path / "run").exists()
    with pytest.raises(GitcapError, match="frozen vision tower"):  # the library refuses it too
        train(tiny_model_config(), DATA, _run(tmp_path, "x", cache_features=str(tmp_path / "f")), progress=False)


def test_dry_run_leaves_the_cached_tower_off_the_gpu(tiny_captioner):
    from gitcli.train.memory import dry_run

    frozen = tiny_model_config(train_vision=False, train_lm=False)
    live = dry_run(frozen, TrainConfig(batch_size=2, precision="bf16"), text_tokens=8, world=1)
    cached = dry_run(frozen, TrainConfig(batch_size=2, precision="bf16", cache_features="f"), text_tokens=8, world=1)
    n_vis = sum(p.numel() for p in tiny_captioner.vision.parameters())
    assert live.weights - cached.weights == 2 * n_vis  # the bf16 tower's weights
    assert (cached.frozen, cached.activations) == (live.frozen, live.activations)
    assert any("host RAM" in note for note in cached.notes)
    # DeepSpeed places the whole module on the GPU: nothing saved there
    ds = dry_run(frozen, TrainConfig(batch_size=2, precision="bf16", cache_features="f", zero=2), text_tokens=8,
                 world=1)
    assert ds.weights == dry_run(frozen, TrainConfig(batch_size=2, precision="bf16", zero=2), text_tokens=8,
                                 world=1).weights


@pytest.mark.slow
def test_two_ranks_share_the_caching_pass(tmp_path):
    """2 torchrun ranks (gloo) fill one cache together, then train from it like one process."""
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys, torch\n"
        "import gitcli.data.features as store\n"
        "from gitcli.config import DataConfig, TrainConfig\n"
        "from gitcli.model.tiny import tiny_model_config\n"
        "from gitcli.train.loop import train\n"
        "torch.set_num_threads(1)\n"
        "store.CHUNK_BYTES = 4 * 16 * 128 * 2  # chunks of 4 images: 12 images, 3 chunks to share\n"
        "real = store.FeatureStore.write_chunk\n"
        "def logged(self, k, *a):\n"
        "    real(self, k, *a)\n"
        "    with open(sys.argv[3], 'a') as log:\n"
        "        log.write(f\"{os.environ['RANK']} {k}\\n\")\n"
        "store.FeatureStore.write_chunk = logged\n"
        "train(tiny_model_config(train_vision=False), DataConfig(synthetic_size=12, task='captions', num_workers=0),\n"
        "      TrainConfig(output_dir=sys.argv[1], max_steps=3, batch_size=2, lr=2e-3, save_every=3, log_every=1,\n"
        "                  device='cpu', seed=0, cache_features=sys.argv[2]), progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), str(tmp_path / "two"), str(tmp_path / "feats"), str(tmp_path / "written.log")],
        env=env, capture_output=True, text=True, timeout=180, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    written = sorted((tmp_path / "written.log").read_text().split("\n")[:-1])
    assert written == ["0 0", "0 2", "1 1"]  # the missing chunks dealt out round robin, each written once
    one = train(tiny_model_config(train_vision=False), DataConfig(synthetic_size=12, task="captions", num_workers=0),
                _run(tmp_path, "one", max_steps=3, save_every=3, cache_features=str(tmp_path / "feats")),
                progress=False)
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    # each rank averages over its own tokens, then the ranks are averaged: close, not equal
    assert [r["loss"] for r in lines if "loss" in r] == pytest.approx(one.losses, rel=2e-2)


class _SomeUnreadable(SyntheticImages):
    def __call__(self, index):
        if index in (2, 7):
            raise GitcapError(f"cannot read image {index}")
        return super().__call__(index)


def test_unreadable_images_are_marked_and_skipped_like_live_ones(vocab, tmp_path):
    model = _frozen(vocab)
    data = DataConfig(synthetic_size=10, task="captions", num_workers=0)
    records = _records(data)
    reader, index = build_feature_cache(model, records, _SomeUnreadable(0), data, str(tmp_path / "f"), batch_size=3,
                                        device=torch.device("cpu"), precision="fp32", progress=False, chunk=CHUNK)
    assert [i for i in range(10) if reader[i] is None] == [2, 7]
    cached_ds = CachedFeatureDataset(records, index, reader, model.tokenizer, model.config)
    batch = Collator(model.tokenizer.pad_token_id, "features")([cached_ds[i] for i in range(4)])
    assert batch["skipped"] == 1 and batch["size"] == 3 and batch["features"].shape == (3, 16, 128)
