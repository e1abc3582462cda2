"""`gitcap bench train`: optimizer steps of the real training step on random data.

One step is what `gitcap train` does per batch: forward under autocast, loss over the
caption tokens, backward, gradient clipping at 1.0, fused AdamW on GPUs (GradScaler with
fp16) — on a fixed random batch, so data loading is not in the number. With
`cached_features` the step starts from the tower's features stored as fp16 (what
`train --cache-features` reads), and the tower waits in host RAM as it does in training.
"""

from __future__ import annotations

from typing import Callable

import torch

from gitcli.bench.flops import device_peak, lm_params, prefix_forward_flops, train_flops_per_sample
from gitcli.bench.measure import PeakMemory, profile_iterations, time_iterations
from gitcli.bench.result import BenchResult, summarise
from gitcli.bench.workload import BenchConfig, build_bench_model, random_batch
from gitcli.dist import autocast, resolve_device, resolve_precision

# (captioner, precision, cached features) -> estimated peak bytes. Handed in by the caller:
# the estimate lives in gitcli.train, a module of bench's own level, which bench does not import.
MemoryEstimator = Callable[[torch.nn.Module, str, bool], int]


def run_train_bench(cfg: BenchConfig, estimate_memory: MemoryEstimator | None = None) -> BenchResult:
    cfg.validate()
    cfg.model.validate_for_training()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    memory = PeakMemory(device)
    memory.start()
    captioner = build_bench_model(cfg, device)
    captioner.train()  # dropout as configured, as in a training run
    batch, tokens = cfg.batch_size, cfg.caption_tokens
    pixels, ids = random_batch(captioner, batch, tokens, cfg.seed, device)
    mask = torch.ones_like(ids)

    vision_flops, mapping_flops = prefix_forward_flops(captioner, pixels)
    features = None
    if cfg.cached_features:
        with torch.no_grad(), autocast(precision, device):
            features = captioner.vision_features(pixels).to(torch.float16)  # (B, N, D), as the cache stores them
        pixels = None
        vision_flops = 0.0  # the tower does not run in a step
        if device.type == "cuda":
            captioner.vision.to("cpu")
            torch.cuda.empty_cache()
    params = lm_params(captioner.lm)
    flops = train_flops_per_sample(vision=vision_flops, mapping=mapping_flops, lm=params,
                                   prefix=captioner.prefix_length, caption_tokens=tokens,
                                   train_vision=captioner.config.train_vision, train_lm=captioner.config.train_lm)

    trainable = [p for p in captioner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    losses: list[torch.Tensor] = []

    def step() -> None:
        with autocast(precision, device):
            loss, _ = captioner(pixels, ids, mask, labels=ids, features=features)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # gitcap train's default --clip-grad
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    times = time_iterations(step, warmup=cfg.warmup, steps=cfg.steps, device=device, after_warmup=memory.reset)
    peak = memory.peak_bytes()  # read before profiling: the profiler allocates too
    profile = profile_iterations(step, steps=2, device=device) if cfg.profile else None
    last_loss = float(losses[-1])
    if not torch.isfinite(torch.tensor(last_loss)):
        raise RuntimeError(f"the benchmark's training loss is not finite ({last_loss})")
    n_trainable = sum(p.numel() for p in trainable)
    return summarise(
        profile=profile,
        kind="train", unit="samples", batch=batch, times=times, tokens_per_item=tokens, flops_per_item=flops,
        peak_flops=device_peak(device, precision, cfg.peak_tflops),
        flops_parts={"vision_forward": vision_flops, "mapping_forward": mapping_flops,
                     "lm_body_parameters": params.body, "lm_head_parameters": params.head},
        peak_memory_bytes=peak,
        memory_estimate_bytes=estimate_memory(captioner, precision, cfg.cached_features) if estimate_memory else None,
        trainable_parameters=n_trainable,
        frozen_parameters=sum(p.numel() for p in captioner.parameters()) - n_trainable,
        prefix_length=captioner.prefix_length, precision=precision, device=str(device), last_loss=last_loss)
