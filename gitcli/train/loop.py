"""The training loop: one process, one per GPU under torchrun (DDP), or DeepSpeed ZeRO.

`train()` reads top to bottom as a run goes: set-up (options checked, process group
joined, the run directory locked, the resume point found, model and data built), then
the epoch/step iteration. The parts it calls each hold their own state:
- `_TrainData`: the examples, their order and the micro-batches left in an epoch;
- `_Position`: step, epoch, micro-batches done and the loss window -- what a checkpoint
  records so that a resumed run continues exactly;
- `_Optimisation`: one step -- `grad_accum` micro-batches forward and backward, the step
  skipped when a loss was not finite, clipping, the optimizer and schedule step. With
  `--zero` the model and optimizer live in a DeepSpeed engine (`gitcli.train.zero`);
  only the backward, step, save and resume lines differ;
- `_RunOutput`: the run directory -- metrics.jsonl, a tracker, `checkpoint-STEP/`
  (weights + resume state, atomically, then `latest`), validation and `best/`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from gitcli.config import DataConfig, ModelConfig, TrainConfig, to_dict
from gitcli.data.datasets import (BucketBatchSampler, CachedFeatureDataset, Collator, RecordDataset, ResumableSampler,
                                  epoch_generator, token_lengths)
from gitcli.data.sources import build_source
from gitcli.dist import (all_reduce_mean, autocast, barrier, init_distributed, is_main_process, resolve_device,
                         resolve_precision)
from gitcli.errors import GitcapError
from gitcli.formats.atomic import TMP_MARK, copy_dir_atomic, remove_temporaries
from gitcli.formats.lock import OutputLock, lock_for_dir
from gitcli.model.captioner import Captioner, apply_lora, build_captioner, freeze_for_training
from gitcli.model.checkpoint import (LATEST_FILE, load_checkpoint, resolve_checkpoint, save_checkpoint, saved_parameters,
                                     write_latest)
from gitcli.train import zero as ds
from gitcli.train.deepspeed_config import build_config, check_combination, offloads, zero_stage
from gitcli.train.features import build_feature_cache, check_cache_features
from gitcli.progress import ProgressBar
from gitcli.train.metrics import MetricsLog
from gitcli.train.report import Reporter, check_available
from gitcli.train.run_config import check_resume_agrees, write_run_config
from gitcli.train.schedule import lr_factor
from gitcli.train.state import load_state, rng_state, save_state, set_rng_state

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
    if cfg.init_from:
        model = load_checkpoint(cfg.init_from, device=device)
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
    vocabulary = None
    if model_cfg.preset == "tiny":
        from gitcli.data.synthetic import vocabulary as synthetic_vocabulary

        vocabulary = synthetic_vocabulary()
    return build_captioner(model_cfg, device=device, vocabulary=vocabulary)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
               deepspeed_offload: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; `deepspeed_offload` (not None) means the optimizer is handed to DeepSpeed."""
    decay, no_decay = [], []
    for p in _trainable(model):
        (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # DeepSpeed refuses empty groups
    if deepspeed_offload is not None:
        return ds.build_optimizer(groups, cfg.lr, deepspeed_offload)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def _prune(run_dir: Path, keep: int) -> None:
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def train(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig, *, validator: Validator | None = None,
          progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Run training; returns a summary. `stop_after` ends the process's run early (tests)."""
    launch = _launch(model_cfg, data_cfg, cfg)  # every option checked before anything loads
    out = Path(cfg.output_dir)
    with _run_lock(out, launch.rank):
        resume_from, state = _resume_point(out, data_cfg, cfg)
        if (finished := _finished_run(out, state, resume_from, cfg.max_steps)) is not None:
            return finished  # said before a model loads, when --max-steps gives the length
        torch.manual_seed(cfg.seed)
        model = _build_model(model_cfg, cfg, launch.device, resume_from)
        _prepare_model(model, cfg)
        data = _TrainData.build(model, data_cfg, cfg, launch, progress)
        tower_offloaded = _offload_cached_tower(model, cfg, launch)
        total_steps = cfg.max_steps or data.steps_per_epoch * cfg.epochs
        if (finished := _finished_run(out, state, resume_from, total_steps)) is not None:
            return finished
        opt = _Optimisation.build(model, cfg, launch, total_steps, data.image_key, tower_offloaded)
        position = _resume(opt, state, resume_from, launch.rank) if state is not None else _Position()
        output = _RunOutput(out, model.config, data_cfg, cfg, launch, data.sampler_kind, position.step)
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
@dataclass
class _Launch:
    """Where and how this process trains."""

    device: torch.device
    rank: int
    world: int
    precision: str
    stage: int | None  # DeepSpeed ZeRO stage, None for plain PyTorch
    ds_override: dict | None  # the --deepspeed-config file's keys


def _launch(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig) -> _Launch:
    """Check every option (cheap, before anything loads), then join the process group."""
    cfg.validate()
    model_cfg.validate_for_training()
    check_cache_features(model_cfg, cfg)
    ds_override = check_combination(model_cfg, cfg)
    stage = zero_stage(cfg, ds_override)
    check_available(cfg.report_to)
    if data_cfg.source is None:
        raise GitcapError("no --data given: name the training data, or pass --data synthetic for the built-in "
                          "synthetic set")
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device.type)
    precision = resolve_precision(cfg.precision, device)
    if stage is not None:
        ds.import_deepspeed()
        ds.ensure_process_group(device)
    return _Launch(device, rank, world, precision, stage, ds_override)


def _run_lock(out: Path, rank: int):
    """One writer per run directory: rank 0 holds its lock for the whole run (the ranks of
    one job share the folder by design); a second `gitcap train` into it is refused."""
    if rank != 0:
        return contextlib.nullcontext()
    return OutputLock(lock_for_dir(out), what=f"run directory {out}",
                      hint="wait for that run to finish or choose another --output-dir")


def _sampler_kind(cfg: TrainConfig) -> str:
    return "bucket-by-length" if cfg.bucket_by_length else "shuffle"


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
    if state.get("sampler", "shuffle") != _sampler_kind(cfg):
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


def _offload_cached_tower(model: Captioner, cfg: TrainConfig, launch: _Launch) -> bool:
    """Training from cached features, the tower only runs for validation: keep it in host RAM
    (DeepSpeed places the whole module itself, so there it stays). -> whether it moved."""
    offloaded = bool(cfg.cache_features) and launch.device.type == "cuda" and launch.stage is None
    if offloaded:
        model.vision.to("cpu")
    return offloaded


@dataclass
class _TrainData:
    """The training examples, their order, and the micro-batches of an epoch."""

    dataset: RecordDataset
    sampler: ResumableSampler | BucketBatchSampler
    collate: Collator
    image_key: str  # pixel_values, or features when read from the cache
    steps_per_epoch: int
    micro_per_epoch: int
    notes: dict
    sampler_kind: str
    cfg: TrainConfig
    num_workers: int
    rank: int
    pin: bool

    @classmethod
    def build(cls, model: Captioner, data_cfg: DataConfig, cfg: TrainConfig, launch: _Launch,
              progress: bool) -> "_TrainData":
        records, loader_fn, notes = build_source(data_cfg)
        if not records:
            raise GitcapError(f"no training examples in {data_cfg.source}")
        image_key = "pixel_values"
        if cfg.cache_features:
            features, image_index = build_feature_cache(
                model, records, loader_fn, data_cfg, cfg.cache_features, batch_size=cfg.batch_size,
                device=launch.device, precision=launch.precision, rank=launch.rank, world=launch.world,
                progress=progress)
            dataset = CachedFeatureDataset(records, image_index, features, model.tokenizer, model.config,
                                           data_cfg.max_target_tokens)
            image_key = "features"
        else:
            dataset = RecordDataset(records, loader_fn, model.image_transform(), model.tokenizer, model.config,
                                    data_cfg.max_target_tokens)
        sampler: ResumableSampler | BucketBatchSampler
        if cfg.bucket_by_length:
            lengths = token_lengths(records, model.tokenizer, model.config, data_cfg.max_target_tokens)
            sampler = BucketBatchSampler(lengths, cfg.batch_size, cfg.seed, launch.rank, launch.world)
        else:
            sampler = ResumableSampler(len(dataset), cfg.seed, launch.rank, launch.world)
        steps_per_epoch = ((len(dataset) // launch.world) // cfg.batch_size) // cfg.grad_accum
        if steps_per_epoch == 0:
            raise GitcapError(f"{len(dataset)} examples are fewer than one step's worth "
                              f"({cfg.batch_size} x {cfg.grad_accum} x {launch.world} processes)")
        # An epoch is whole steps: micro-batches that would not fill one are left out (their
        # gradients would otherwise leak into the next epoch's first step).
        micro_per_epoch = steps_per_epoch * cfg.grad_accum
        # Pinned batches copy to the GPU asynchronously (non_blocking), so the copy of the
        # next batch overlaps the kernels still running.
        return cls(dataset, sampler, Collator(model.tokenizer.pad_token_id, image_key), image_key, steps_per_epoch,
                   micro_per_epoch, notes, _sampler_kind(cfg), cfg, data_cfg.num_workers, launch.rank,
                   pin=launch.device.type == "cuda")

    def rest_of_epoch(self, epoch: int, micro_done: int):
        """The micro-batches of `epoch` after the first `micro_done`, from a new DataLoader."""
        self.sampler.set_position(epoch, micro_done * self.cfg.batch_size)
        generator = epoch_generator(self.cfg.seed, epoch, self.rank)  # never the global RNG: dropout's
        if isinstance(self.sampler, BucketBatchSampler):
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
                                collate_fn=self.collate, persistent_workers=False, pin_memory=self.pin,
                                generator=generator)
        else:
            loader = DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                                num_workers=self.num_workers, collate_fn=self.collate, drop_last=True,
                                persistent_workers=False, pin_memory=self.pin, generator=generator)
        return itertools.islice(loader, max(0, self.micro_per_epoch - micro_done))


def _resume(opt: "_Optimisation", state: dict, checkpoint: Path, rank: int) -> "_Position":
    """Optimizer, schedule, this rank's RNG streams and the position, as the checkpoint left them."""
    opt.load(state, checkpoint)
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    position = _Position.from_state(state)
    if is_main_process():
        print(f"resuming {checkpoint.parent} at step {position.step} (epoch {position.epoch})", file=sys.stderr)
    return position


@dataclass
class _Position:
    """Where the run is: what a checkpoint records so that a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    micro_done: int = 0  # micro-batches of this epoch already trained on
    best: float | None = None
    window: list[float] = field(default_factory=list)  # losses since the last logged line: its mean

    @classmethod
    def from_state(cls, state: dict) -> "_Position":
        return cls(int(state["step"]), int(state["epoch"]), int(state["micro_done"]), state.get("best"),
                   [float(x) for x in state.get("loss_window", [])])

    def next_epoch(self) -> None:
        self.epoch, self.micro_done = self.epoch + 1, 0


# ---- one step -------------------------------------------------------------------------------
@dataclass
class _Optimisation:
    """Model, optimizer, schedule and loss scaling, or the DeepSpeed engine that holds them;
    `forward_backward` per micro-batch, `step` at each `grad_accum` boundary."""

    model: Captioner
    train_module: torch.nn.Module  # the model, its DDP wrapper or the DeepSpeed engine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    engine: object | None
    cfg: TrainConfig
    launch: _Launch
    total_steps: int
    image_key: str
    group_losses: list[float] = field(default_factory=list)  # this step's micro-batch losses
    bad: bool = False  # a micro-batch of this step had a non-finite loss
    nonfinite_run: int = 0  # skipped steps in a row

    @classmethod
    def build(cls, model: Captioner, cfg: TrainConfig, launch: _Launch, total_steps: int, image_key: str,
              tower_offloaded: bool) -> "_Optimisation":
        device, stage = launch.device, launch.stage
        train_module: torch.nn.Module = model
        engine = None
        model.train()
        if cfg.compile:
            # In place (nn.Module.compile): parameter names, and so checkpoints, stay as they are.
            model.lm.compile()
        if stage is None:
            optimizer = _optimizer(model, cfg, device)
            if launch.world > 1:
                train_module = _ddp(model, device, tower_offloaded)
        else:
            optimizer = _optimizer(model, cfg, device, deepspeed_offload=offloads(cfg, launch.ds_override))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.schedule))
        scaler = torch.amp.GradScaler(device.type, enabled=launch.precision == "fp16" and stage is None)
        if stage is not None:
            # DeepSpeed does autocast (its torch_autocast section), loss scaling and clipping.
            engine = ds.initialize(model, optimizer, build_config(cfg, precision=launch.precision, world=launch.world,
                                                                   stage=stage, override=launch.ds_override))
            train_module = engine
        return cls(model, train_module, optimizer, scheduler, scaler, engine, cfg, launch, total_steps, image_key)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def load(self, state: dict, checkpoint: Path) -> None:
        if self.engine is None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        else:
            ds.load_engine_state(self.engine, checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        # the schedule of this run's length (--max-steps may have changed on resume) from this step on
        cfg = self.cfg
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * lr_factor(self.scheduler.last_epoch, cfg.warmup_steps, self.total_steps,
                                              cfg.schedule)

    def forward_backward(self, batch: dict, micro_done: int) -> int:
        """One micro-batch's forward and backward (gradients accumulate). -> samples used."""
        if batch["size"] == 0:
            return 0
        device, engine = self.launch.device, self.engine
        with autocast(self.launch.precision, device) if engine is None else contextlib.nullcontext():
            image = batch[self.image_key].to(device, non_blocking=True)  # pixels, or cached features
            live = self.image_key == "pixel_values"
            ids, mask, labels = (batch[k].to(device, non_blocking=True)
                                 for k in ("input_ids", "attention_mask", "labels"))
            loss, _ = self.train_module(image if live else None, ids, mask, labels, features=None if live else image)
        self.bad |= not bool(torch.isfinite(loss))
        if not self.bad and engine is not None:
            # DeepSpeed divides by grad_accum and reduces at the boundary
            engine.set_gradient_accumulation_boundary(micro_done % self.cfg.grad_accum == 0)
            engine.backward(loss)
            self.group_losses.append(float(loss.detach()))
        elif not self.bad:
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
            self.group_losses.append(float(loss.detach()))
        return batch["size"]

    def step(self) -> float | None:
        """The optimizer step: the step's loss (mean over micro-batches and ranks), or None
        when a rank's loss was not finite (the step is skipped; too many in a row stop)."""
        device, engine, optimizer, cfg = self.launch.device, self.engine, self.optimizer, self.cfg
        if all_reduce_mean(float(self.bad or not self.group_losses), device) > 0:
            (engine or optimizer).zero_grad()
            self.nonfinite_run += 1
            if self.nonfinite_run >= cfg.max_nonfinite:
                raise GitcapError(f"{self.nonfinite_run} steps in a row had a non-finite loss; "
                                  "lower --lr, use bf16 instead of fp16, or check the data")
            self.group_losses, self.bad = [], False
            return None
        self.nonfinite_run = 0
        if engine is not None:
            engine.step()  # clips (gradient_clipping), steps, zeroes the gradients
        else:
            if cfg.clip_grad:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(_trainable(self.model), cfg.clip_grad)
            self.scaler.step(optimizer)
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        step_loss = all_reduce_mean(sum(self.group_losses) / len(self.group_losses), device)
        self.group_losses, self.bad = [], False
        return step_loss


def _ddp(model: Captioner, device: torch.device, tower_offloaded: bool) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # DDP wants every parameter and buffer on one device; the frozen host-side tower needs no syncing
    if tower_offloaded:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [f"vision.{n}" for n, _ in [*model.vision.named_parameters(), *model.vision.named_buffers()]])
    # find_unused_parameters: a grid tower never runs its pooling head (ln_post, proj)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


# ---- checkpoint and validation ----------------------------------------------------------------
class _RunOutput:
    """The run directory: metrics.jsonl, the tracker, checkpoints and best/ (rank 0 writes).

    Opening it (under the run's lock) clears what a killed run left, records the run config
    and cuts metrics.jsonl back to the step the run starts from (0: a run killed before
    its first checkpoint and started again logs its steps once too).
    """

    def __init__(self, out: Path, model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig, launch: _Launch,
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

    def __enter__(self) -> "_RunOutput":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.reporter is not None:
            self.reporter.close()

    def log_step(self, position: _Position, lr: float, rate: float, skipped_images: int) -> None:
        """One metrics line: the mean loss since the last one (the window starts again)."""
        if self.metrics is not None:
            record = {"step": position.step, "epoch": position.epoch,
                      "loss": sum(position.window) / len(position.window), "lr": lr, "samples_per_s": rate,
                      "skipped_images": skipped_images}
            self.metrics.write(record)
            if self.reporter is not None:
                self.reporter.log(record, position.step)
            position.window.clear()

    def save(self, model: Captioner, opt: _Optimisation, position: _Position, best: float | None) -> Path:
        """`checkpoint-STEP/`: weights and resume state together, atomically; `latest` then names it."""
        name = f"checkpoint-{position.step}"
        state = {"scheduler": opt.scheduler.state_dict(), "rng": _gather_rng(self.launch.world),
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
                _prune(self.out, self.cfg.keep_last)
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


def _save_and_validate(output: _RunOutput, model: Captioner, opt: _Optimisation, position: _Position,
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


def _gather_rng(world: int) -> list[dict]:
    """Every rank's RNG state, so each continues its own stream on resume."""
    state = rng_state()
    if world == 1:
        return [state]
    import torch.distributed as dist

    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


class _Bar(ProgressBar):
    """Training progress: step, loss, lr, samples/s, time left."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__("train", total, unit="steps", enabled=enabled)

    def update(self, step: int, loss: float | None, lr: float, rate: float) -> None:
        info = f"loss {loss:.3f}  lr {lr:.2e}  {rate:.0f} samples/s" if loss is not None and math.isfinite(loss) else ""
        self.show(step, info)
