"""Training: each trainable mode learns, resume is exact, a kill mid-save loses nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from gitcli.config import DataConfig, TrainConfig
from gitcli.errors import GitcapError
from gitcli.model.captioner import build_captioner
from gitcli.model.checkpoint import load_checkpoint, save_checkpoint
from gitcli.model.tiny import tiny_model_config
from gitcli.train.loop import train
from tests.support.training import FALL, loss_falls as _loss_falls


@pytest.mark.parametrize("task", ["captions", "vqa"])
def test_mapping_only_learns(vocab, task):
    torch.manual_seed(0)
    model = build_captioner(tiny_model_config(train_vision=False, train_lm=False), vocabulary=vocab)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mapping"}
    losses = _loss_falls(model, task)
    assert losses[-1] < FALL * losses[0]


def test_vision_and_mapping_learn(vocab):
    torch.manual_seed(0)
    model = build_captioner(tiny_model_config(train_vision=True, train_lm=False), vocabulary=vocab)
    before = [p.detach().clone() for p in model.vision.parameters()]
    losses = _loss_falls(model, "captions")
    assert losses[-1] < FALL * losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.vision.parameters()))


@pytest.mark.parametrize("task", ["captions", "vqa"])
def test_lora_on_8bit_lm_learns(tiny_checkpoint, task):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    ckpt_cfg = json.loads((tiny_checkpoint / "gitcap.json").read_text())["model"]
    cfg = tiny_model_config(quant="bnb-int8", lora_rank=8, train_vision=False, train_lm=False)
    model = build_captioner(cfg, lm_path=tiny_checkpoint / "lm", tokenizer_path=tiny_checkpoint / "tokenizer")
    assert ckpt_cfg["preset"] == "tiny"
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.lm.modules())
    names = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    losses = _loss_falls(model, task)
    assert losses[-1] < FALL * losses[0]


def _run(tmp_path, name, **overrides):
    opts = dict(output_dir=str(tmp_path / name), max_steps=6, batch_size=4, lr=2e-3, save_every=3, log_every=1,
                device="cpu", seed=0, keep_last=5)
    opts.update(overrides)
    return TrainConfig(**opts)


DATA = DataConfig(synthetic_size=12, task="both", num_workers=0)


def test_resume_gives_the_same_losses(tmp_path):
    full = train(tiny_model_config(), DATA, _run(tmp_path, "full"), progress=False)
    assert len(full.losses) == 6
    first = train(tiny_model_config(), DATA, _run(tmp_path, "cut"), progress=False, stop_after=3)
    assert len(first.losses) == 3
    rest = train(tiny_model_config(), DATA, _run(tmp_path, "cut", resume=True), progress=False)
    assert rest.steps == 6
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    # the run directory has what DESIGN.md promises
    run = tmp_path / "cut"
    assert (run / "latest").read_text().strip() == "checkpoint-6"
    assert (run / "checkpoint-6" / "train_state" / "state.pt").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    assert json.loads((run / "train_config.json").read_text())["model"]["preset"] == "tiny"


@pytest.mark.slow
def test_compile_goes_through_torch_compile_and_leaves_checkpoints_alone(tmp_path, monkeypatch):
    """--compile: the LM's forward runs compiled (eager backend here: inductor needs minutes
    on a CPU), the losses are the plain run's and the checkpoint holds the same tensors."""
    compiled_calls = []
    real_compile = torch.nn.Module.compile

    def eager_compile(self, *args, **kwargs):
        compiled_calls.append(type(self).__name__)
        return real_compile(self, *args, backend="eager", **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    plain = train(tiny_model_config(), DATA, _run(tmp_path, "plain", max_steps=3), progress=False)
    compiled = train(tiny_model_config(), DATA, _run(tmp_path, "compiled", max_steps=3, compile=True), progress=False)
    assert compiled_calls == ["OPTForCausalLM"]
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-5)
    from safetensors.torch import load_file

    parts = sorted(str(p.relative_to(tmp_path / "plain" / "checkpoint-3"))
                   for p in (tmp_path / "plain" / "checkpoint-3").rglob("*.safetensors"))
    assert "lm/model.safetensors" in parts  # the tiny preset trains and saves its LM
    for part in parts:
        a = load_file(tmp_path / "plain" / "checkpoint-3" / part)
        b = load_file(tmp_path / "compiled" / "checkpoint-3" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_existing_run_needs_resume(tmp_path):
    train(tiny_model_config(), DATA, _run(tmp_path, "r", max_steps=3), progress=False)
    with pytest.raises(GitcapError, match="--resume"):
        train(tiny_model_config(), DATA, _run(tmp_path, "r", max_steps=3), progress=False)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    train(tiny_model_config(), DATA, _run(tmp_path, "k", save_every=2, keep_last=2), progress=False)
    names = sorted(p.name for p in (tmp_path / "k").glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path, tiny_checkpoint):
    """SIGKILL a process in the middle of writing a checkpoint's weights."""
    run = tmp_path / "run"
    model = load_checkpoint(tiny_checkpoint)
    save_checkpoint(model, run / "checkpoint-1")
    (run / "latest").write_text("checkpoint-1\n")
    script = textwrap.dedent(f"""
        import os, signal, safetensors.torch as st
        from gitcli.model.checkpoint import load_checkpoint, save_checkpoint
        real = st.save_file
        def dying(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            if "vision" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)  # mid-save: mapping and vision written, no gitcap.json
        import gitcli.model.checkpoint as ck
        ck.save_file = dying
        save_checkpoint(load_checkpoint({str(tiny_checkpoint)!r}), {str(run / 'checkpoint-2')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoint-2").exists()  # only a hidden temporary directory was left
    loaded = load_checkpoint(run)  # follows `latest`
    assert loaded.config.preset == "tiny"


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, monkeypatch):
    from gitcli.model import captioner as cap

    real = cap.Captioner.forward

    def nan_forward(self, *args, **kwargs):
        loss, logits = real(self, *args, **kwargs)
        return loss * float("nan"), logits

    monkeypatch.setattr(cap.Captioner, "forward", nan_forward)
    with pytest.raises(GitcapError, match="non-finite"):
        train(tiny_model_config(), DATA, _run(tmp_path, "nan", max_nonfinite=3), progress=False)


# ---- killed and resumed: the run it would have been ---------------------------------------
HARNESS = os.path.join(os.path.dirname(__file__), "support", "resume_harness.py")
# 12 examples in batches of 4: 3 steps an epoch, 3 epochs. Checkpoints every 2 steps (one
# at an epoch's last step, 6), a line every 3 steps (so the loss window spans checkpoints).
KILL_RUN = dict(train=dict(max_steps=7, batch_size=4, lr=2e-3, save_every=2, log_every=3, seed=0, keep_last=10),
                data=dict(synthetic_size=12, task="captions", num_workers=0))
KILL_SEGMENTS = [
    {"run": "ref"},  # uninterrupted
    {"run": "cut", "kill": ["checkpoint-write", 4]},  # during a checkpoint write: resumes from 2, mid-epoch
    {"run": "cut", "resume": True, "kill": ["forward-after-step", 4]},  # mid-epoch (step 5 of 3..5)
    {"run": "cut", "resume": True, "kill": ["forward-after-step", 6]},  # after the epoch's last step, 6
    {"run": "cut", "resume": True},
]


def run_kill_harness(tmp_path, world=1, zero=None, segments=KILL_SEGMENTS, timeout=300):
    """Run `segments` in `world` harness processes (the same global batch whatever `world`);
    checks that each ended as planned (killed where a kill was asked)."""
    ports = [_free_port() for _ in segments] if world > 1 else []
    run = dict(KILL_RUN, train=dict(KILL_RUN["train"], batch_size=KILL_RUN["train"]["batch_size"] // world))
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, HARNESS, json.dumps(
        dict(run, dir=str(tmp_path), world=world, rank=rank, zero=zero, ports=ports, segments=segments))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == [
            "killed" if seg.get("kill") else "ok" for seg in segments], err[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_resumed_run_is_the_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert json.loads((cut / "checkpoint-7" / "lm" / "config.json").read_text())["dropout"] == 0.1

    def steps(run):  # the last value recorded for each step: a resumed run's replaces the killed one's
        by_step = {}
        for line in (tmp_path / f"{run}.trace.jsonl").read_text().splitlines():
            record = json.loads(line)
            by_step[record["step"]] = (record["loss"], record["lr"])
        return by_step

    assert sorted(steps("ref")) == list(range(1, 8))
    assert steps("cut") == steps("ref")  # every step's loss and learning rate, exactly

    def logged(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    cut_lines, ref_lines = logged("cut"), logged("ref")
    assert [r["step"] for r in cut_lines] == [3, 6, 7]  # each step once, though 3 was logged before a kill
    for a, b in zip(cut_lines, ref_lines, strict=True):
        assert (a["epoch"], a["loss"], a["lr"]) == (b["epoch"], b["loss"], b["lr"])
    for part in sorted(p.relative_to(ref / "checkpoint-7") for p in (ref / "checkpoint-7").rglob("*.safetensors")):
        a, b = load_file(ref / "checkpoint-7" / part), load_file(cut / "checkpoint-7" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert [p.name for p in cut.iterdir() if p.name.startswith(".")] == []  # no temporaries, no lock left


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """SIGKILL during a checkpoint write, mid-epoch, and right after an epoch's last step
    (a checkpoint there); each time resumed: a tiny model with dropout gives every step's
    loss and lr, every logged line and the final weights of the run that was never stopped."""
    run_kill_harness(tmp_path)
    assert_resumed_run_is_the_uninterrupted_one(tmp_path)


# ---- a resumed run is the run it resumes -------------------------------------------------
def _cli(*args):
    from typer.testing import CliRunner

    from gitcli.cli import app

    return CliRunner().invoke(app, ["train", *map(str, args)])


def _error_lines(result):
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_cli_resume_takes_the_saved_options_and_refuses_other_ones(tmp_path):
    run = tmp_path / "run"
    missing = _cli("--preset", "tiny", "-o", run)
    assert missing.exit_code == 2 and not run.exists()
    assert _error_lines(missing) == ["error: no --data given: name the training data, or pass --data synthetic for "
                                     "the built-in synthetic set"]
    first = _cli("--preset", "tiny", "--data", "synthetic", "--synthetic-size", 12, "--task", "captions",
                 "--num-workers", 0, "--max-steps", 2, "--batch-size", 4, "--lr", "2e-3", "--save-every", 2,
                 "--device", "cpu", "-o", run)
    assert first.exit_code == 0, first.output
    # the summary table is the result: stdout; nothing else is
    assert "training summary" in first.stdout and "training summary" not in first.stderr
    assert "final loss" in first.stdout and first.stdout.count("\n") < 20
    again = _cli("-o", run, "--resume")
    assert again.exit_code == 0 and f"{run} already finished at step 2" in again.stdout
    assert "final loss" not in again.output
    for option, value, saved in (("--lr", "0.5", "0.002"), ("--data", "data/cc3m", "synthetic"),
                                 ("--batch-size", 8, 4), ("--synthetic-size", 2000, 12)):
        refused = _cli("-o", run, "--resume", "--max-steps", 3, option, value)
        assert refused.exit_code == 2
        (line,) = _error_lines(refused)
        assert line.startswith(f"error: {option} {value} disagrees with the run in {run}, which was started with "
                               f"{saved};") and "--max-steps" in line
    assert (run / "latest").read_text().strip() == "checkpoint-2"  # nothing of it trained
    # --data left out: the run's own data (12 synthetic scenes, not the option's 2000), two more steps
    longer = _cli("-o", run, "--resume", "--max-steps", 4, "--lr", "2e-3", "--save-every", 4)
    assert longer.exit_code == 0, longer.output
    assert f"resuming {run} at step 2" in longer.stderr and "resuming" not in longer.stdout
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["data"]["synthetic_size"] == 12 and saved["data"]["task"] == "captions"
    assert (saved["train"]["max_steps"], saved["train"]["save_every"], saved["train"]["lr"]) == (4, 4, 2e-3)
    assert (run / "latest").read_text().strip() == "checkpoint-4"


def test_library_resume_with_other_options_is_refused(tmp_path):
    train(tiny_model_config(), DATA, _run(tmp_path, "r", max_steps=3), progress=False)
    with pytest.raises(GitcapError, match=r"^--weight-decay 0.1 disagrees .* started with 0.0;"):
        train(tiny_model_config(), DATA, _run(tmp_path, "r", max_steps=4, weight_decay=0.1, resume=True),
              progress=False)


def test_longer_max_steps_on_resume_follows_the_longer_schedule(tmp_path, monkeypatch):
    """--max-steps raised on resume: from the resume step on, the lr is the longer run's
    (its first step's too, not the one the shorter schedule left in the optimizer)."""
    train(tiny_model_config(), DATA, _run(tmp_path, "long", max_steps=6, save_every=3), progress=False)
    train(tiny_model_config(), DATA, _run(tmp_path, "short", max_steps=3, save_every=3), progress=False)
    used = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(tiny_model_config(), DATA, _run(tmp_path, "short", max_steps=6, save_every=3, resume=True), progress=False)

    def lrs(run):  # the lr after each step: the one the next step uses
        return [r["lr"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert used == lrs("long")[2:5]
    assert lrs("short")[3:] == lrs("long")[3:]


# ---- one writer per run directory --------------------------------------------------------
def test_second_train_into_a_running_run_directory_is_refused(tmp_path):
    import time

    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "gitcli", "train", "--preset", "tiny", "--data", "synthetic", "--synthetic-size", "12",
         "--task", "captions", "--num-workers", "0", "--batch-size", "4", "--max-steps", "100000", "--device", "cpu",
         "-o", str(run)],
        env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = run / ".gitcap.lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = _cli("--preset", "tiny", "--data", "synthetic", "--device", "cpu", "-o", run, "--resume")
        assert second.exit_code == 2
        assert _error_lines(second) == [
            f"error: run directory {run} is in use by another gitcap process (pid {first.pid}); "
            "wait for that run to finish or choose another --output-dir"]
    finally:
        first.kill()
        first.wait()


def test_validation_scenes_come_from_val_synthetic_seed(monkeypatch):
    """One source of truth: TrainConfig.val_synthetic_seed picks the held-out scenes."""
    import gitcli.data.sources as sources
    from gitcli.train.validate import make_validator

    seeds = []
    real = sources.synthetic_records
    monkeypatch.setattr(sources, "synthetic_records", lambda n, seed, task: seeds.append(seed) or real(n, seed, task))
    make_validator(DataConfig(source="synthetic"), 8, DataConfig(), synthetic_seed=7)
    make_validator(DataConfig(source="synthetic"), 8, DataConfig())
    assert seeds == [7, TrainConfig().val_synthetic_seed]
    with pytest.raises(GitcapError, match="would score the training scenes"):
        make_validator(DataConfig(source="synthetic"), 8, DataConfig(synthetic_seed=3), synthetic_seed=3)


def test_run_started_again_after_a_kill_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # a killed run's, cut mid-line
    train(tiny_model_config(), DATA, _run(tmp_path, "r", max_steps=2, save_every=2), progress=False)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines[0]["loss"] != 9.0


def test_resuming_a_finished_run_loads_nothing(tmp_path, monkeypatch):
    train(tiny_model_config(), DATA, _run(tmp_path, "r", max_steps=2, save_every=2), progress=False)
    import gitcli.train.loop as loop

    monkeypatch.setattr(loop, "_build_model", lambda *a, **k: pytest.fail("a finished run loaded its model"))
    result = train(tiny_model_config(), DATA, _run(tmp_path, "r", max_steps=2, save_every=2, resume=True),
                   progress=False)
    assert result.already_finished and result.steps == 2 and result.losses == []
