"""`gitcap bench generate`: batched decoding with gitcap's decoder on random images.

One iteration decodes a batch exactly as `caption` does — image prefix under autocast,
then greedy or beam search with the KV cache — except that end-of-sequence never stops a
row, so every image gets exactly `max_new_tokens` tokens (random weights would end rows
at random; the baseline forces the same length with `min_new_tokens`).

`decoder="transformers"` times `transformers` `generate()` on the same model, prefix and
token count instead (`min_new_tokens` fixes the length), so that gitcap's decoder can be
compared with it in one run on one GPU.
"""

from __future__ import annotations

import torch

from gitcli.bench.flops import device_peak, generate_flops_per_image, lm_params, prefix_forward_flops
from gitcli.bench.measure import PeakMemory, profile_iterations, time_iterations
from gitcli.bench.result import BenchResult, summarise
from gitcli.bench.workload import BenchConfig, build_bench_model, random_batch
from gitcli.config import GenerationConfig
from gitcli.dist import autocast, resolve_device, resolve_precision
from gitcli.generate.decode import decode_tokens
from gitcli.model.captioner import position_ids_from_mask
from gitcli.train.memory import decoding_estimate


def run_generate_bench(cfg: BenchConfig) -> BenchResult:
    cfg.validate()
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, beams=cfg.beams, cache=cfg.cache, compile=cfg.compile)
    gen.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    memory = PeakMemory(device)
    memory.start()
    # --compile compiles the decoder's one-token step (GenerationConfig.compile), not the
    # whole LM: a compiled LM forward would see a new shape at every step of a growing cache
    captioner = build_bench_model(cfg, device, compile_lm=False)
    captioner.eval()
    pixels, _ = random_batch(captioner, cfg.batch_size, 1, cfg.seed, device)

    vision_flops, mapping_flops = prefix_forward_flops(captioner, pixels)
    params = lm_params(captioner.lm)
    flops = generate_flops_per_image(vision=vision_flops, mapping=mapping_flops, lm=params,
                                     prefix=captioner.prefix_length, new_tokens=cfg.max_new_tokens, beams=cfg.beams)

    @torch.no_grad()
    def decode() -> None:
        with autocast(precision, device):
            prefix = captioner.image_prefix(pixels)  # (B, P, D)
            mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=device)
            if cfg.decoder == "transformers":
                rows = _transformers_generate(captioner.lm, prefix, mask, cfg)
            else:
                rows = decode_tokens(captioner.lm, prefix, mask, position_ids_from_mask(mask), gen, eos=None)
        short = [len(tokens) for tokens, _ in rows if len(tokens) != cfg.max_new_tokens]
        if len(rows) != cfg.batch_size or short:
            raise RuntimeError(f"decoding returned {len(rows)} rows, lengths {short[:3]} instead of "
                               f"{cfg.max_new_tokens}: the workload would not be the one measured")

    times = time_iterations(decode, warmup=cfg.warmup, steps=cfg.steps, device=device, after_warmup=memory.reset)
    peak = memory.peak_bytes()  # read before profiling: the profiler allocates too
    profile = profile_iterations(decode, steps=2, device=device) if cfg.profile else None
    total = sum(p.numel() for p in captioner.parameters())
    return summarise(
        profile=profile,
        kind="generate", unit="images", batch=cfg.batch_size, times=times, tokens_per_item=cfg.max_new_tokens,
        flops_per_item=flops, peak_flops=device_peak(device, precision, cfg.peak_tflops),
        flops_parts={"vision_forward": vision_flops, "mapping_forward": mapping_flops,
                     "lm_body_parameters": params.body, "lm_head_parameters": params.head},
        peak_memory_bytes=peak,
        memory_estimate_bytes=decoding_estimate(captioner, rows=cfg.batch_size * cfg.beams, precision=precision,
                                                tokens=captioner.prefix_length + cfg.max_new_tokens),
        trainable_parameters=0, frozen_parameters=total,
        prefix_length=captioner.prefix_length, precision=precision, device=str(device))


def _transformers_generate(lm, prefix: torch.Tensor, mask: torch.Tensor, cfg: BenchConfig):
    """`generate()` as users call it, forced to `max_new_tokens` -> (token ids, None) per image."""
    eos = lm.config.eos_token_id
    pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else eos
    out = lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                      min_new_tokens=cfg.max_new_tokens, num_beams=cfg.beams, do_sample=False,
                      eos_token_id=eos, pad_token_id=pad)
    return [(row, None) for row in out.tolist()]  # with inputs_embeds only new tokens come back
