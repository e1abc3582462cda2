"""Offline is the normal case: one quick check of the hub instead of a minute of retries,
close spellings suggested, and --dry-run for every alias with no network at all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gitcli.cli import app
from gitcli.config import LM_ALIASES, ModelConfig, TrainConfig
from gitcli.errors import GitcapError
from gitcli.model import hub


@pytest.fixture
def unreachable_hub(monkeypatch):
    """A hub endpoint whose port refuses connections, and the process's answer forgotten."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_reachable", None)


def test_an_unreachable_hub_is_noticed_once_and_switches_to_the_cache(unreachable_hub):
    import huggingface_hub.constants as hub_constants

    assert hub.hub_reachable(timeout=2) is False
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True
    monkeypatch_probe = hub._probe_address
    hub._probe_address = lambda: pytest.fail("probed twice")
    try:
        assert hub.hub_reachable() is False
    finally:
        hub._probe_address = monkeypatch_probe


def test_the_user_turning_the_hub_off_is_respected_without_a_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_reachable", None)
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    assert hub.hub_reachable() is False


def test_a_typo_of_an_alias_is_suggested(unreachable_hub):
    from gitcli.model.lm import load_tokenizer

    with pytest.raises(GitcapError, match=r"unknown LM 'gtp2' \(did you mean gpt2\?\)"):
        load_tokenizer("gtp2")
    with pytest.raises(GitcapError, match="the hub could not be reached"):
        load_tokenizer("some-org/no-such-model")


@pytest.mark.slow
def test_loading_with_no_route_to_the_hub_is_one_line_without_retry_warnings(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": os.getcwd()}
    env.pop("HF_HUB_OFFLINE", None)
    code = "from gitcli.model.lm import load_tokenizer; load_tokenizer('some-org/no-such-model')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "GitcapError" in run.stderr and "the hub could not be reached" in run.stderr
    assert "thrown while requesting" not in run.stderr and "Retrying" not in run.stderr


# published parameter counts, in millions
PUBLISHED = {"gpt2": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558, "opt-125m": 125, "opt-350m": 331,
             "opt-1.3b": 1316, "opt-2.7b": 2652, "opt-6.7b": 6658, "llama-7b": 6738}


@pytest.mark.parametrize("alias", sorted(LM_ALIASES))
def test_dry_run_knows_every_alias_offline_at_its_published_size(alias, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from gitcli.train.memory import _lm_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _lm_config(ModelConfig(lm=alias))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    millions = sum(p.numel() for p in lm.parameters()) / 1e6
    assert abs(millions - PUBLISHED[alias]) / PUBLISHED[alias] < 0.02, millions


def test_dry_run_estimates_an_alias_with_no_network(monkeypatch):
    from gitcli.train.memory import dry_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    est = dry_run(ModelConfig(lm="opt-2.7b", vision="ViT-B-32", vision_pretrained=None), TrainConfig(batch_size=2),
                  text_tokens=16, world=1)
    assert est.frozen > 2.6e9 and est.trainable > 0


def test_dry_run_suggests_a_close_alias():
    result = CliRunner().invoke(app, ["train", "--data", "synthetic", "--dry-run", "--lm", "gtp2"])
    assert result.exit_code == 2
    assert "did you mean gpt2?" in result.output and "Traceback" not in result.output


def test_the_tiny_preset_refuses_model_options_it_would_ignore():
    result = CliRunner().invoke(app, ["train", "--data", "synthetic", "--preset", "tiny", "--lm", "gpt2",
                                      "--dry-run"])
    assert result.exit_code == 2
    assert "--preset tiny builds its own model; it cannot be combined with --lm" in result.output
    result = CliRunner().invoke(app, ["bench", "train", "--preset", "tiny", "--vision", "RN50", "--device", "cpu"])
    assert result.exit_code == 2 and "--vision" in result.output


def test_dry_run_on_the_cpu_says_what_it_sizes():
    result = CliRunner().invoke(app, ["train", "--data", "synthetic", "--preset", "tiny", "--dry-run",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "CPU process" in result.output and "GPU" not in result.output
    gpu = CliRunner().invoke(app, ["train", "--data", "synthetic", "--preset", "tiny", "--dry-run"])
    assert "sized for GPUs" in gpu.output
