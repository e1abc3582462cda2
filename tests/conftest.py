"""Shared fixtures: tiny random models built locally; no hub, no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test never reaches the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_configure(config):
    # What gitcap builds once per machine (METEOR's paraphrase index) is built once per
    # checkout for the tests, shared by the xdist workers, and kept between runs.
    # (`-p no:cacheprovider` has no such folder: the user's cache is used then.)
    if getattr(config, "cache", None) is not None:
        os.environ.setdefault("GITCAP_CACHE_DIR", str(config.cache.mkdir("gitcap-cache")))
    # pytest-xdist runs one test process per core; one intra-op thread each avoids
    # oversubscribing the cores (OpenMP spin-waits make that several times slower).
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # Modules with slow tests run first (each module's tests stay together, so its fixtures
    # are made once): under `-n 2 --dist worksteal` a worker that runs out of work takes
    # half of the other's queue, so a long test never starts last with the other worker idle.
    slow_modules = {item.module.__name__ for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def vocab():
    from gitcli.data.synthetic import vocabulary

    return vocabulary()


@pytest.fixture(scope="session")
def tiny_captioner(vocab):
    """An untrained tiny-preset captioner (session-wide: treat as read-only)."""
    import torch

    from gitcli.model.captioner import build_captioner
    from gitcli.model.tiny import tiny_model_config

    torch.manual_seed(0)
    model = build_captioner(tiny_model_config(), vocabulary=vocab)
    model.eval()
    return model


@pytest.fixture(scope="session")
def scene_images():
    from gitcli.data.synthetic import SyntheticSet

    data = SyntheticSet(6, seed=123)
    return [data[i].image for i in range(len(data))]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_captioner):
    from gitcli.model.checkpoint import save_checkpoint

    return save_checkpoint(tiny_captioner, tmp_path_factory.mktemp("ckpt") / "tiny")
