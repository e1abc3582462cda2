"""The DeepSpeed side of a run: process group, engine, gathered weights, resume state.

The loop stays the same loop; with `--zero` it hands the model and its optimizer to a
DeepSpeed engine and calls `engine.backward` / `engine.step`. Checkpoints keep gitcap's
layout: the weights go through `save_checkpoint` from rank 0 (under ZeRO-3 after gathering
the partitioned parameters), and DeepSpeed's own optimizer partitions are written with
`engine.save_checkpoint` into the checkpoint's `train_state/deepspeed/`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gitcli.errors import GitcapError

DS_DIR = "deepspeed"  # under the checkpoint's train_state/
DS_TAG = "state"


@contextlib.contextmanager
def torch_linear_restored():
    """Give the process torch's own `torch.nn.functional.linear` back when a run ends.

    DeepSpeed's ZeRO-3 swaps it for its memory-efficient version for the whole process
    and leaves it there (its own log: "This will persist unless manually reset"). Whatever
    the process does next, such as captioning or loading a model with torchao's int8
    weights (which that version cannot transpose), must run torch's.
    """
    original = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise GitcapError("--zero / --deepspeed-config need DeepSpeed (pip install deepspeed)") from None
    return deepspeed


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process; make a private one if none.

    A one-process group on an in-memory store needs no port and no MPI, which DeepSpeed
    would otherwise look for. It is kept for the life of the process: DeepSpeed caches the
    groups it derives from it, and a second run in the same process must find them valid.
    """
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's sanity check asks for it
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def build_optimizer(param_groups: list[dict], lr: float, offload: bool) -> torch.optim.Optimizer:
    """AdamW; with offload DeepSpeed's vectorised CPU Adam, since the step then runs on the host."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=lr, adamw_mode=True)
    return torch.optim.AdamW(param_groups, lr=lr)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """-> engine. The schedule stays gitcap's LambdaLR on `optimizer` (DeepSpeed's wrapper
    shares its param groups), so resume and the plain path step it the same way."""
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    engine.checkpoint_engine = _weights_only_engine(engine.checkpoint_engine)
    return engine


def gathered(model: torch.nn.Module, stage: int, parameters: list[torch.nn.Parameter]):
    """Under ZeRO-3 each rank holds a slice of every weight; gather the full ones to save."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)


def save_engine_state(engine, staging: Path) -> None:
    """Every rank writes its optimizer partition (collective call). Frozen weights are left
    out: gitcap's own checkpoint files hold what must be saved."""
    engine.save_checkpoint(str(staging), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)


def move_engine_state(staging: Path, checkpoint_tmp: Path) -> None:
    target = checkpoint_tmp / "train_state" / DS_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(target))


def load_engine_state(engine, checkpoint: Path) -> None:
    where = checkpoint / "train_state" / DS_DIR
    if not (where / DS_TAG).is_dir():
        raise GitcapError(f"{checkpoint} has no DeepSpeed resume state; resume it without --zero, "
                          "or use --init-from to start a DeepSpeed run from it")
    path, _ = engine.load_checkpoint(str(where), tag=DS_TAG, load_module_strict=False,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise GitcapError(f"DeepSpeed could not read the resume state in {where} "
                          "(was it written with another --zero stage or number of processes?)")


def _weights_only_engine(base):
    """DeepSpeed's checkpoint engine with `torch.load(weights_only=True)`.

    DeepSpeed loads its files with full unpickling; the state is the run's own, but gitcap
    reads nothing with arbitrary pickle. Its files hold tensors, containers and a few plain
    DeepSpeed records, which are allowed by name below.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(base) is not TorchCheckpointEngine:  # e.g. a user-chosen async engine: leave it
        return base

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except Exception as exc:
                    if "Weights only load failed" not in str(exc):
                        raise
                    raise GitcapError(f"{path} holds objects gitcap does not unpickle; "
                                      "it was not written by this gitcap/DeepSpeed") from None

    base.__class__ = WeightsOnlyCheckpointEngine  # keep its configured attributes
    return base


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
