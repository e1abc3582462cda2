"""--bucket-by-length: batches of similar text length cut padding, yet every sample comes
once per epoch, in a seeded random order, disjoint across ranks, and resumable mid-epoch."""

import random
from itertools import pairwise

import pytest

from gitcli.config import DataConfig, TrainConfig
from gitcli.data.datasets import BucketBatchSampler, RecordDataset, ResumableSampler, token_lengths
from gitcli.data.sources import SyntheticImages, synthetic_records
from gitcli.errors import GitcapError
from gitcli.model.tiny import tiny_model_config
from gitcli.train.loop import train

B = 8


def _mixed_lengths(n=1000, seed=0):
    """Short VQA answers beside long captions, as a mixed run has them."""
    rng = random.Random(seed)
    return [rng.randint(2, 5) if rng.random() < 0.5 else rng.randint(12, 40) for _ in range(n)]


def _pad_tokens(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def _shuffled_batches(n, seed, epoch=0, rank=0, world=1):
    sampler = ResumableSampler(n, seed, rank, world)
    sampler.set_position(epoch, 0)
    order = list(sampler)
    return [order[i: i + B] for i in range(0, len(order) - B + 1, B)]


def test_bucketing_cuts_padding_against_plain_shuffling():
    lengths = _mixed_lengths()
    bucketed = BucketBatchSampler(lengths, B, seed=0).batches()
    plain = _shuffled_batches(len(lengths), seed=0)
    assert len(bucketed) == len(plain) == len(lengths) // B
    assert _pad_tokens(bucketed, lengths) < 0.1 * _pad_tokens(plain, lengths)


def test_bucketed_batches_come_in_random_order():
    lengths = _mixed_lengths()
    batches = BucketBatchSampler(lengths, B, seed=0).batches()
    longest = [max(lengths[i] for i in b) for b in batches]
    # sorted windows alone would rise step after step; shuffled steps fall about as often as they rise
    falls = sum(b < a for a, b in pairwise(longest))
    assert falls > len(longest) // 4
    first_half = sum(longest[: len(longest) // 2]) / (len(longest) // 2)
    assert first_half == pytest.approx(sum(longest) / len(longest), rel=0.25)  # long batches are not bunched


@pytest.mark.parametrize("n", [1000, 1003])
def test_each_sample_once_per_epoch(n):
    lengths = _mixed_lengths(n)
    seen = [i for b in BucketBatchSampler(lengths, B, seed=3).batches() for i in b]
    assert len(seen) == len(set(seen)) == (n // B) * B  # an incomplete last batch is left out, as drop_last does
    assert all(len(b) == B for b in BucketBatchSampler(lengths, B, seed=3).batches())


def test_deterministic_per_seed_and_different_each_epoch():
    lengths = _mixed_lengths()
    a, b = BucketBatchSampler(lengths, B, seed=1), BucketBatchSampler(lengths, B, seed=1)
    assert a.batches() == b.batches()
    assert BucketBatchSampler(lengths, B, seed=2).batches() != a.batches()
    b.set_position(1, 0)
    assert b.batches() != a.batches()
    assert sorted(map(sorted, b.batches())) != sorted(map(sorted, a.batches()))  # other groupings, not just order


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_batches_of_equal_number(world):
    lengths = _mixed_lengths(1001)
    per_rank = [BucketBatchSampler(lengths, B, seed=0, rank=r, world=world).batches() for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == 1001 // (world * B)
    samples = [i for batches in per_rank for b in batches for i in b]
    assert len(samples) == len(set(samples))
    # one step's batches have similar lengths on every rank, so no rank waits on a longer one
    steps = zip(*per_rank)
    spread = [max(max(lengths[i] for i in b) for b in step) - min(max(lengths[i] for i in b) for b in step)
              for step in steps]
    assert sum(spread) / len(spread) < 3
    sizes = [len(BucketBatchSampler(lengths, B, seed=0, rank=r, world=world)) for r in range(world)]
    assert sizes == [len(per_rank[0])] * world


def test_resuming_mid_epoch_gives_the_remaining_batches():
    lengths = _mixed_lengths()
    full = BucketBatchSampler(lengths, B, seed=0, rank=1, world=2)
    full.set_position(2, 0)
    expected = list(full)
    resumed = BucketBatchSampler(lengths, B, seed=0, rank=1, world=2)
    resumed.set_position(2, 7 * B)
    assert list(resumed) == expected[7:] and len(resumed) == len(expected) - 7
    with pytest.raises(ValueError):
        resumed.set_position(2, B + 1)


def test_token_lengths_are_the_encoded_lengths(vocab, tiny_captioner):
    records = synthetic_records(6, 0, "both")
    ds = RecordDataset(records, SyntheticImages(0), None, tiny_captioner.tokenizer, tiny_captioner.config,
                       max_target_tokens=5)
    lengths = token_lengths(records, tiny_captioner.tokenizer, tiny_captioner.config, max_target_tokens=5)
    assert lengths == [len(ds.encode(r)[0]) for r in records]
    assert len(set(lengths)) > 1


def _run(tmp_path, name, **overrides):
    opts = {"output_dir": str(tmp_path / name), "max_steps": 6, "batch_size": 4, "lr": 2e-3, "save_every": 3,
            "log_every": 1, "device": "cpu", "seed": 0, "keep_last": 5, "bucket_by_length": True}
    opts.update(overrides)
    return TrainConfig(**opts)


DATA = DataConfig(synthetic_size=12, task="both", num_workers=0)


def test_bucketed_training_resumes_to_the_same_losses(tmp_path):
    full = train(tiny_model_config(), DATA, _run(tmp_path, "full"), progress=False)
    first = train(tiny_model_config(), DATA, _run(tmp_path, "cut"), progress=False, stop_after=3)
    rest = train(tiny_model_config(), DATA, _run(tmp_path, "cut", resume=True), progress=False)
    assert rest.steps == 6
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    plain = train(tiny_model_config(), DATA, _run(tmp_path, "plain", bucket_by_length=False), progress=False)
    assert plain.losses != pytest.approx(full.losses, rel=1e-3)  # the option really changed the batches
    # resuming with the other sampler would replay or skip data: refused
    with pytest.raises(GitcapError, match="--bucket-by-length"):
        train(tiny_model_config(), DATA, _run(tmp_path, "cut", resume=True, max_steps=9, bucket_by_length=False),
              progress=False)
