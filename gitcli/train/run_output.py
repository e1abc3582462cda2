"""The run directory as training writes it: metrics.jsonl, a tracker, `checkpoint-STEP/`
(weights and resume state together, atomically, then `latest`), validations and `best/`.
Rank 0 writes; the other ranks take part in the collective parts of a save."""

from __future__ import annotations

import shutil
from pathlib import Path

from gitcli.config import DataConfig, ModelConfig, TrainConfig, to_dict
from gitcli.dist import barrier, is_main_process
from gitcli.formats.atomic import TMP_MARK, copy_dir_atomic, remove_temporaries
from gitcli.model.captioner import Captioner
from gitcli.model.checkpoint import save_checkpoint, saved_parameters, write_latest
from gitcli.train import zero as ds
from gitcli.train.launch import Launch
from gitcli.train.metrics import MetricsLog
from gitcli.train.report import Reporter
from gitcli.train.run_config import write_run_config
from gitcli.train.state import Position, rng_state, save_state
from gitcli.train.step import Optimisation


class RunOutput:
    """The run directory: metrics.jsonl, the tracker, checkpoints and best/ (rank 0 writes).

    Opening it (under the run's lock) clears what a killed run left, records the run config
    and cuts metrics.jsonl back to the step the run starts from (0: a run killed before
    its first checkpoint and started again logs its steps once too).
    """

    def __init__(self, out: Path, model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig, launch: Launch,
                 sampler_kind: str, start_step: int) -> None:
        self.out, self.cfg, self.launch, self.sampler_kind = out, cfg, launch, sampler_kind
        self.main = is_main_process()
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            remove_temporaries(out)  # what a killed checkpoint write left (a whole model's worth each)
            write_run_config(out, model_cfg, data_cfg, cfg, launch.world)
        barrier()  # no rank writes before rank 0 has cleared the folder
        self.metrics = MetricsLog(out, start_step) if self.main else None
        self.reporter = (Reporter(cfg.report_to, out, {"model": to_dict(model_cfg), "train": to_dict(cfg)})
                         if cfg.report_to and self.main else None)

    def __enter__(self) -> "RunOutput":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.reporter is not None:
            self.reporter.close()

    def log_step(self, position: Position, lr: float, rate: float, skipped_images: int) -> None:
        """One metrics line: the mean loss since the last one (the window starts again)."""
        if self.metrics is not None:
            record = {"step": position.step, "epoch": position.epoch,
                      "loss": sum(position.window) / len(position.window), "lr": lr, "samples_per_s": rate,
                      "skipped_images": skipped_images}
            self.metrics.write(record)
            if self.reporter is not None:
                self.reporter.log(record, position.step)
            position.window.clear()

    def save(self, model: Captioner, opt: Optimisation, position: Position, best: float | None) -> Path:
        """`checkpoint-STEP/`: weights and resume state together, atomically; `latest` then names it."""
        name = f"checkpoint-{position.step}"
        state = {"scheduler": opt.scheduler.state_dict(), "rng": gather_rng(self.launch.world),
                 "step": position.step, "epoch": position.epoch, "micro_done": position.micro_done, "best": best,
                 "sampler": self.sampler_kind, "loss_window": list(position.window)}
        staging = self.out / f".{name}{TMP_MARK}deepspeed"
        if opt.engine is None:
            if self.main:
                state.update(optimizer=opt.optimizer.state_dict(), scaler=opt.scaler.state_dict())
        else:  # every rank writes its optimizer partition, then rank 0 moves them in
            if self.main:
                shutil.rmtree(staging, ignore_errors=True)
            barrier()
            ds.save_engine_state(opt.engine, staging)
            barrier()

        def also_write(tmp: Path) -> None:
            save_state(tmp, state)
            if opt.engine is not None:
                ds.move_engine_state(staging, tmp)

        with ds.gathered(model, self.launch.stage or 0, saved_parameters(model)):
            if self.main:
                self.metrics.sync()  # every line up to this step is on disk before `latest` names it
                save_checkpoint(model, self.out / name, extra={"step": position.step}, also_write=also_write)
                write_latest(self.out, name)
                prune_checkpoints(self.out, self.cfg.keep_last)
        barrier()
        return self.out / name

    def record_validation(self, report: dict, step: int, checkpoint: Path, best: float | None) -> float | None:
        """Log a validation; copy `checkpoint` to best/ when its score beats `best`. -> the best score."""
        if not self.main:
            return best
        self.metrics.write({"step": step, "validation": report})
        if self.reporter is not None:
            self.reporter.log({f"val/{k}": v for k, v in report.items()}, step)
        score = report.get("score")
        if score is not None and (best is None or score > best):
            copy_dir_atomic(checkpoint, self.out / "best")
            return score
        return best


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def gather_rng(world: int) -> list[dict]:
    """Every rank's RNG state, so each continues its own stream on resume."""
    state = rng_state()
    if world == 1:
        return [state]
    import torch.distributed as dist

    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states
