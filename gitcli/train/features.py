"""Filling a feature cache (`gitcap train --cache-features DIR`): the frozen tower, once per image.

The store itself (files, identity checks, reading) is `gitcli.data.features`; here the
model runs. Under DDP the ranks share the work: after rank 0 has created or checked the
store, the chunks still missing are dealt out round robin, each rank computes and writes
its own, and all ranks then read the whole cache (DIR must be on a file system every rank
sees). Dealing out only the missing chunks keeps the ranks balanced when an interrupted
pass is resumed, so none waits long at the closing barrier.
"""

from __future__ import annotations

import hashlib
import sys
import time

import torch
from torch.utils.data import DataLoader

from gitcli.config import DataConfig, ModelConfig, TrainConfig
from gitcli.data.datasets import ImageDataset, Record
from gitcli.data.features import FeatureReader, FeatureStore, source_digest, unique_images
from gitcli.dist import autocast, barrier, is_main_process
from gitcli.errors import GitcapError
from gitcli.progress import ProgressBar

TRAINED_TOWER = ("--cache-features needs a frozen vision tower, and this run trains it (--train-vision, or the "
                 "tiny preset, which trains everything): cached features would go stale")


def check_cache_features(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse a cache of features the run would change (before anything loads)."""
    if cfg.cache_features and model_cfg.train_vision:
        raise GitcapError(TRAINED_TOWER)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of the tower's weights as this run holds them: names the weights exactly even when
    no tag does (the tiny preset's seeded random tower, a tower from --init-from)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_identity(model, data_cfg: DataConfig, data_digest: str) -> dict:
    """What the cached features depend on, in the order a mismatch is reported."""
    cfg, vision = model.config, model.vision
    preprocess = dict(vision.visual.preprocess_cfg)
    return {
        "vision tower": cfg.vision,
        "pretrained weights": cfg.vision_pretrained or "none",
        "feature kind": "grid" if vision.grid else "pooled",
        "image size": "x".join(str(s) for s in vision.image_size),
        "image preprocessing": preprocess,
        "tower weights": "sha256 " + weights_digest(vision),
        "training data": data_cfg.source,
        "training images": "sha256 " + data_digest,
    }


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, torch.Tensor]:
    positions = [pos for pos, _ in items]
    ok = torch.tensor([pixels is not None for _, pixels in items])
    good = [pixels for _, pixels in items if pixels is not None]
    return positions, (torch.stack(good) if good else None), ok


def build_feature_cache(model, records: list[Record], load_image, data_cfg: DataConfig, root: str, *,
                        batch_size: int, device: torch.device, precision: str, rank: int = 0, world: int = 1,
                        progress: bool = True, chunk: int | None = None) -> tuple[FeatureReader, list[int]]:
    """Make sure `root` holds the features of every training image; compute what is missing.

    -> (reader of the features by image position, each record's image position).
    """
    refs, index = unique_images(records)
    identity = cache_identity(model, data_cfg, source_digest(refs, load_image))
    shape = (model.vision.num_tokens, model.vision.feature_dim)
    if is_main_process():
        store = FeatureStore.prepare(root, identity, len(refs), shape, create=True, chunk=chunk)
        store.clean_temporary()
    barrier()  # the store exists and is checked before the other ranks open it
    if not is_main_process():
        store = FeatureStore.prepare(root, identity, len(refs), shape, create=False)
    missing = store.missing_chunks()
    barrier()  # every rank has listed the missing chunks before any is written
    mine = missing[rank::world]
    start = time.perf_counter()
    if mine:
        _fill(model, store, mine, ImageDataset(refs, load_image, model.image_transform()), batch_size=batch_size,
              num_workers=data_cfg.num_workers, device=device, precision=precision,
              progress=progress and is_main_process(), world=world)
    barrier()
    reader = store.reader()
    if progress and is_main_process():
        done = sum(len(store.chunk_range(k)) for k in missing)
        what = (f"cached the features of {done} images in {time.perf_counter() - start:.0f} s" if missing
                else "using the cached features")
        print(f"{what}: {root} ({len(refs)} images, {store.chunks} chunks)", file=sys.stderr)  # a log line
    return reader, index


def _fill(model, store: FeatureStore, chunks: list[int], dataset: ImageDataset, *, batch_size: int, num_workers: int,
          device: torch.device, precision: str, progress: bool, world: int) -> None:
    batches = [list(r[i: i + batch_size]) for k in chunks for r in [store.chunk_range(k)]
               for i in range(0, len(r), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate)
    total = sum(len(store.chunk_range(k)) for k in chunks)
    tokens, dim = store.meta["shape"]
    was_training = model.vision.training
    model.vision.eval()  # frozen features: no dropout, and BatchNorm (ResNet towers) with its running statistics
    current, parts, oks = None, [], []
    bar = _CacheBar(total, world, enabled=progress)
    try:
        with torch.no_grad(), bar:
            for positions, pixels, ok in loader:
                k = positions[0] // store.chunk
                if k != current:
                    current, parts, oks = k, [], []
                feats = torch.zeros(len(positions), tokens, dim)
                if pixels is not None:
                    with autocast(precision, device):
                        out = model.vision_features(pixels.to(device))  # (B_ok, N, D)
                    feats[ok] = out.float().cpu()
                parts.append(feats)
                oks.append(ok)
                if sum(len(p) for p in parts) == len(store.chunk_range(k)):
                    store.write_chunk(k, torch.cat(parts), torch.cat(oks))
                    parts, oks = [], []
                bar.advance(len(positions))
    finally:
        model.vision.train(was_training)
    if parts:  # the loader ended inside a chunk: cannot happen unless the batches are wrong
        raise GitcapError(f"feature cache {store.root}: chunk {current} was left incomplete")


class _CacheBar(ProgressBar):
    """Progress of the caching pass: images, images/s, time left (rank 0's share under DDP)."""

    def __init__(self, total: int, world: int, enabled: bool) -> None:
        super().__init__("cache features" + (f" (rank 0 of {world})" if world > 1 else ""), total, unit="images",
                         enabled=enabled)
        self.start = time.perf_counter()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        done = self.completed + n
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.show(done, f"{rate:.0f} images/s")
