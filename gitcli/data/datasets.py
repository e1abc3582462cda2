"""Training examples: (image, optional question, target text) records and their batches.

A source turns into a list of `Record`s once (cheap: references, not pixels); the dataset
decodes and transforms an image only when a DataLoader worker asks for it. An image that
cannot be read yields `None`, which the collator drops and counts: a broken file is never
replaced by a blank image and trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Sampler

from gitcli.config import ModelConfig
from gitcli.data.text import encode_pair, pad_right, prompt_text, target_text
from gitcli.errors import GitcapError


@dataclass(frozen=True)
class Record:
    image: Any  # whatever the source's loader understands: a path, a (tsv, row), an index
    question: str | None  # None: a caption example
    target: str
    key: str = ""


class RecordDataset(Dataset):
    def __init__(self, records: list[Record], load_image: Callable[[Any], Any], transform,
                 tokenizer, model_config: ModelConfig, max_target_tokens: int = 32) -> None:
        self.records = records
        self.load_image = load_image
        self.transform = transform
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_target_tokens = max_target_tokens

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        try:
            image = self.load_image(rec.image)
        except (GitcapError, OSError):
            return None  # counted by the collator
        return (self.transform(image), *self.encode(rec))

    def encode(self, rec: Record) -> tuple[list[int], list[int]]:
        prompt = prompt_text(self.model_config, rec.question)
        return encode_pair(self.tokenizer, prompt, rec.target, self.max_target_tokens)


class CachedFeatureDataset(RecordDataset):
    """Records whose image is read as precomputed tower features (`--cache-features`).

    `features[image_index[i]]` is record i's (N, D) features, None where the image could not
    be read when the cache was built (skipped and counted, as with live images).
    """

    def __init__(self, records: list[Record], image_index: list[int], features, tokenizer,
                 model_config: ModelConfig, max_target_tokens: int = 32) -> None:
        super().__init__(records, None, None, tokenizer, model_config, max_target_tokens)
        self.image_index = image_index
        self.features = features

    def __getitem__(self, index: int):
        feats = self.features[self.image_index[index]]
        if feats is None:
            return None
        return (feats, *self.encode(self.records[index]))


class ImageDataset(Dataset):
    """Transformed images by reference, for passes over images alone (filling a feature cache):
    -> (position, pixels or None when unreadable)."""

    def __init__(self, refs: list[Any], load_image: Callable[[Any], Any], transform) -> None:
        self.refs, self.load_image, self.transform = refs, load_image, transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, position: int):
        try:
            return position, self.transform(self.load_image(self.refs[position]))
        except (GitcapError, OSError):
            return position, None


def token_lengths(records: list[Record], tokenizer, model_config: ModelConfig, max_target_tokens: int = 32) -> list[int]:
    """Each record's text length in tokens (prompt + target + EOS), exactly as `encode_pair`
    makes it, from the text alone (batched tokenizer calls): no image is read."""
    prompts = [prompt_text(model_config, r.question) for r in records]
    prompt_len = {p: len(tokenizer(p, add_special_tokens=False)["input_ids"]) if p else 0 for p in set(prompts)}
    cap = max_target_tokens - 1 if max_target_tokens is not None else None
    lengths = []
    for start in range(0, len(records), 65536):  # bounded memory for millions of captions
        part = prompts[start: start + 65536]
        targets = [target_text(p, r.target) for p, r in zip(part, records[start: start + 65536])]
        ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
        lengths.extend(prompt_len[p] + len(t[:cap]) + 1 for p, t in zip(part, ids))
    return lengths


class Collator:
    """Stack pixels (or cached features), right-pad text; report how many unreadable images
    were dropped. `image_key` names the stacked tensor: pixel_values or features."""

    def __init__(self, pad_id: int, image_key: str = "pixel_values") -> None:
        self.pad_id = pad_id
        self.image_key = image_key

    def __call__(self, items: list):
        good = [it for it in items if it is not None]
        skipped = len(items) - len(good)
        if not good:
            return {"skipped": skipped, "size": 0}
        batch = pad_right([g[1] for g in good], [g[2] for g in good], self.pad_id)
        batch[self.image_key] = torch.stack([g[0] for g in good])
        batch["skipped"] = skipped
        batch["size"] = len(good)
        return batch


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The DataLoader's own generator for one epoch of one rank.

    A DataLoader draws its workers' base seed from its generator each time an iterator is
    created; without one it draws from the global torch RNG, which also drives dropout, so
    a resumed run (which creates its iterator at another moment) would get other dropout
    masks. Seeded from (seed, epoch, rank) alone, it needs no saving: a resumed run builds
    the same one.
    """
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_009 + rank) % 2**63)


class ResumableSampler(Sampler[int]):
    """Epoch-seeded shuffle, split across ranks, that can start mid-epoch.

    Rank r takes positions r, r + world, ... of the epoch's permutation; `skip` drops the
    first `skip` of this rank's indices, which is how a resumed run continues exactly
    where the interrupted one stopped without loading what it skips.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.size, self.seed, self.rank, self.world, self.shuffle = size, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        per_rank = self.size // self.world  # equal shares keep ranks in step
        return order[self.rank: per_rank * self.world: self.world]

    def __len__(self) -> int:
        return max(0, self.size // self.world - self.skip)

    def __iter__(self):
        return iter(self._indices()[self.skip:])


# Batches are formed inside windows of this many steps' worth of samples: wide enough that
# most samples find neighbours of similar length, narrow enough that which samples share a
# batch still changes from epoch to epoch (fairseq and lhotse bucket the same way).
BUCKET_WINDOW = 50


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar text length in random order, split across ranks, that can start mid-epoch.

    Per epoch, the seeded permutation (the same on every rank) is cut into windows of
    `window` steps (a step: `world x batch_size` samples); each window is sorted by length
    and cut into steps, so one step's batches have similar lengths on every rank (no rank
    waits on a longer one); the steps of the epoch are shuffled and rank r takes the r-th
    batch of each. Every rank gets the same number of disjoint batches; the samples that do
    not fill a whole step are left out of this epoch, as `drop_last` does for the plain
    sampler. `set_position(epoch, skip)` drops the first `skip` samples (whole batches) of
    this rank, which is how a resumed run continues with the batches it would have had.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 window: int = BUCKET_WINDOW) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.rank, self.world, self.window = rank, world, window
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int) -> None:
        if skip % self.batch_size:
            raise ValueError(f"skip ({skip}) must be whole batches of {self.batch_size}")
        self.epoch, self.skip = epoch, skip

    def _steps(self) -> int:
        return len(self.lengths) // (self.world * self.batch_size)

    def batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, from its start."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        step = self.world * self.batch_size
        order = order[: self._steps() * step]
        steps = []
        for start in range(0, len(order), step * self.window):
            # stable sort: samples of equal length keep their random order
            block = sorted(order[start: start + step * self.window], key=self.lengths.__getitem__)
            steps.extend(block[i: i + step] for i in range(0, len(block), step))
        rng.shuffle(steps)
        b = self.batch_size
        return [s[self.rank * b: (self.rank + 1) * b] for s in steps]

    def __len__(self) -> int:
        return max(0, self._steps() - self.skip // self.batch_size)

    def __iter__(self):
        return iter(self.batches()[self.skip // self.batch_size:])
