"""The training loop: one process, one per GPU under torchrun (DDP), or DeepSpeed ZeRO.

Shape of a run: build or load the captioner, build the data, then for each optimizer step
run `grad_accum` micro-batches, skip the step if the loss was not finite, clip, step,
log, and every `save_every` steps write `checkpoint-STEP/` (weights + resume state)
atomically, point `latest` at it, validate, and keep the best. With `--zero` the
model and optimizer live in a DeepSpeed engine (`gitcli.train.zero`); only the backward,
step, save and resume lines differ.
"""

from __future__ import annotations

import contextlib
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
    cfg.validate()
    model_cfg.validate_for_training()
    check_cache_features(model_cfg, cfg)
    ds_override = check_combination(model_cfg, cfg)  # before anything loads
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
    # One writer per run directory: rank 0 holds its lock for the whole run (the ranks of
    # one job share the folder by design); a second `gitcap train` into it is refused.
    out = Path(cfg.output_dir)
    lock = (OutputLock(lock_for_dir(out), what=f"run directory {out}",
                       hint="wait for that run to finish or choose another --output-dir")
            if rank == 0 else contextlib.nullcontext())
    with lock:
        return _train_holding_lock(model_cfg, data_cfg, cfg, validator, progress, stop_after,
                                   ds_override, stage, device, rank, world, precision)


def _train_holding_lock(model_cfg, data_cfg, cfg, validator, progress, stop_after, ds_override, stage, device,
                        rank, world, precision) -> TrainResult:
    out = Path(cfg.output_dir)
    resume_from = None
    if cfg.resume:
        if (out / LATEST_FILE).is_file():
            resume_from = resolve_checkpoint(out)
        elif is_main_process():
            print(f"nothing to resume in {out}: starting a new run", file=sys.stderr)
    elif (out / LATEST_FILE).is_file():
        raise GitcapError(f"{out} already holds a run; pass --resume to continue it or choose another --output-dir")
    state = load_state(resume_from) if resume_from is not None else None
    if state is not None:
        check_resume_agrees(out, data_cfg, cfg)  # the saved run config is the truth
    sampler_kind = "bucket-by-length" if cfg.bucket_by_length else "shuffle"
    if state is not None and state.get("sampler", "shuffle") != sampler_kind:
        # another order would replay or skip data; said before anything loads or is cached
        with_or_not = "with" if state.get("sampler") == "bucket-by-length" else "without"
        raise GitcapError(f"{out} was trained {with_or_not} --bucket-by-length; resume it the same way")

    torch.manual_seed(cfg.seed)
    model = _build_model(model_cfg, cfg, device, resume_from)
    model_cfg = model.config
    check_cache_features(model_cfg, cfg)  # again: a resumed run trains what its checkpoint says
    if cfg.grad_checkpointing:
        if model_cfg.lm_trained:
            model.lm.gradient_checkpointing_enable()
        if model_cfg.train_vision and hasattr(model.vision.visual, "set_grad_checkpointing"):
            model.vision.visual.set_grad_checkpointing(True)

    records, loader_fn, notes = build_source(data_cfg)
    if not records:
        raise GitcapError(f"no training examples in {data_cfg.source}")
    image_key = "pixel_values"
    if cfg.cache_features:
        features, image_index = build_feature_cache(
            model, records, loader_fn, data_cfg, cfg.cache_features, batch_size=cfg.batch_size, device=device,
            precision=precision, rank=rank, world=world, progress=progress)
        dataset = CachedFeatureDataset(records, image_index, features, model.tokenizer, model_cfg,
                                       data_cfg.max_target_tokens)
        image_key = "features"
    else:
        dataset = RecordDataset(records, loader_fn, model.image_transform(), model.tokenizer, model_cfg,
                                data_cfg.max_target_tokens)
    sampler: ResumableSampler | BucketBatchSampler
    if cfg.bucket_by_length:
        lengths = token_lengths(records, model.tokenizer, model_cfg, data_cfg.max_target_tokens)
        sampler = BucketBatchSampler(lengths, cfg.batch_size, cfg.seed, rank, world)
    else:
        sampler = ResumableSampler(len(dataset), cfg.seed, rank, world)
    # Training from cached features, the tower only runs for validation: keep it in host RAM
    # (DeepSpeed places the whole module itself, so there it stays).
    tower_offloaded = bool(cfg.cache_features) and device.type == "cuda" and stage is None
    if tower_offloaded:
        model.vision.to("cpu")
    steps_per_epoch = ((len(dataset) // world) // cfg.batch_size) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise GitcapError(f"{len(dataset)} examples are fewer than one step's worth "
                          f"({cfg.batch_size} x {cfg.grad_accum} x {world} processes)")
    # An epoch is whole steps: micro-batches that would not fill one are left out (their
    # gradients would otherwise leak into the next epoch's first step).
    micro_per_epoch = steps_per_epoch * cfg.grad_accum
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    if state is not None and int(state["step"]) >= total_steps:
        return TrainResult(out, int(state["step"]), resume_from, best_score=state.get("best"), data_notes=notes,
                           already_finished=True)

    train_module: torch.nn.Module = model
    engine = None
    model.train()
    if cfg.compile:
        # In place (nn.Module.compile): parameter names, and so checkpoints, stay as they are.
        model.lm.compile()
    if stage is None:
        optimizer = _optimizer(model, cfg, device)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: a grid tower never runs its pooling head (ln_post, proj)
            # DDP wants every parameter and buffer on one device; the frozen host-side tower needs no syncing
            if tower_offloaded:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, [f"vision.{n}" for n, _ in [*model.vision.named_parameters(), *model.vision.named_buffers()]])
            train_module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                   find_unused_parameters=True)
    else:
        optimizer = _optimizer(model, cfg, device, deepspeed_offload=offloads(cfg, ds_override))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and stage is None)
    if stage is not None:
        # DeepSpeed does autocast (its torch_autocast section), loss scaling and clipping.
        engine = ds.initialize(model, optimizer, build_config(cfg, precision=precision, world=world, stage=stage,
                                                               override=ds_override))
        train_module = engine

    step, epoch, micro_done, best, nonfinite_run = 0, 0, 0, None, 0
    window: list[float] = []  # losses since the last logged line: the next line's mean
    if state is not None:
        if engine is None:
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        else:
            ds.load_engine_state(engine, resume_from)
        scheduler.load_state_dict(state["scheduler"])
        # the schedule of this run's length (--max-steps may have changed on resume) from this step on
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * lr_factor(scheduler.last_epoch, cfg.warmup_steps, total_steps, cfg.schedule)
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        step, epoch, micro_done = int(state["step"]), int(state["epoch"]), int(state["micro_done"])
        best = state.get("best")
        window = [float(x) for x in state.get("loss_window", [])]
        if is_main_process():
            print(f"resuming {out} at step {step} (epoch {epoch})", file=sys.stderr)

    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out)  # what a killed checkpoint write left (a whole model's worth each); we hold the lock
        write_run_config(out, model_cfg, data_cfg, cfg, world)
    result = TrainResult(out, step, None, best_score=best, data_notes=notes)
    barrier()  # no rank writes before rank 0 has cleared the folder
    metrics = MetricsLog(out, step if state is not None else None) if is_main_process() else None
    reporter = (Reporter(cfg.report_to, out, {"model": to_dict(model_cfg), "train": to_dict(cfg)})
                if cfg.report_to and is_main_process() else None)

    def save(tag_step: int) -> Path:
        name = f"checkpoint-{tag_step}"
        rngs = _gather_rng(world)
        state = {"scheduler": scheduler.state_dict(), "rng": rngs, "step": tag_step, "epoch": epoch,
                 "micro_done": micro_done, "best": result.best_score, "sampler": sampler_kind,
                 "loss_window": list(window)}
        staging = out / f".{name}{TMP_MARK}deepspeed"
        if engine is None:
            if is_main_process():
                state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
        else:  # every rank writes its optimizer partition, then rank 0 moves them in
            if is_main_process():
                shutil.rmtree(staging, ignore_errors=True)
            barrier()
            ds.save_engine_state(engine, staging)
            barrier()

        def also_write(tmp: Path) -> None:
            save_state(tmp, state)
            if engine is not None:
                ds.move_engine_state(staging, tmp)

        with ds.gathered(model, stage or 0, saved_parameters(model)):
            if is_main_process():
                metrics.sync()  # every line up to this step is on disk before `latest` names it
                save_checkpoint(model, out / name, extra={"step": tag_step}, also_write=also_write)
                write_latest(out, name)
                _prune(out, cfg.keep_last)
        barrier()
        return out / name

    def validate_and_keep_best(ckpt: Path) -> None:
        if validator is None:
            return
        model.eval()
        with _tower_on(model, device) if tower_offloaded else contextlib.nullcontext():
            report = validator(model, step)
        model.train()
        if is_main_process():
            metrics.write({"step": step, "validation": report})
            if reporter is not None:
                reporter.log({f"val/{k}": v for k, v in report.items()}, step)
            score = report.get("score")
            if score is not None and (result.best_score is None or score > result.best_score):
                result.best_score = score
                copy_dir_atomic(ckpt, out / "best")

    bar = _Bar(total_steps, enabled=progress and is_main_process())
    start, samples_seen = time.perf_counter(), 0
    try:
        with bar:
            bar.update(step, None, scheduler.get_last_lr()[0], 0.0)
            while step < total_steps and (stop_after is None or len(result.losses) < stop_after):
                sampler.set_position(epoch, micro_done * cfg.batch_size)
                collate = Collator(model.tokenizer.pad_token_id, image_key)
                # Pinned batches copy to the GPU asynchronously (non_blocking below), so the
                # copy of the next batch overlaps the kernels still running.
                pin = device.type == "cuda"
                generator = epoch_generator(cfg.seed, epoch, rank)  # never the global RNG: dropout's
                if isinstance(sampler, BucketBatchSampler):
                    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=data_cfg.num_workers,
                                        collate_fn=collate, persistent_workers=False, pin_memory=pin,
                                        generator=generator)
                else:
                    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                        num_workers=data_cfg.num_workers, collate_fn=collate,
                                        drop_last=True, persistent_workers=False, pin_memory=pin,
                                        generator=generator)
                group_losses, bad, done = [], False, False
                for batch in loader:
                    if micro_done >= micro_per_epoch:  # only the left-over micro-batches of a short last step
                        break
                    micro_done += 1
                    result.skipped_images += batch["skipped"]
                    if batch["size"] > 0:
                        with autocast(precision, device) if engine is None else contextlib.nullcontext():
                            image = batch[image_key].to(device, non_blocking=True)  # pixels, or cached features
                            live = image_key == "pixel_values"
                            ids, mask, labels = (batch[k].to(device, non_blocking=True)
                                                 for k in ("input_ids", "attention_mask", "labels"))
                            loss, _ = train_module(image if live else None, ids, mask, labels,
                                                   features=None if live else image)
                        bad |= not bool(torch.isfinite(loss))
                        if not bad and engine is not None:
                            # DeepSpeed divides by grad_accum and reduces at the boundary
                            engine.set_gradient_accumulation_boundary(micro_done % cfg.grad_accum == 0)
                            engine.backward(loss)
                            group_losses.append(float(loss.detach()))
                        elif not bad:
                            scaler.scale(loss / cfg.grad_accum).backward()
                            group_losses.append(float(loss.detach()))
                        samples_seen += batch["size"]
                    if micro_done % cfg.grad_accum != 0:
                        continue
                    # ---- one optimizer step ----
                    if all_reduce_mean(float(bad or not group_losses), device) > 0:
                        (engine or optimizer).zero_grad()
                        result.nonfinite_steps += 1
                        nonfinite_run += 1
                        if nonfinite_run >= cfg.max_nonfinite:
                            raise GitcapError(f"{nonfinite_run} steps in a row had a non-finite loss; "
                                              "lower --lr, use bf16 instead of fp16, or check the data")
                        group_losses, bad = [], False
                        continue
                    nonfinite_run = 0
                    if engine is not None:
                        engine.step()  # clips (gradient_clipping), steps, zeroes the gradients
                    else:
                        if cfg.clip_grad:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(_trainable(model), cfg.clip_grad)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    step_loss = all_reduce_mean(sum(group_losses) / len(group_losses), device)
                    result.losses.append(step_loss)
                    window.append(step_loss)
                    group_losses, bad = [], False
                    elapsed = time.perf_counter() - start
                    rate = samples_seen * world / max(elapsed, 1e-9)
                    bar.update(step, step_loss, scheduler.get_last_lr()[0], rate)
                    if metrics is not None and (step % cfg.log_every == 0 or step == total_steps):
                        record = {"step": step, "epoch": epoch, "loss": sum(window) / len(window),
                                  "lr": scheduler.get_last_lr()[0], "samples_per_s": rate,
                                  "skipped_images": result.skipped_images}
                        metrics.write(record)
                        if reporter is not None:
                            reporter.log(record, step)
                        window = []
                    done = step >= total_steps or (stop_after is not None and len(result.losses) >= stop_after)
                    epoch_ended = micro_done >= micro_per_epoch
                    if epoch_ended:  # the one place the epoch moves on: a checkpoint saved now resumes there
                        epoch, micro_done = epoch + 1, 0
                    if step % cfg.save_every == 0 or step == total_steps:
                        result.last_checkpoint = save(step)
                        validate_and_keep_best(result.last_checkpoint)
                    if done or epoch_ended:
                        break
                if micro_done:  # the loader ran dry before the epoch's last step (never, with whole steps)
                    epoch, micro_done = epoch + 1, 0
                if done:
                    break
    finally:
        if metrics is not None:
            metrics.close()
        if reporter is not None:
            reporter.close()
    result.steps = step
    result.seconds = time.perf_counter() - start
    result.samples_per_second = samples_seen * world / max(result.seconds, 1e-9)
    return result


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
