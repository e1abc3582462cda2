"""The training examples of a run, their order, and the micro-batches left in an epoch."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch.utils.data import DataLoader

from gitcli.config import DataConfig, TrainConfig
from gitcli.data.datasets import (BucketBatchSampler, CachedFeatureDataset, Collator, RecordDataset, ResumableSampler,
                                  epoch_generator, token_lengths)
from gitcli.data.sources import build_source
from gitcli.errors import GitcapError
from gitcli.model.captioner import Captioner
from gitcli.train.features import build_feature_cache
from gitcli.train.launch import Launch


def sampler_kind(cfg: TrainConfig) -> str:
    return "bucket-by-length" if cfg.bucket_by_length else "shuffle"


@dataclass
class TrainData:
    """The training examples, their order, and the micro-batches of an epoch."""

    dataset: RecordDataset
    sampler: ResumableSampler | BucketBatchSampler
    collate: Collator
    image_key: str  # pixel_values, or features when read from the cache
    steps_per_epoch: int
    micro_per_epoch: int
    notes: dict
    sampler_kind: str
    cfg: TrainConfig
    num_workers: int
    rank: int
    pin: bool

    @classmethod
    def build(cls, model: Captioner, data_cfg: DataConfig, cfg: TrainConfig, launch: Launch,
              progress: bool) -> "TrainData":
        records, loader_fn, notes = build_source(data_cfg)
        if not records:
            raise GitcapError(f"no training examples in {data_cfg.source}")
        image_key = "pixel_values"
        if cfg.cache_features:
            features, image_index = build_feature_cache(
                model, records, loader_fn, data_cfg, cfg.cache_features, batch_size=cfg.batch_size,
                device=launch.device, precision=launch.precision, rank=launch.rank, world=launch.world,
                progress=progress)
            dataset = CachedFeatureDataset(records, image_index, features, model.tokenizer, model.config,
                                           data_cfg.max_target_tokens)
            image_key = "features"
        else:
            dataset = RecordDataset(records, loader_fn, model.image_transform(), model.tokenizer, model.config,
                                    data_cfg.max_target_tokens)
        sampler: ResumableSampler | BucketBatchSampler
        if cfg.bucket_by_length:
            lengths = token_lengths(records, model.tokenizer, model.config, data_cfg.max_target_tokens)
            sampler = BucketBatchSampler(lengths, cfg.batch_size, cfg.seed, launch.rank, launch.world)
        else:
            sampler = ResumableSampler(len(dataset), cfg.seed, launch.rank, launch.world)
        steps_per_epoch = ((len(dataset) // launch.world) // cfg.batch_size) // cfg.grad_accum
        if steps_per_epoch == 0:
            raise GitcapError(f"{len(dataset)} examples are fewer than one step's worth "
                              f"({cfg.batch_size} x {cfg.grad_accum} x {launch.world} processes)")
        # An epoch is whole steps: micro-batches that would not fill one are left out (their
        # gradients would otherwise leak into the next epoch's first step).
        micro_per_epoch = steps_per_epoch * cfg.grad_accum
        # Pinned batches copy to the GPU asynchronously (non_blocking), so the copy of the
        # next batch overlaps the kernels still running.
        return cls(dataset, sampler, Collator(model.tokenizer.pad_token_id, image_key), image_key, steps_per_epoch,
                   micro_per_epoch, notes, sampler_kind(cfg), cfg, data_cfg.num_workers, launch.rank,
                   pin=launch.device.type == "cuda")

    def rest_of_epoch(self, epoch: int, micro_done: int):
        """The micro-batches of `epoch` after the first `micro_done`, from a new DataLoader."""
        self.sampler.set_position(epoch, micro_done * self.cfg.batch_size)
        generator = epoch_generator(self.cfg.seed, epoch, self.rank)  # never the global RNG: dropout's
        if isinstance(self.sampler, BucketBatchSampler):
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
                                collate_fn=self.collate, persistent_workers=False, pin_memory=self.pin,
                                generator=generator)
        else:
            loader = DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                                num_workers=self.num_workers, collate_fn=self.collate, drop_last=True,
                                persistent_workers=False, pin_memory=self.pin, generator=generator)
        return itertools.islice(loader, max(0, self.micro_per_epoch - micro_done))
