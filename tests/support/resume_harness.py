"""Kill a training run with SIGKILL at chosen points, resume it, and record every step.

Run as `python tests/support/resume_harness.py SPEC_JSON` (one process per rank for a 2-process
run). Torch and gitcap are imported once; every run segment is a forked child, so a
SIGKILL hits a real process while the next segment costs no new import. SPEC:
  dir: folder for the runs; world, rank: the process group (world 2 = DDP on gloo);
  zero: None or a ZeRO stage; ports: one free port per segment (world 2);
  train: TrainConfig overrides; data: DataConfig overrides;
  segments: [{"run": name, "resume": bool, "kill": ["forward-after-step", N] |
              ["checkpoint-write", N] | null}, ...]
Each segment's steps go to DIR/NAME.trace.jsonl (rank 0): {"step", "loss", "lr"} per step.
Prints one JSON line: each segment's exit ("ok", "killed" or "failed").
"""

import json
import os
import signal
import sys
import traceback
from pathlib import Path

spec = json.loads(sys.argv[1])
root = Path(spec["dir"])
world, rank = spec.get("world", 1), spec.get("rank", 0)
os.environ.setdefault("OMP_NUM_THREADS", "1")
if world > 1:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")

import torch  # noqa: E402

torch.set_num_threads(1)
if spec.get("zero") is not None:
    import deepspeed  # noqa: E402,F401  (once, before the forks)

import gitcli.model.tiny as tiny  # noqa: E402
from gitcli.config import DataConfig, TrainConfig  # noqa: E402
from gitcli.model.tiny import tiny_model_config  # noqa: E402

real_build_tiny_lm = tiny.build_tiny_lm


def build_tiny_lm_with_dropout(tokenizer):
    """The tiny LM with dropout, as real LMs have (GPT-2, OPT: 0.1): resume must replay the masks."""
    config = real_build_tiny_lm(tokenizer).config
    config.dropout = config.attention_dropout = 0.1
    from transformers import OPTForCausalLM

    return OPTForCausalLM(config)


def die(segment: int) -> None:
    """SIGKILL every rank of this segment (a rank waiting in a collective would hang), then this one."""
    for other in range(world):
        pid_file = root / f"pid-{segment}-{other}"
        pid = int(pid_file.read_text()) if pid_file.is_file() else None
        if pid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def install_hooks(segment: int, run: str, kill) -> None:
    import gitcli.model.captioner as captioner
    import gitcli.model.checkpoint as checkpoint
    import gitcli.train.loop as loop

    tiny.build_tiny_lm = build_tiny_lm_with_dropout
    trace = open(root / f"{run}.trace.jsonl", "a") if rank == 0 else None
    last_step = [None]

    real_update = loop._Bar.update

    def update(self, step, loss, lr, rate):
        if loss is not None:
            last_step[0] = step
            if trace is not None:
                trace.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")
                trace.flush()
        return real_update(self, step, loss, lr, rate)

    loop._Bar.update = update
    if kill and kill[0] == "forward-after-step":
        real_forward = captioner.Captioner.forward

        def forward(self, *args, **kwargs):
            if last_step[0] == kill[1]:
                die(segment)
            return real_forward(self, *args, **kwargs)

        captioner.Captioner.forward = forward
    if kill and kill[0] == "checkpoint-write":
        real_save_file = checkpoint.save_file

        def save_file(tensors, path, *args, **kwargs):
            real_save_file(tensors, path, *args, **kwargs)
            if f".checkpoint-{kill[1]}.tmp-" in str(path):  # mid-write: the mapping is written, nothing else
                die(segment)

        checkpoint.save_file = save_file


def run_segment(segment: int, seg: dict) -> str:
    pid = os.fork()
    if pid == 0:
        try:
            (root / f"pid-{segment}-{rank}").write_text(str(os.getpid()))
            if world > 1:
                os.environ["MASTER_PORT"] = str(spec["ports"][segment])
            install_hooks(segment, seg["run"], seg.get("kill"))
            from gitcli.train.loop import train

            cfg = TrainConfig(output_dir=str(root / seg["run"]), device="cpu", zero=spec.get("zero"),
                              resume=seg.get("resume", False), **spec["train"])
            train(tiny_model_config(), DataConfig(**spec["data"]), cfg, progress=False)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return "ok" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "failed"


import time  # noqa: E402

outcomes = []
for i, seg in enumerate(spec["segments"]):
    started = time.perf_counter()
    outcomes.append(run_segment(i, seg))
    print(f"segment {i} ({seg['run']}): {outcomes[-1]} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
print(json.dumps(outcomes))
