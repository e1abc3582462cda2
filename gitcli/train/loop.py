"""The training loop: one process, one per GPU under torchrun (DDP), or DeepSpeed ZeRO.

`train()` reads top to bottom as a run goes: set-up (options checked, process group
joined, the run directory locked, the resume point found, model and data built), then
the epoch/step iteration. The parts it calls each hold their own state:
- `launch.check_and_launch`: every option checked before anything loads, the process group;
- `epochs.TrainData`: the examples, their order and the micro-batches left in an epoch;
- `state.Position`: step, epoch, micro-batches done and the loss window -- what a
  checkpoint records so that a resumed run continues exactly;
- `step.Optimisation`: one step -- `grad_accum` micro-batches forward and backward, the
  step skipped when a loss was not finite, clipping, the optimizer and schedule step
  (or DeepSpeed's engine doing them, with `--zero`);
- `run_output.RunOutput`: the run directory -- metrics.jsonl, a tracker,
  `checkpoint-STEP/` (weights + resume state, atomically, then `latest`), validation
  and `best/`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gitcli.config import DataConfig, ModelConfig, TrainConfig
from gitcli.dist import is_main_process
from gitcli.errors import GitcapError
from gitcli.formats.lock import OutputLock, lock_for_dir
from gitcli.model.captioner import Captioner, apply_lora, build_captioner, freeze_for_training
from gitcli.model.checkpoint import LATEST_FILE, load_checkpoint, resolve_checkpoint
from gitcli.progress import ProgressBar
from gitcli.train.epochs import TrainData, sampler_kind
from gitcli.train.features import check_cache_features
from gitcli.train.launch import Launch, check_and_launch
from gitcli.train.run_config import check_resume_agrees
from gitcli.train.run_output import RunOutput
from gitcli.train.state import Position, load_state, set_rng_state
from gitcli.train.step import Optimisation
from gitcli.train.zero import torch_linear_restored

Validator = Callable[[Captioner, int], dict]  # (model, step) -> {"score": float, ...}


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    last_checkpoint: Path | None
    losses: list[float] = field(default_factory=list)  # per optimizer step, this process's run
    skipped_images: int = 0
    nonfinite_steps: int = 0
    samples_per_second: float = 0.0
    best_score: float | None = None
    seconds: float = 0.0
    data_notes: dict = field(default_factory=dict)  # what the source left out, e.g. missing images
    already_finished: bool = False  # resumed a run that had reached its last step: nothing trained


def _build_model(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, resume_from: Path | None) -> Captioner:
    if resume_from is not None:
        return load_checkpoint(resume_from, device=device)
    if cfg.init_from:  # held as the checkpoint was, unless --quant names a format
        model = load_checkpoint(cfg.init_from, device=device, quant=model_cfg.quant if model_cfg.quantised else None)
        model.config.train_vision = model_cfg.train_vision
        model.config.train_lm = model_cfg.train_lm
        if model_cfg.lora_rank and not model.config.lora_rank:
            model.config.lora_rank, model.config.lora_alpha = model_cfg.lora_rank, model_cfg.lora_alpha
            apply_lora(model)
        model.config.validate_for_training()
        if model.config.train_vision:
            model.vision.float()
        freeze_for_training(model)
        return model
    return build_captioner(model_cfg, device=device)


def train(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig, *, validator: Validator | None = None,
          progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Run training; returns a summary. `stop_after` ends the process's run early (tests)."""
    launch = check_and_launch(model_cfg, data_cfg, cfg)  # every option checked before anything loads
    out = Path(cfg.output_dir)
    with _run_lock(out, launch.rank), torch_linear_restored():
        resume_from, state = _resume_point(out, data_cfg, cfg)
        if (finished := _finished_run(out, state, resume_from, cfg.max_steps)) is not None:
            return finished  # said before a model loads, when --max-steps gives the length
        torch.manual_seed(cfg.seed)
        model = _build_model(model_cfg, cfg, launch.device, resume_from)
        _prepare_model(model, cfg)
        data = TrainData.build(model, data_cfg, cfg, launch, progress)
        tower_offloaded = _offload_cached_tower(model, cfg, launch)
        total_steps = cfg.max_steps or data.steps_per_epoch * cfg.epochs
        if (finished := _finished_run(out, state, resume_from, total_steps)) is not None:
            return finished
        opt = Optimisation.build(model, cfg, launch, total_steps, data.image_key, tower_offloaded)
        position = _resume(opt, state, resume_from, launch.rank) if state is not None else Position()
        output = RunOutput(out, model.config, data_cfg, cfg, launch, data.sampler_kind, position.step)
        result = TrainResult(out, position.step, None, best_score=position.best, data_notes=data.notes)

        def stopped() -> bool:
            return position.step >= total_steps or (stop_after is not None and len(result.losses) >= stop_after)

        bar = _Bar(total_steps, enabled=progress and is_main_process())
        start, samples_seen = time.perf_counter(), 0
        with output, bar:
            bar.update(position.step, None, opt.lr, 0.0)
            while not stopped():
                for batch in data.rest_of_epoch(position.epoch, position.micro_done):
                    position.micro_done += 1
                    result.skipped_images += batch["skipped"]
                    samples_seen += opt.forward_backward(batch, position.micro_done)
                    if position.micro_done % cfg.grad_accum != 0:
                        continue
                    step_loss = opt.step()  # None: a rank's loss was not finite, the step was skipped
                    if step_loss is None:
                        result.nonfinite_steps += 1
                        continue
                    position.step += 1
                    result.losses.append(step_loss)
                    position.window.append(step_loss)
                    rate = samples_seen * launch.world / max(time.perf_counter() - start, 1e-9)
                    bar.update(position.step, step_loss, opt.lr, rate)
                    if position.step % cfg.log_every == 0 or position.step == total_steps:
                        output.log_step(position, opt.lr, rate, result.skipped_images)
                    epoch_ended = position.micro_done >= data.micro_per_epoch
                    if epoch_ended:  # the one place the epoch moves on: a checkpoint saved now resumes there
                        position.next_epoch()
                    if position.step % cfg.save_every == 0 or position.step == total_steps:
                        _save_and_validate(output, model, opt, position, result, validator, tower_offloaded)
                    if stopped() or epoch_ended:
                        break
                if position.micro_done:  # the loader ran dry before the epoch's last step
                    position.next_epoch()
    result.steps = position.step
    result.seconds = time.perf_counter() - start
    result.samples_per_second = samples_seen * launch.world / max(result.seconds, 1e-9)
    return result


# ---- set-up ---------------------------------------------------------------------------------
def _run_lock(out: Path, rank: int):
    """One writer per run directory: rank 0 holds its lock for the whole run (the ranks of
    one job share the folder by design); a second `gitcap train` into it is refused."""
    if rank != 0:
        return contextlib.nullcontext()
    return OutputLock(lock_for_dir(out), what=f"run directory {out}",
                      hint="wait for that run to finish or choose another --output-dir")


def _resume_point(out: Path, data_cfg: DataConfig, cfg: TrainConfig) -> tuple[Path | None, dict | None]:
    """(checkpoint to resume, its resume state), or (None, None) for a new run."""
    resume_from = None
    if cfg.resume:
        if (out / LATEST_FILE).is_file():
            resume_from = resolve_checkpoint(out)
        elif is_main_process():
            print(f"nothing to resume in {out}: starting a new run", file=sys.stderr)
    elif (out / LATEST_FILE).is_file():
        raise GitcapError(f"{out} already holds a run; pass --resume to continue it or choose another --output-dir")
    if resume_from is None:
        return None, None
    state = load_state(resume_from)
    check_resume_agrees(out, data_cfg, cfg)  # the saved run config is the truth
    if state.get("sampler", "shuffle") != sampler_kind(cfg):
        # another order would replay or skip data; said before anything loads or is cached
        with_or_not = "with" if state.get("sampler") == "bucket-by-length" else "without"
        raise GitcapError(f"{out} was trained {with_or_not} --bucket-by-length; resume it the same way")
    return resume_from, state


def _finished_run(out: Path, state: dict | None, checkpoint: Path | None, total_steps: int | None
                  ) -> TrainResult | None:
    """The result of resuming a run that already reached `total_steps`; None otherwise."""
    if state is None or not total_steps or int(state["step"]) < total_steps:
        return None
    return TrainResult(out, int(state["step"]), checkpoint, best_score=state.get("best"), already_finished=True)


def _prepare_model(model: Captioner, cfg: TrainConfig) -> None:
    check_cache_features(model.config, cfg)  # again: a resumed run trains what its checkpoint says
    if cfg.grad_checkpointing:
        if model.config.lm_trained:
            model.lm.gradient_checkpointing_enable()
        if model.config.train_vision and hasattr(model.vision.visual, "set_grad_checkpointing"):
            model.vision.visual.set_grad_checkpointing(True)


def _offload_cached_tower(model: Captioner, cfg: TrainConfig, launch: Launch) -> bool:
    """Training from cached features, the tower only runs for validation: keep it in host RAM
    (DeepSpeed places the whole module itself, so there it stays). -> whether it moved."""
    offloaded = bool(cfg.cache_features) and launch.device.type == "cuda" and launch.stage is None
    if offloaded:
        model.vision.to("cpu")
    return offloaded


def _resume(opt: Optimisation, state: dict, checkpoint: Path, rank: int) -> Position:
    """Optimizer, schedule, this rank's RNG streams and the position, as the checkpoint left them."""
    opt.load(state, checkpoint)
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    position = Position.from_state(state)
    if is_main_process():
        print(f"resuming {checkpoint.parent} at step {position.step} (epoch {position.epoch})", file=sys.stderr)
    return position


def _save_and_validate(output: RunOutput, model: Captioner, opt: Optimisation, position: Position,
                       result: TrainResult, validator: Validator | None, tower_offloaded: bool) -> None:
    """Write the step's checkpoint, then score it; best/ follows the best score."""
    result.last_checkpoint = output.save(model, opt, position, result.best_score)
    if validator is None:
        return
    model.eval()
    with _tower_on(model, opt.launch.device) if tower_offloaded else contextlib.nullcontext():
        report = validator(model, position.step)
    model.train()
    result.best_score = output.record_validation(report, position.step, result.last_checkpoint, result.best_score)


@contextlib.contextmanager
def _tower_on(model: Captioner, device: torch.device):
    """The tower on `device` for a while (validation decodes images), then back in host RAM."""
    model.vision.to(device)
    try:
        yield
    finally:
        model.vision.to("cpu")


class _Bar(ProgressBar):
    """Training progress: step, loss, lr, samples/s, time left."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__("train", total, unit="steps", enabled=enabled)

    def update(self, step: int, loss: float | None, lr: float, rate: float) -> None:
        info = f"loss {loss:.3f}  lr {lr:.2e}  {rate:.0f} samples/s" if loss is not None and math.isfinite(loss) else ""
        self.show(step, info)
