"""Model FLOPs of training and decoding, and the utilisation they give on a known GPU.

Model FLOPs count the work the task needs, not what an implementation happens to run
(recomputation, padding and beams that could share a prefill are not counted), so a
faster implementation shows a higher utilisation, never a larger count.

Forward FLOPs per sample:
- vision tower and mapping: counted by torch's FlopCounterMode on one image (matmuls,
  convolutions, attention), so ResNets and ViTs alike are exact;
- LM: 2·N_body per position it runs plus 2·N_head per position whose logits are needed.
  N_body is every LM parameter but the embedding tables (lookups, no FLOPs) and the
  output head; N_head is the head's V·D. Attention scores (4·D per position pair and
  layer) are left out: under 1% of the LM's count at these lengths (≤ 50 positions).

Training, per sample (backward = 2× forward: activation gradients + weight gradients):
    vision  3·F_vision if trained, else F_vision (no gradient reaches a frozen tower)
    mapping 3·F_mapping
    LM      3·F_lm when fully tuned, else 2·F_lm: frozen weights (also under LoRA) take no
            weight gradient, but the mapping's gradient flows back through the activations
    F_lm = 2·N_body·(P + T) + 2·N_head·(T + 1)        P prefix, T caption tokens
i.e. 6·N·tokens for trained parts, 4·N·tokens for frozen parts gradients pass through,
2·N·tokens for frozen parts they do not.

Decoding, per image (the prefix runs once per image and is shared by its beams):
    F_vision + F_mapping + 2·N_body·P + 2·N_head + (new − 1)·beams·(2·N_body + 2·N_head)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, by a piece of the device name;
# the first match wins, so the more specific names come first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


@dataclass
class LMParams:
    body: int  # parameters doing matmuls at every position
    head: int  # the output projection, V·D


def lm_params(lm: nn.Module) -> LMParams:
    head = lm.get_output_embeddings().weight
    lookups = {id(p) for m in lm.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    body = sum(p.numel() for p in lm.parameters() if id(p) not in lookups and p is not head)
    return LMParams(body=body, head=head.numel())


def lm_forward_flops(params: LMParams, positions: int, logit_positions: int) -> float:
    return 2.0 * params.body * positions + 2.0 * params.head * logit_positions


def train_flops_per_sample(*, vision: float, mapping: float, lm: LMParams, prefix: int, caption_tokens: int,
                           train_vision: bool, train_lm: bool) -> float:
    """Forward + backward FLOPs of one training sample (see the module docstring)."""
    lm_fwd = lm_forward_flops(lm, prefix + caption_tokens, caption_tokens + 1)
    return (3 if train_vision else 1) * vision + 3 * mapping + (3 if train_lm else 2) * lm_fwd


def generate_flops_per_image(*, vision: float, mapping: float, lm: LMParams, prefix: int, new_tokens: int,
                             beams: int) -> float:
    """Forward FLOPs of decoding one image to `new_tokens` tokens with `beams` beams."""
    prefill = lm_forward_flops(lm, prefix, 1)
    steps = (new_tokens - 1) * beams * lm_forward_flops(lm, 1, 1)
    return vision + mapping + prefill + steps


@torch.no_grad()
def prefix_forward_flops(captioner, pixel_values: torch.Tensor) -> tuple[float, float]:
    """(vision, mapping) forward FLOPs for one image, counted as torch runs them."""
    from torch.utils.flop_counter import FlopCounterMode

    one = pixel_values[:1].to(captioner.device, next(captioner.vision.parameters()).dtype)
    with FlopCounterMode(display=False) as counter:
        feats = captioner.vision(one)
    vision = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        captioner.mapping(feats.to(next(captioner.mapping.parameters()).dtype))
    return float(vision), float(counter.get_total_flops())


def device_peak(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """The peak FLOP/s MFU is taken against: the user's figure, else the table's bf16/fp16 peak
    for a known GPU computing in bf16/fp16; None (MFU "-") on CPUs and unknown GPUs."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    return peak_flops(torch.cuda.get_device_name(device))
