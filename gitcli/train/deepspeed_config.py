"""The DeepSpeed config of a run: built from gitcap's options, optionally overridden by a file.

Standard library only, so `gitcap train` can refuse an impossible combination (and
`--dry-run` can name the stage) before torch, DeepSpeed or any weights load.

What gitcap keeps for itself, and why the override file may not change it:
- the optimizer and the learning-rate schedule (`--lr`, `--warmup-steps`, `--schedule`):
  gitcap builds them so that resume and the plain PyTorch path behave the same;
- batch size, gradient accumulation and clipping: they come from `--batch-size`,
  `--grad-accum`, `--clip-grad`, and the data sampler is sized by them;
- DeepSpeed's `fp16` / `bf16` sections: they cast the whole model to half precision, which
  breaks an 8-bit LM and gitcap's fp32 trained weights; `--precision` maps to DeepSpeed's
  `torch_autocast` instead, which leaves every weight in the dtype gitcap chose.
Everything else (bucket sizes, `overlap_comm`, offload details, ...) the file may set.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from gitcli.config import TORCHAO_FORMATS, ModelConfig, TrainConfig, read_json
from gitcli.errors import GitcapError

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
_OWNED_SECTIONS = {
    "optimizer": "gitcap builds the optimizer from --lr and --weight-decay",
    "scheduler": "gitcap builds the schedule from --warmup-steps and --schedule",
    "fp16": "use --precision fp16 (gitcap keeps weights in their own dtypes)",
    "bf16": "use --precision bf16 (gitcap keeps weights in their own dtypes)",
}


def read_override(path: str | Path) -> dict[str, Any]:
    data = read_json(Path(path), what="DeepSpeed config")
    if not isinstance(data, dict):
        raise GitcapError(f"DeepSpeed config {path} is not a JSON object")
    for key, why in _OWNED_SECTIONS.items():
        if key in data:
            raise GitcapError(f"DeepSpeed config {path}: remove the {key!r} section; {why}")
    return data


def zero_stage(cfg: TrainConfig, override: dict[str, Any] | None = None) -> int | None:
    """The stage a run uses: --zero, else the override file's, else None (no DeepSpeed)."""
    if override is not None and "stage" in override.get("zero_optimization", {}):
        stage = override["zero_optimization"]["stage"]
        if cfg.zero is not None and cfg.zero != stage:
            raise GitcapError(f"--zero {cfg.zero} disagrees with the DeepSpeed config's zero_optimization.stage "
                              f"{stage}; give one of them")
        if stage not in (0, 1, 2, 3):
            raise GitcapError(f"the DeepSpeed config's zero_optimization.stage must be 0-3, not {stage!r}")
        return int(stage)
    if cfg.zero is None and override is not None:
        return 0
    return cfg.zero


def offloads(cfg: TrainConfig, override: dict[str, Any] | None = None) -> bool:
    zero = (override or {}).get("zero_optimization", {})
    return cfg.offload or "offload_optimizer" in zero or "offload_param" in zero


def check_combination(model_cfg: ModelConfig, cfg: TrainConfig) -> dict[str, Any] | None:
    """Refuse what DeepSpeed cannot do with these options; returns the override file's dict."""
    cfg.validate()
    override = read_override(cfg.deepspeed_config) if cfg.deepspeed_config else None
    stage = zero_stage(cfg, override)
    if stage is None:
        return None
    if model_cfg.quant in TORCHAO_FORMATS:
        raise GitcapError(f"DeepSpeed swaps every weight for its own copy as it starts, which torchao's quantised "
                          f"weights cannot be; train --quant {model_cfg.quant} without --zero (one process, or "
                          "torchrun for several GPUs), or use --quant bnb-int8 with --zero")
    if model_cfg.quantised and stage == 3:
        raise GitcapError(f"ZeRO-3 partitions every weight, which a quantised LM cannot be; "
                          f"use --zero 2 with --quant {model_cfg.quant}, or drop --quant")
    if offloads(cfg, override) and stage < 2:
        raise GitcapError("offloading the optimizer needs ZeRO stage 2 or 3")
    if cfg.precision == "fp16" and model_cfg.quantised:
        raise GitcapError("--precision fp16 with DeepSpeed and a quantised LM is not supported; use bf16")
    for key, value in (("train_micro_batch_size_per_gpu", cfg.batch_size),
                       ("gradient_accumulation_steps", cfg.grad_accum)):
        if override is not None and key in override and override[key] != value:
            raise GitcapError(f"the DeepSpeed config sets {key}={override[key]} but the options say {value}; "
                              "set it with --batch-size / --grad-accum only")
    return override


def build_config(cfg: TrainConfig, *, precision: str, world: int, stage: int,
                 override: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict handed to `deepspeed.initialize`: options first, then the file on top."""
    zero: dict[str, Any] = {"stage": stage}
    if cfg.offload:
        # Optimizer state (fp32 moments, master weights) to CPU RAM; with ZeRO-3 the
        # parameters too. Pinned memory makes the host<->device copies asynchronous.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "gradient_clipping": float(cfg.clip_grad or 0.0),
        "zero_optimization": zero,
        # gitcap hands DeepSpeed a torch AdamW (or DeepSpeedCPUAdam with offload)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # gitcap logs progress itself
        "wall_clock_breakdown": False,
    }
    if precision in AUTOCAST_DTYPES:
        config["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[precision]}
    if override:
        config = _merge(config, override)
    return config


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merge key by key; anything else in `top` replaces `base`."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
