"""Devices, precision and process groups, shared by train and infer."""

from __future__ import annotations

import contextlib
import os

import torch

from gitcli.errors import GitcapError


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` -> this rank's GPU if there is one, else CPU; `cuda:N` checked to exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise GitcapError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GitcapError(f"--device {spec}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GitcapError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise GitcapError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """Default compute precision: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU."""
    if precision is None:
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise GitcapError(f"unknown precision {precision!r}; use bf16, fp16 or fp32")
    if precision == "fp16" and device.type == "cpu":
        raise GitcapError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return precision


def autocast(precision: str, device: torch.device):
    """Mixed-precision context for the forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the process group torchrun / the deepspeed launcher set up. -> (rank, world)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
