"""`gitcap bench train|generate`: throughput, FLOPs utilisation and peak memory, random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gitcli.cli.common import (BatchSizeOpt, BeamsOpt, CacheOpt, DecodeCompileOpt, DeviceOpt, DtypeOpt, MaxNewTokensOpt,
                               PrecisionOpt, PresetOpt, SeedOpt, console, user_errors)
from gitcli.cli.model_options import (GridOpt, Int8Opt, LoraOpt, MappingOpt, PrefixLengthOpt, QuantOpt, TrainLmOpt,
                                      TrainVisionOpt, VisionOpt)

app = typer.Typer(
    name="bench",
    help="Measure training and decoding speed (samples/s, tokens/s, MFU, peak memory) of real architectures "
         "with random weights; nothing is downloaded.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

BenchLmOpt = Annotated[str, typer.Option(
    "--lm", help="LM architecture: gpt2, gpt2-medium, gpt2-large, gpt2-xl, opt-125m, opt-1.3b, opt-2.7b, opt-6.7b, "
                 "llama-7b, or a directory with a config.json (random weights).")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="Timed iterations; the median is reported.")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=0, help="Untimed iterations first (allocator, autotuning, compile).")]
LmLayersOpt = Annotated[Optional[int], typer.Option("--lm-layers", min=1, help="Shrink the named LM to this many layers (sizing, quick checks).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the LM.")]
PeakOpt = Annotated[Optional[float], typer.Option("--peak-tflops", min=0.0, help="The device's peak TFLOP/s for MFU when gitcap's table (H100, H200, A100 bf16) does not know it.")]
ProfileOpt = Annotated[bool, typer.Option("--profile", help="After timing, profile two more iterations and show the most expensive operators (GPU time on GPUs).")]
JsonFileOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write every number, the options, versions, device and date to this JSON file.")]


def _bench_config(*, preset, vision, lm, mapping, prefix_length, grid, quant, int8, dtype, train_vision, lora,
                  train_lm, **workload):
    from gitcli.bench.workload import BenchConfig
    from gitcli.cli.model_options import model_config_from_options

    model = model_config_from_options(preset=preset, vision=vision, vision_pretrained=None, lm=lm, mapping=mapping,
                                      prefix_length=prefix_length, grid=grid, quant=quant, int8=int8,
                                      dtype=dtype, train_vision=train_vision, lora=lora, train_lm=train_lm)
    return BenchConfig(model=model, **workload)


def _train_estimator(batch_size: int, caption_tokens: int):
    """`gitcap train --dry-run`'s estimate for the built model, shown beside the measured peak."""
    from gitcli.config import TrainConfig
    from gitcli.train.memory import estimate

    def run(captioner, precision: str, cached_features: bool) -> int:
        return estimate(captioner, TrainConfig(batch_size=batch_size), world=1, stage=None, offload=False,
                        precision=precision, text_tokens=caption_tokens, cached_features=cached_features).total

    return run


@app.command("train")
@user_errors
def train(
    preset: PresetOpt = None,
    vision: VisionOpt = "ViT-B-32",
    lm: BenchLmOpt = "gpt2",
    mapping: MappingOpt = "mlp",
    prefix_length: PrefixLengthOpt = 10,
    grid: GridOpt = False,
    train_vision: TrainVisionOpt = False,
    lora: LoraOpt = 0,
    train_lm: TrainLmOpt = False,
    quant: QuantOpt = "none",
    int8: Int8Opt = False,
    dtype: DtypeOpt = "auto",
    precision: PrecisionOpt = None,
    batch_size: BatchSizeOpt = 32,
    caption_tokens: Annotated[int, typer.Option("--caption-tokens", min=1, help="Caption length in tokens.")] = 20,
    cached_features: Annotated[bool, typer.Option("--cached-features", help="Train from precomputed fp16 tower features, as train --cache-features does: no tower forward, tower weights off the GPU.")] = False,
    steps: StepsOpt = 10,
    warmup: WarmupOpt = 3,
    lm_layers: LmLayersOpt = None,
    compile: CompileOpt = False,
    peak_tflops: PeakOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    profile: ProfileOpt = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Training steps per second of the model these options build (forward, backward, AdamW).

    Reports samples/s, caption tokens/s (= samples/s x --caption-tokens), achieved TFLOP/s,
    MFU against the GPU's bf16 peak ("-" on CPUs and unknown GPUs), peak memory
    (torch.cuda.max_memory_allocated; on a CPU the growth of peak RSS) beside the
    `train --dry-run` estimate. FLOPs per sample: 6·N·tokens for trained parts,
    4·N·tokens for frozen parts gradients flow through (the LM), 2·N·tokens for a
    frozen tower; the tower and mapping are counted by torch's FlopCounterMode.

    Examples:

        gitcap bench train --vision ViT-L-14 --lm opt-2.7b --prefix-length 5 --train-vision --batch-size 32

        gitcap bench train --vision ViT-L-14 --lm opt-2.7b --prefix-length 5 --cached-features --batch-size 32

        gitcap bench train --preset tiny --device cpu --batch-size 4 --steps 3 --json tiny.json
    """
    from gitcli.bench.train_bench import run_train_bench

    cfg = _bench_config(preset=preset, vision=vision, lm=lm, mapping=mapping, prefix_length=prefix_length, grid=grid,
                        quant=quant, int8=int8, dtype=dtype, train_vision=train_vision, lora=lora, train_lm=train_lm,
                        device=device, precision=precision, batch_size=batch_size, steps=steps, warmup=warmup,
                        caption_tokens=caption_tokens, lm_layers=lm_layers, compile=compile,
                        peak_tflops=peak_tflops, seed=seed, cached_features=cached_features, profile=profile)
    with console.status("building the model and timing training steps"):
        result = run_train_bench(cfg, estimate_memory=_train_estimator(batch_size, caption_tokens))
    _report("bench train", cfg, result, json_file)


@app.command("generate")
@user_errors
def generate(
    preset: PresetOpt = None,
    vision: VisionOpt = "ViT-B-32",
    lm: BenchLmOpt = "gpt2",
    mapping: MappingOpt = "mlp",
    prefix_length: PrefixLengthOpt = 10,
    grid: GridOpt = False,
    quant: QuantOpt = "none",
    int8: Int8Opt = False,
    dtype: DtypeOpt = "auto",
    precision: PrecisionOpt = None,
    batch_size: BatchSizeOpt = 32,
    beams: BeamsOpt = 3,
    max_new_tokens: MaxNewTokensOpt = 20,
    cache: CacheOpt = "dynamic",
    compile: DecodeCompileOpt = False,
    decoder: Annotated[str, typer.Option(
        "--decoder", help="gitcap, or transformers: time generate() on the same model and inputs "
                          "(the reference, in the same run).")] = "gitcap",
    steps: StepsOpt = 5,
    warmup: WarmupOpt = 2,
    lm_layers: LmLayersOpt = None,
    peak_tflops: PeakOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    profile: ProfileOpt = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Images per second decoded by gitcap's batched greedy / beam search with a KV cache.

    Every image gets exactly --max-new-tokens tokens (end-of-sequence does not stop a
    row), so the workload is fixed. Reports images/s, new tokens/s (= images/s x
    --max-new-tokens), TFLOP/s, MFU and peak memory. FLOPs per image: the tower's and
    mapping's forward + 2·N·P for the prefix (once per image) + 2·N per new token and beam.

    Examples:

        gitcap bench generate --vision ViT-L-14 --lm opt-2.7b --prefix-length 5 --beams 3 --batch-size 256

        gitcap bench generate --vision ViT-L-14 --lm opt-2.7b --prefix-length 5 --cache static --compile --batch-size 256

        gitcap bench generate --preset tiny --device cpu --batch-size 4 --beams 1 --json tiny.json

    --cache static --compile times the preallocated cache with the one-token step compiled
    (a CUDA graph on GPUs); the compile happens in the --warmup iterations. --decoder
    transformers times transformers' generate() on the same workload, the reference.
    """
    from gitcli.bench.generate_bench import run_generate_bench

    cfg = _bench_config(preset=preset, vision=vision, lm=lm, mapping=mapping, prefix_length=prefix_length, grid=grid,
                        quant=quant, int8=int8, dtype=dtype, train_vision=False, lora=0, train_lm=False, device=device,
                        precision=precision, batch_size=batch_size, steps=steps, warmup=warmup, beams=beams,
                        max_new_tokens=max_new_tokens, lm_layers=lm_layers, compile=compile, cache=cache,
                        decoder=decoder, peak_tflops=peak_tflops, seed=seed, profile=profile)
    with console.status("building the model and timing decoding"):
        result = run_generate_bench(cfg)
    _report("bench generate", cfg, result, json_file)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 // 10 else f"{n / 1024**2:.1f} MiB"


def _report(command: str, cfg, result, json_file: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from gitcli.bench.result import report
    from gitcli.config import write_json

    model = cfg.model
    lm = model.lm + (f" ({cfg.lm_layers} layers)" if cfg.lm_layers else "")
    what = f"{model.vision} + {lm}" if model.preset is None else f"{model.preset} preset"
    workload = (f"{cfg.caption_tokens} caption tokens" if result.kind == "train"
                else f"{cfg.max_new_tokens} new tokens, beams {cfg.beams}, "
                     + ("transformers generate()" if cfg.decoder == "transformers" else
                        f"{cfg.cache} cache" + (", compiled step" if cfg.compile else "")))
    table = Table(title=f"{command}: {what}, batch {result.batch_size}, {workload}", show_header=False)
    unit = result.unit
    table.add_row(f"{unit}/s", f"{result.items_per_s:,.2f}")
    table.add_row("tokens/s", f"{result.tokens_per_s:,.1f}")
    table.add_row("median seconds per batch", f"{result.median_batch_seconds:.4f} (of {len(result.batch_seconds)})")
    table.add_row(f"model TFLOPs per {unit[:-1]}", f"{result.flops_per_item / 1e12:.4f}")
    table.add_row("achieved TFLOP/s", f"{result.achieved_tflops:.2f}")
    table.add_row("MFU", f"{result.mfu:.1%} of {result.peak_tflops:g} TFLOP/s" if result.mfu is not None else "-")
    table.add_row("peak memory", _size(result.peak_memory_bytes))
    if result.kind == "train":
        table.add_row("peak memory, --dry-run estimate", _size(result.memory_estimate_bytes))
        table.add_row("trainable / frozen parameters", f"{result.trainable_parameters:,} / {result.frozen_parameters:,}")
    else:
        table.add_row("peak memory, estimate (weights, KV cache)", _size(result.memory_estimate_bytes))
        table.add_row("parameters", f"{result.frozen_parameters:,}")
    table.add_row("prefix tokens", str(result.prefix_length))
    table.add_row("device, precision", f"{result.device}, {result.precision}")
    out = Console(highlight=False)  # results to stdout, messages to stderr
    out.print(table)
    if result.profile:
        on_gpu = result.device.startswith("cuda")
        prof = result.profile
        where = "the GPU" if on_gpu else "the CPU"
        ops = Table(title=f"where an iteration's time goes: {prof['wall_ms']:.1f} ms, of which operators keep {where} "
                          f"busy {prof['busy_ms']:.1f} ms; the costliest (self time, ms per iteration)")
        ops.add_column("operator")
        for column in ["calls", *(["GPU ms", "CPU ms"] if on_gpu else ["CPU ms"])]:
            ops.add_column(column, justify="right")
        for row in prof["operators"][:15]:
            cells = [row["name"][:60], f"{row['calls_per_iteration']:g}"]
            cells += ([f"{row['self_device_ms']:.2f}", f"{row['self_cpu_ms']:.2f}"] if on_gpu
                      else [f"{row['self_cpu_ms']:.2f}"])
            ops.add_row(*cells)
        out.print(ops)
    if json_file is not None:
        write_json(json_file, report(command, cfg, result))
        console.print(f"wrote {json_file}")
