"""One optimizer step: `grad_accum` micro-batches forward and backward, the step skipped
when a loss was not finite, clipping, the optimizer and schedule step. With `--zero` the
model and optimizer live in a DeepSpeed engine (`gitcli.train.zero`); only the backward,
step and resume lines differ."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gitcli.config import TrainConfig
from gitcli.dist import all_reduce_mean, autocast
from gitcli.errors import GitcapError
from gitcli.model.captioner import Captioner
from gitcli.train import zero as ds
from gitcli.train.deepspeed_config import build_config, offloads
from gitcli.train.launch import Launch
from gitcli.train.schedule import lr_factor


@dataclass
class Optimisation:
    """Model, optimizer, schedule and loss scaling, or the DeepSpeed engine that holds them;
    `forward_backward` per micro-batch, `step` at each `grad_accum` boundary."""

    model: Captioner
    train_module: torch.nn.Module  # the model, its DDP wrapper or the DeepSpeed engine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    engine: object | None
    cfg: TrainConfig
    launch: Launch
    total_steps: int
    image_key: str
    group_losses: list[float] = field(default_factory=list)  # this step's micro-batch losses
    bad: bool = False  # a micro-batch of this step had a non-finite loss
    nonfinite_run: int = 0  # skipped steps in a row

    @classmethod
    def build(cls, model: Captioner, cfg: TrainConfig, launch: Launch, total_steps: int, image_key: str,
              tower_offloaded: bool) -> "Optimisation":
        device, stage = launch.device, launch.stage
        train_module: torch.nn.Module = model
        engine = None
        model.train()
        if cfg.compile:
            # In place (nn.Module.compile): parameter names, and so checkpoints, stay as they are.
            model.lm.compile()
        if stage is None:
            optimizer = build_optimizer(model, cfg, device)
            if launch.world > 1:
                train_module = wrap_ddp(model, device, tower_offloaded)
        else:
            optimizer = build_optimizer(model, cfg, device, deepspeed_offload=offloads(cfg, launch.ds_override))
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
                torch.nn.utils.clip_grad_norm_(trainable(self.model), cfg.clip_grad)
            self.scaler.step(optimizer)
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        step_loss = all_reduce_mean(sum(self.group_losses) / len(self.group_losses), device)
        self.group_losses, self.bad = [], False
        return step_loss


def wrap_ddp(model: Captioner, device: torch.device, tower_offloaded: bool) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    from gitcli.model.quant import torchao_tensor_names

    # DDP broadcasts rank 0's parameters and buffers at the start. The frozen host-side tower
    # needs no syncing (and DDP wants one device), nor do torchao's quantised LM weights,
    # which its broadcast cannot view: every rank loads and quantises the same weights.
    ignored = [f"lm.{n}" for n in torchao_tensor_names(model.lm)]
    if tower_offloaded:
        ignored += [f"vision.{n}" for n, _ in [*model.vision.named_parameters(), *model.vision.named_buffers()]]
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    # find_unused_parameters: a grid tower never runs its pooling head (ln_post, proj)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
               deepspeed_offload: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; `deepspeed_offload` (not None) means the optimizer is handed to DeepSpeed."""
    decay, no_decay = [], []
    for p in trainable(model):
        (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # DeepSpeed refuses empty groups
    if deepspeed_offload is not None:
        return ds.build_optimizer(groups, cfg.lr, deepspeed_offload)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
