"""DeepSpeed ZeRO on CPU (gloo): the engine path trains exactly like the plain loop,
resumes exactly, splits across two torchrun processes, and refuses impossible options.

What DeepSpeed cannot do here is said where it applies (see test_zero3_offload_params).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gitcli.config import DataConfig, TrainConfig
from gitcli.errors import GitcapError
from gitcli.model.checkpoint import load_checkpoint
from gitcli.model.tiny import tiny_model_config
from gitcli.train.deepspeed_config import build_config, check_combination, zero_stage
from gitcli.train.loop import train

pytest.importorskip("deepspeed")

DATA = DataConfig(synthetic_size=12, task="both", num_workers=0)
REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, name, **overrides):
    opts = dict(output_dir=str(tmp_path / name), max_steps=4, batch_size=4, lr=2e-3, save_every=2, log_every=1,
                device="cpu", seed=0, keep_last=5)
    opts.update(overrides)
    return TrainConfig(**opts)


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory):
    """The plain PyTorch loop's losses: the reference every ZeRO stage must reproduce."""
    return train(tiny_model_config(), DATA, _cfg(tmp_path_factory.mktemp("plain"), "run"), progress=False).losses


@pytest.mark.slow
def test_zero2_one_process_matches_plain_loop_and_resumes(tmp_path, plain_losses):
    full = train(tiny_model_config(), DATA, _cfg(tmp_path, "full", zero=2), progress=False)
    assert full.losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    ds_state = tmp_path / "full" / "checkpoint-4" / "train_state" / "deepspeed" / "state"
    assert any(p.name.endswith("optim_states.pt") for p in ds_state.iterdir())
    assert load_checkpoint(tmp_path / "full").config.preset == "tiny"  # gitcap's own weights, loadable

    first = train(tiny_model_config(), DATA, _cfg(tmp_path, "cut", zero=2), progress=False, stop_after=2)
    rest = train(tiny_model_config(), DATA, _cfg(tmp_path, "cut", zero=2, resume=True), progress=False)
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_zero3_gathers_weights_for_the_checkpoint(tmp_path, plain_losses):
    torch_linear = torch.nn.functional.linear
    result = train(tiny_model_config(), DATA, _cfg(tmp_path, "z3", zero=3, max_steps=2, save_every=2),
                   progress=False)
    # ZeRO-3 swaps F.linear for the process; the run gives torch's back (torchao's int8 needs it)
    assert torch.nn.functional.linear is torch_linear
    assert result.losses == pytest.approx(plain_losses[:2], rel=1e-5, abs=1e-6)
    # under ZeRO-3 each rank holds slices; the saved weights must be whole
    model = load_checkpoint(tmp_path / "z3")
    reference = train(tiny_model_config(), DATA, _cfg(tmp_path, "plain2", max_steps=2, save_every=2), progress=False)
    plain = load_checkpoint(tmp_path / "plain2")
    assert reference.losses == pytest.approx(result.losses, rel=1e-5)
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_offload_optimizer_and_params(tmp_path, plain_losses, stage):
    """Offload on CPU: the optimizer step runs in DeepSpeedCPUAdam (a JIT-built op); ZeRO-3
    also offloads the parameters.

    On a CPU-only machine the accelerator *is* the host, so this checks the code path and
    the numbers, not the memory saving."""
    result = train(tiny_model_config(), DATA,
                   _cfg(tmp_path, "off", zero=stage, offload=True, max_steps=2, save_every=2), progress=False)
    assert result.losses == pytest.approx(plain_losses[:2], rel=1e-4, abs=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path):
    """2 ranks x batch 2 under torchrun (gloo) == 1 process x batch 4: the same global batch."""
    common = ["--preset", "tiny", "--data", "synthetic", "--synthetic-size", "12", "--task", "captions",
              "--num-workers", "0", "--max-steps", "3", "--lr", "2e-3", "--log-every", "1", "--save-every", "3",
              "--device", "cpu", "--zero", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "gitcli", "train", *common, "--batch-size", "2", "-o", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(tiny_model_config(), DataConfig(synthetic_size=12, task="captions", num_workers=0),
                _cfg(tmp_path, "one", zero=2, max_steps=3, save_every=3), progress=False)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]

    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["world_size"] == 2
    # each rank averages over its own tokens, then the ranks are averaged: close, not equal
    assert losses("two") == pytest.approx(one.losses, rel=2e-2)
    assert losses("one") == pytest.approx(one.losses, rel=1e-6)


# ---- refusals, before anything loads ------------------------------------------------------
@pytest.fixture
def nothing_loads(monkeypatch):
    import gitcli.train.loop as loop

    def boom(*a, **k):
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr(loop, "_build_model", boom)


def test_zero3_with_int8_is_refused_before_loading(tmp_path, nothing_loads):
    with pytest.raises(GitcapError, match="ZeRO-3.*quantised LM"):
        train(tiny_model_config(quant="bnb-int8", train_lm=False, lora_rank=4), DATA, _cfg(tmp_path, "x", zero=3),
              progress=False)


def test_offload_without_zero2_is_refused(tmp_path, nothing_loads):
    with pytest.raises(GitcapError, match="--offload needs --zero 2 or 3"):
        train(tiny_model_config(), DATA, _cfg(tmp_path, "x", zero=1, offload=True), progress=False)


@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
    ({"bf16": {"enabled": True}}, "use --precision bf16"),
    ({"zero_optimization": {"stage": 3}}, "disagrees"),
    ({"train_micro_batch_size_per_gpu": 7}, "--batch-size"),
])
def test_bad_deepspeed_config_file_is_refused(tmp_path, nothing_loads, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(GitcapError, match=message):
        train(tiny_model_config(), DATA, _cfg(tmp_path, "x", zero=2, deepspeed_config=str(path)), progress=False)


def test_config_from_options_and_file_override(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
                                "gradient_clipping": 0.5}))
    cfg = TrainConfig(batch_size=3, grad_accum=2, clip_grad=1.0, offload=True, zero=None,
                      deepspeed_config=str(path))
    with pytest.raises(GitcapError):  # --offload without --zero: the stage comes from the file too late
        check_combination(tiny_model_config(), cfg)
    cfg.offload = False
    override = check_combination(tiny_model_config(), cfg)
    assert zero_stage(cfg, override) == 2
    ds = build_config(cfg, precision="bf16", world=4, stage=2, override=override)
    assert ds["train_batch_size"] == 3 * 2 * 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}  # merged key by key
    assert ds["gradient_clipping"] == 0.5  # the file wins
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # weights keep their dtypes
    assert "bf16" not in ds and "fp16" not in ds
    off = build_config(TrainConfig(zero=3, offload=True), precision="fp32", world=1, stage=3)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "torch_autocast" not in off


# ---- --report-to --------------------------------------------------------------------------
def test_report_to_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny_model_config(), DATA, _cfg(tmp_path, "tb", max_steps=2, report_to="tensorboard"), progress=False)
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_missing_package_is_one_clear_error(tmp_path, nothing_loads, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(GitcapError, match="--report-to wandb needs the wandb package"):
        train(tiny_model_config(), DATA, _cfg(tmp_path, "x", report_to="wandb"), progress=False)


def test_cli_refuses_zero3_with_int8_in_one_line():
    from typer.testing import CliRunner

    from gitcli.cli import app

    result = CliRunner().invoke(app, ["train", "--lm", "gpt2", "--int8", "--lora", "4", "--zero", "3"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        "error: ZeRO-3 partitions every weight, which a quantised LM cannot be; use --zero 2 with --quant bnb-int8, "
        "or drop --quant"]


@pytest.mark.slow
def test_zero2_trains_from_cached_features_like_the_plain_loop(tmp_path):
    """The engine passes cached features through to the captioner as the plain loop does."""
    frozen, feats = tiny_model_config(train_vision=False), str(tmp_path / "feats")
    plain = train(frozen, DATA, _cfg(tmp_path, "plain", cache_features=feats, bucket_by_length=True), progress=False)
    zero = train(frozen, DATA, _cfg(tmp_path, "z2", cache_features=feats, bucket_by_length=True, zero=2),
                 progress=False)
    assert zero.losses == pytest.approx(plain.losses, rel=1e-5)


# ---- killed and resumed (the harness and kill points of test_train_loop.py) -------------------
@pytest.mark.slow
def test_zero2_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Killed while writing a checkpoint (DeepSpeed's optimizer partitions staged beside it),
    then resumed mid-epoch. (The epoch-boundary kill is the engine-free loop's: test_train_loop.py.)"""
    from test_train_loop import KILL_SEGMENTS, assert_resumed_run_is_the_uninterrupted_one, run_kill_harness

    run_kill_harness(tmp_path, zero=2, segments=[KILL_SEGMENTS[0], KILL_SEGMENTS[1], KILL_SEGMENTS[4]])
    assert_resumed_run_is_the_uninterrupted_one(tmp_path)


@pytest.mark.slow
def test_two_process_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Two ranks (DDP on gloo, started with torchrun's environment), killed together right
    after the checkpoint of an epoch's last step, then resumed. (One kill point: each
    two-process segment costs ~20 s on a 2-core machine.)"""
    from test_train_loop import KILL_SEGMENTS, assert_resumed_run_is_the_uninterrupted_one, run_kill_harness

    run_kill_harness(tmp_path, world=2, segments=[KILL_SEGMENTS[0], {**KILL_SEGMENTS[3], "resume": False},
                                                  KILL_SEGMENTS[4]])
    assert_resumed_run_is_the_uninterrupted_one(tmp_path)
