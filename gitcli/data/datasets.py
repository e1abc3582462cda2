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
from gitcli.data.text import encode_pair, pad_right, prompt_text
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
        prompt = prompt_text(self.model_config, rec.question)
        ids, labels = encode_pair(self.tokenizer, prompt, rec.target, self.max_target_tokens)
        return self.transform(image), ids, labels


class Collator:
    """Stack pixels, right-pad text; report how many unreadable images were dropped."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list):
        good = [it for it in items if it is not None]
        skipped = len(items) - len(good)
        if not good:
            return {"skipped": skipped, "size": 0}
        batch = pad_right([g[1] for g in good], [g[2] for g in good], self.pad_id)
        batch["pixel_values"] = torch.stack([g[0] for g in good])
        batch["skipped"] = skipped
        batch["size"] = len(good)
        return batch


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
