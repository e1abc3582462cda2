"""Before anything loads: every option checked, the device and the process group."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gitcli.config import DataConfig, ModelConfig, TrainConfig
from gitcli.data.sources import source_kind
from gitcli.dist import init_distributed, resolve_device, resolve_precision
from gitcli.errors import GitcapError
from gitcli.model.checkpoint import resolve_checkpoint
from gitcli.model.quant import check_quant_device
from gitcli.train import zero as ds
from gitcli.train.deepspeed_config import check_combination, zero_stage
from gitcli.train.features import check_cache_features
from gitcli.train.report import check_available


@dataclass
class Launch:
    """Where and how this process trains."""

    device: torch.device
    rank: int
    world: int
    precision: str
    stage: int | None  # DeepSpeed ZeRO stage, None for plain PyTorch
    ds_override: dict | None  # the --deepspeed-config file's keys


def check_and_launch(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig) -> Launch:
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
    source_kind(data_cfg)  # a missing or unrecognisable source, before the run directory exists
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise GitcapError(f"--output-dir {out} is a file; give a folder")
    if cfg.init_from:
        resolve_checkpoint(cfg.init_from)
    device = resolve_device(cfg.device)
    check_quant_device(model_cfg.quant, device)  # fp8 on a CPU, bitsandbytes missing: before the run exists
    rank, world = init_distributed(device.type)
    precision = resolve_precision(cfg.precision, device)
    if stage is not None:
        ds.import_deepspeed()
        ds.ensure_process_group(device)
    return Launch(device, rank, world, precision, stage, ds_override)
