"""`gitcap train --dry-run`: the estimate as a table (stdout), nothing loaded or trained."""

from __future__ import annotations

from gitcli.cli.common import print_out
from gitcli.config import DataConfig, ModelConfig, TrainConfig

GIB = 1024**3


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 1024**2:.1f} MiB"


def print_dry_run(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig) -> None:
    import dataclasses
    import os

    from rich.console import Console
    from rich.table import Table

    from gitcli.train.deepspeed_config import check_combination, zero_stage
    from gitcli.train.memory import dry_run

    stage = zero_stage(train_cfg, check_combination(model_cfg, train_cfg))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = train_cfg.device == "cpu"
    if on_cpu:  # what a CPU run holds: fp32 weights (dtype auto) and fp32 compute, in host RAM
        model_cfg = dataclasses.replace(model_cfg, dtype="fp32" if model_cfg.dtype == "auto" else model_cfg.dtype)
        train_cfg = dataclasses.replace(train_cfg, precision=train_cfg.precision or "fp32")
    est = dry_run(model_cfg, train_cfg, text_tokens=data_cfg.max_target_tokens, world=world)
    setup = "no DeepSpeed" if stage is None else f"ZeRO-{stage}" + (" + offload" if train_cfg.offload else "")
    where = (f"{world} CPU process(es), host RAM" if on_cpu
             else f"{world} GPU(s) (sized for GPUs; WORLD_SIZE sets how many)")
    unit = "process" if on_cpu else "GPU"
    table = Table(title=f"dry run: {where}, {setup}, batch {train_cfg.batch_size}/{unit}, "
                        f"precision {train_cfg.precision or 'bf16'}", show_header=False)
    table.add_row("trainable parameters", f"{est.trainable:,}")
    table.add_row("frozen parameters", f"{est.frozen:,}")
    table.add_row("weights", _gib(est.weights))
    table.add_row("gradients", _gib(est.gradients))
    table.add_row("optimizer state", _gib(est.optimizer))
    table.add_row("activations", _gib(est.activations))
    table.add_row(f"peak per {unit} (estimate)", _gib(est.total))
    if est.host_offload:
        table.add_row("host RAM per process (offload)", _gib(est.host_offload))
    console = Console(highlight=False)
    console.print(table)
    slack = [] if on_cpu else ["not counted: CUDA context and allocator slack (often 0.5-1 GiB)"]
    for note in est.notes + slack:
        print_out(f"note: {note}")
