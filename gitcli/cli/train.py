"""`gitcap train`: train the mapping (and optionally tower / LoRA / LM)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gitcli.cli.common import (BatchSizeOpt, DeviceOpt, DtypeOpt, PrecisionOpt, PresetOpt, SeedOpt, given_on_command_line,
                               out_console, user_errors)
from gitcli.cli.model_options import (GridOpt, Int8Opt, LmOpt, LoraOpt, MappingOpt, PrefixLengthOpt, QuantOpt,
                                      TrainLmOpt, TrainVisionOpt, VisionOpt,
                                      VisionPretrainedOpt, model_config_from_options)


# Each option and the config field it sets: on --resume, an option given again is held to
# the run's saved train_config.json (gitcli.train.run_config).
OPTION_FIELDS = {
    "data": ("data", "source"), "synthetic_size": ("data", "synthetic_size"), "task": ("data", "task"),
    "questions_per_scene": ("data", "questions_per_scene"), "image_root": ("data", "image_root"),
    "captions": ("data", "captions"), "questions": ("data", "questions"), "annotations": ("data", "annotations"),
    "num_workers": ("data", "num_workers"),
    **{name: ("model", name) for name in ("preset", "vision", "vision_pretrained", "lm", "mapping", "prefix_length",
                                          "grid", "quant", "dtype", "train_vision", "train_lm")},
    "lora": ("model", "lora_rank"), "int8": ("model", "quant"),
    **{name: ("train", name) for name in (
        "epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup_steps", "schedule", "weight_decay",
        "clip_grad", "grad_checkpointing", "seed", "device", "precision", "save_every", "keep_last", "log_every",
        "val_data", "val_samples", "init_from", "zero", "offload", "deepspeed_config", "report_to",
        "cache_features", "bucket_by_length", "compile")},
}


@user_errors
def train(
    data: Annotated[Optional[str], typer.Option("--data", help="Required for a new run: synthetic (the built-in set); a folder/pattern of fetch shards; a CC TSV (+ --image-root); a GIT image TSV (+ --captions); VQA images (+ --questions --annotations). On --resume, the run's own.", show_default=False)] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Run directory.")] = Path("runs/gitcap"),
    preset: PresetOpt = None,
    vision: VisionOpt = "ViT-B-32",
    vision_pretrained: VisionPretrainedOpt = "openai",
    lm: LmOpt = "gpt2",
    mapping: MappingOpt = "mlp",
    prefix_length: PrefixLengthOpt = 10,
    grid: GridOpt = False,
    quant: QuantOpt = "none",
    int8: Int8Opt = False,
    dtype: DtypeOpt = "auto",
    precision: PrecisionOpt = None,
    train_vision: TrainVisionOpt = False,
    lora: LoraOpt = 0,
    train_lm: TrainLmOpt = False,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Start from a trained checkpoint.")] = None,
    image_root: Annotated[Optional[Path], typer.Option("--image-root", help="CC TSV: folder of %08d.jpg images.")] = None,
    captions: Annotated[Optional[Path], typer.Option("--captions", help="GIT caption TSV for a GIT image TSV given as --data.")] = None,
    questions: Annotated[Optional[Path], typer.Option("--questions", help="VQA questions JSON (--data: COCO image folder or GIT image TSV).")] = None,
    annotations: Annotated[Optional[Path], typer.Option("--annotations", help="VQA annotations JSON; the target is the most common human answer.")] = None,
    synthetic_size: Annotated[int, typer.Option("--synthetic-size", min=1, help="Scenes in the synthetic set.")] = 2000,
    task: Annotated[str, typer.Option("--task", help="synthetic data: captions, vqa or both.")] = "both",
    questions_per_scene: Annotated[int, typer.Option("--questions-per-scene", min=0, help="synthetic data: questions drawn per scene (0 = all).")] = 0,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="Validation source, of any kind --data takes (synthetic = a held-out synthetic set); best/ is chosen by its CIDEr or VQA accuracy.")] = None,
    val_captions: Annotated[Optional[Path], typer.Option("--val-captions", help="GIT caption TSV for a --val-data image TSV.")] = None,
    val_questions: Annotated[Optional[Path], typer.Option("--val-questions", help="VQA questions JSON for --val-data images.")] = None,
    val_annotations: Annotated[Optional[Path], typer.Option("--val-annotations", help="VQA annotations JSON for --val-data images.")] = None,
    val_image_root: Annotated[Optional[Path], typer.Option("--val-image-root", help="Image folder for a --val-data CC TSV.")] = None,
    val_samples: Annotated[int, typer.Option("--val-samples", min=1, help="Validation items scored at each save.")] = 200,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps.")] = None,
    batch_size: BatchSizeOpt = 32,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1)] = 1,
    lr: Annotated[float, typer.Option("--lr")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0)] = 0,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, linear or constant after warm-up.")] = "cosine",
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.0,
    clip_grad: Annotated[float, typer.Option("--clip-grad", min=0.0, help="Max gradient norm (0 = off).")] = 1.0,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing")] = False,
    save_every: Annotated[int, typer.Option("--save-every", min=1)] = 1000,
    keep_last: Annotated[int, typer.Option("--keep-last", min=1)] = 2,
    log_every: Annotated[int, typer.Option("--log-every", min=1)] = 10,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="DataLoader worker processes.")] = 2,
    cache_features: Annotated[Optional[Path], typer.Option("--cache-features", help="Frozen tower: compute its features of every training image once into this directory (resumable, reused by later runs) and train from them.")] = None,
    bucket_by_length: Annotated[bool, typer.Option("--bucket-by-length", help="Batch samples of similar text length together (less padding), in random order.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the language model's forward (for GPUs; the first steps are slower while it compiles, once per new text length).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its latest checkpoint, with the options it was started with (train_config.json). Options given again must agree, except --max-steps / --epochs (the schedule is recomputed for the new total), --save-every, --log-every, --keep-last, --num-workers, --device, --report-to and --val-data / --val-samples.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    zero: Annotated[Optional[int], typer.Option("--zero", min=0, max=3, help="DeepSpeed ZeRO stage 0-3 (default: no DeepSpeed; DDP under torchrun).")] = None,
    offload: Annotated[bool, typer.Option("--offload", help="ZeRO 2/3: optimizer state (ZeRO-3: also weights) in host RAM.")] = False,
    deepspeed_config: Annotated[Optional[Path], typer.Option("--deepspeed-config", help="JSON file whose keys override the DeepSpeed config built from the options.")] = None,
    report_to: Annotated[Optional[str], typer.Option("--report-to", help="Also log metrics to tensorboard or wandb (when installed).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print parameter counts and estimated peak memory per GPU, then exit (loads no weights; GPUs from WORLD_SIZE).")] = False,
) -> None:
    """Train a captioner on shards, a CC TSV or synthetic data; resumable.

    Examples: gitcap train --data synthetic --preset tiny --max-steps 300 --output-dir runs/tiny;
    gitcap train --data data/cc3m/train --vision ViT-L/14 --lm opt-2.7b --output-dir runs/cc3m

    Several GPUs: torchrun --nproc_per_node 8 -m gitcli train ... [--zero 2], or
    deepspeed --module gitcli train ... --zero 3. Check memory first: gitcap train ... --dry-run

    Faster with a frozen tower: gitcap train ... --cache-features data/cc3m/features --bucket-by-length

    Continue a stopped run: gitcap train --output-dir runs/cc3m --resume [--max-steps N]
    """
    from gitcli.config import DataConfig, TrainConfig
    from gitcli.train.loop import train as run_training
    from gitcli.train.validate import make_validator

    model_cfg = model_config_from_options(
        preset=preset, vision=vision, vision_pretrained=vision_pretrained, lm=lm, mapping=mapping,
        prefix_length=prefix_length, grid=grid, quant=quant, int8=int8, dtype=dtype, train_vision=train_vision, lora=lora,
        train_lm=train_lm)

    def opt(path):
        return str(path) if path is not None else None

    data_cfg = DataConfig(source=data, synthetic_size=synthetic_size, image_root=opt(image_root), captions=opt(captions),
                          questions=opt(questions), annotations=opt(annotations), task=task,
                          questions_per_scene=questions_per_scene, num_workers=num_workers)
    train_cfg = TrainConfig(
        output_dir=str(output_dir), epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        lr=lr, warmup_steps=warmup_steps, schedule=schedule, weight_decay=weight_decay,
        clip_grad=clip_grad or None, grad_checkpointing=grad_checkpointing, seed=seed, device=device,
        precision=precision, save_every=save_every, keep_last=keep_last, log_every=log_every, val_data=val_data,
        val_samples=val_samples, resume=resume, init_from=str(init_from) if init_from else None, zero=zero,
        offload=offload, deepspeed_config=str(deepspeed_config) if deepspeed_config else None, report_to=report_to,
        cache_features=opt(cache_features), bucket_by_length=bucket_by_length, compile=compile)
    if resume:
        model_cfg, data_cfg, train_cfg = _resumed_configs(output_dir, model_cfg, data_cfg, train_cfg)
    if dry_run:
        from gitcli.cli.dry_run import print_dry_run

        print_dry_run(model_cfg, data_cfg, train_cfg)
        return
    validator = None
    if train_cfg.val_data:
        val_cfg = DataConfig(source=train_cfg.val_data, image_root=opt(val_image_root), captions=opt(val_captions),
                             questions=opt(val_questions), annotations=opt(val_annotations), task=data_cfg.task)
        validator = make_validator(val_cfg, train_cfg.val_samples, data_cfg, synthetic_seed=train_cfg.val_synthetic_seed)
    result = run_training(model_cfg, data_cfg, train_cfg, validator=validator)
    if result.already_finished:
        out_console.print(f"{output_dir} already finished at step {result.steps} "
                      "(pass a larger --max-steps with --resume to train on)")
        return
    from rich.table import Table

    table = Table(title="training summary", show_header=False)
    table.add_row("steps", str(result.steps))
    table.add_row("final loss", f"{result.losses[-1]:.4f}" if result.losses else "-")
    table.add_row("samples/s", f"{result.samples_per_second:.1f}")
    table.add_row("skipped images", str(result.skipped_images))
    for what, count in result.data_notes.items():
        table.add_row(what, str(count))
    table.add_row("non-finite steps", str(result.nonfinite_steps))
    table.add_row("best score", f"{result.best_score:.4f}" if result.best_score is not None else "-")
    table.add_row("checkpoint", str(result.last_checkpoint or "-"))
    out_console.print(table)  # the result: stdout (progress and messages went to stderr)


def _resumed_configs(output_dir: Path, model_cfg, data_cfg, train_cfg):
    """The saved configs of the run being resumed, with the options given again applied
    (refused in one line where they disagree); the given configs when there is no run."""
    from gitcli.model.checkpoint import LATEST_FILE
    from gitcli.train.run_config import configs_for_resume

    if not (output_dir / LATEST_FILE).is_file():
        return model_cfg, data_cfg, train_cfg  # nothing to resume: a new run (the loop says so)
    sections = {"model": model_cfg, "data": data_cfg, "train": train_cfg}
    typed = set(given_on_command_line(*OPTION_FIELDS))
    given = {(section, field): getattr(sections[section], field) for name, (section, field) in OPTION_FIELDS.items()
             if name in typed}
    saved = configs_for_resume(output_dir, given)
    if saved is None:
        return model_cfg, data_cfg, train_cfg
    model_cfg, data_cfg, saved_train = saved
    saved_train.output_dir, saved_train.resume = train_cfg.output_dir, True
    return model_cfg, data_cfg, saved_train
