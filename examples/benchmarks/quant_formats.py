"""Every --quant format on one random-weight model: what it decodes, how fast, in how much memory.

For each format the same captioner is built (same seed: the same tower, mapping and dense
LM weights before quantising; bnb-int8 goes through fp16 weights saved and loaded, as users
load it), then:
- greedy-token agreement with the unquantised model (bf16 on GPUs, fp32 on CPU): the
  share of the new tokens equal to its tokens, position by position, and the share of
  images whose whole caption is equal, on the same random images;
- images/s decoding beam 3, 20 new tokens, at --batch (10: the 8-bit LLaMA row of the
  baseline), and peak memory;
- on a GPU, the largest decoding batch whose peak stays under --fit-gib (24: one consumer
  GPU), found by doubling, then halving the gap, with the allocator capped at that size.

    python examples/benchmarks/quant_formats.py                    # ViT-B-16 + LLaMA-7B, on a GPU
    python examples/benchmarks/quant_formats.py --smoke            # tiny shapes on a CPU: the plumbing
Prints a table and writes --json. A format this machine cannot run is listed with why.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from gitcli.bench.workload import BenchConfig, build_bench_model, random_batch
from gitcli.config import GenerationConfig, ModelConfig
from gitcli.dist import autocast, resolve_device, resolve_precision
from gitcli.errors import GitcapError
from gitcli.generate.decode import decode_tokens
from gitcli.model.captioner import position_ids_from_mask
from gitcli.model.quiet import install_log_filters

FORMATS = ["none", "bnb-int8", "int8-weight", "int8-dynamic", "fp8"]
GIB = 1024**3


def build(args, quant: str, device: torch.device):
    model = ModelConfig(vision=args.vision, vision_pretrained=None, lm=args.lm, mapping="mlp",
                        prefix_length=args.prefix, quant=quant)
    cfg = BenchConfig(model=model, device=str(device), lm_layers=args.lm_layers, seed=0)
    return build_bench_model(cfg, device).eval()


@torch.no_grad()
def decode(captioner, pixels, gen: GenerationConfig, precision: str, device: torch.device) -> list[list[int]]:
    with autocast(precision, device):
        prefix = captioner.image_prefix(pixels)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=device)
        rows = decode_tokens(captioner.lm, prefix, mask, position_ids_from_mask(mask), gen, eos=None)
    return [list(tokens) for tokens, _ in rows]


def images_per_second(captioner, pixels, gen, precision, device, repeats: int) -> float:
    decode(captioner, pixels, gen, precision, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        decode(captioner, pixels, gen, precision, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return repeats * pixels.shape[0] / (time.perf_counter() - start)


def largest_batch(fits, start: int, cap: int = 1 << 14) -> int:
    """The largest b in [1, cap] with fits(b) (0 if none), for a fits() that holds up to some
    batch and fails above it: doubling from `start`, then halving the gap to within ~6%."""
    if not fits(1):
        return 0
    good, b = 1, min(max(2, start), cap)
    while good < cap:
        if not fits(b):
            break
        good, b = b, min(2 * b, cap)
    else:
        return good  # even the cap fits
    bad = b
    while bad - good > max(1, good // 16):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def fits_under(captioner, args, gen, precision, device, limit: int):
    def fits(batch: int) -> bool:
        pixels, _ = random_batch(captioner, batch, 1, 1, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            decode(captioner, pixels, gen, precision, device)
        except torch.OutOfMemoryError:
            return False
        finally:
            del pixels
            gc.collect()
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(device) <= limit

    return fits


def main() -> None:
    install_log_filters()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", default="ViT-B-16")
    ap.add_argument("--lm", default="llama-7b")
    ap.add_argument("--lm-layers", type=int, default=None)
    ap.add_argument("--prefix", type=int, default=5)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--agreement-images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fit-gib", type=float, default=24.0)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU: checks the script")
    ap.add_argument("--json", default="quant_formats.json")
    args = ap.parse_args()
    if args.smoke:
        args.vision, args.lm, args.lm_layers, args.batch, args.agreement_images, args.repeats = \
            "gitcap-tiny-vit", "gpt2", 1, 2, 4, 1
    device = resolve_device(args.device)
    precision = resolve_precision(None, device)
    greedy = GenerationConfig(max_new_tokens=20, beams=1)
    beam3 = GenerationConfig(max_new_tokens=20, beams=3)
    rows, reference = [], None
    for quant in args.formats.split(","):
        row = {"format": quant}
        try:
            captioner = build(args, quant, device)
        except GitcapError as exc:
            row["skipped"] = str(exc)
            rows.append(row)
            print(f"{quant:13s} skipped: {exc}", flush=True)
            continue
        pixels, _ = random_batch(captioner, args.agreement_images, 1, 0, device)
        tokens = decode(captioner, pixels, greedy, precision, device)
        if quant == "none":
            reference = tokens
        if reference is not None:
            same = sum(a == b for r, t in zip(reference, tokens) for a, b in zip(r, t))
            row["token_agreement"] = same / sum(len(r) for r in reference)
            row["caption_agreement"] = sum(r == t for r, t in zip(reference, tokens)) / len(reference)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch, _ = random_batch(captioner, args.batch, 1, 2, device)
        row["beam3_images_per_s"] = images_per_second(captioner, batch, beam3, precision, device, args.repeats)
        if device.type == "cuda":
            row["beam3_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            limit = int(args.fit_gib * GIB)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
            try:
                row[f"largest_beam3_batch_{args.fit_gib:g}gib"] = largest_batch(
                    fits_under(captioner, args, beam3, precision, device, limit), start=args.batch)
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del captioner, pixels, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "model": f"{args.vision} + {args.lm}", "precision": precision, "rows": rows}, f, indent=1)
    print(f"{'format':13s} {'tokens same':>11s} {'captions same':>13s} {'beam3 img/s':>11s} {'peak GiB':>8s}  largest batch")
    for r in rows:
        if "skipped" in r:
            continue
        largest = next((v for k, v in r.items() if k.startswith("largest")), "-")
        print(f"{r['format']:13s} {r.get('token_agreement', float('nan')):11.3f} {r.get('caption_agreement', float('nan')):13.3f} "
              f"{r['beam3_images_per_s']:11.2f} {r.get('beam3_peak_gib', float('nan')):8.2f}  {largest}")


if __name__ == "__main__":
    main()
