"""Quantised frozen LMs: `--quant bnb-int8|int8-weight|int8-dynamic|fp8`.

Only the LM's linear layers are quantised, never its embeddings or output head (the head
decides the next token; small errors there change captions most), and only a frozen LM:
the mapping, the tower and LoRA adapters train in their own precision.

- `bnb-int8` (alias `--int8`): bitsandbytes' LLM.int8(), applied while loading through
  `BitsAndBytesConfig`. It was built to save memory: its outlier decomposition makes
  every matmul slower than bf16. peft has long supported LoRA on it.
- `int8-weight`: torchao's int8 weight-only: int8 weights with one fp32 scale per
  output channel, dequantised inside the matmul; activations stay in their dtype. It
  halves the bytes every decoding step reads, which is what decoding waits on.
- `int8-dynamic`: torchao's int8 weights and int8 activations quantised per token at run
  time (W8A8): int8 matmuls (int8 tensor cores on GPUs), for large batches.
- `fp8`: torchao's float8 (e4m3) weights and per-row dynamic float8 activations: fp8
  matmuls, on GPUs of compute capability 8.9 or newer (Ada, Hopper) only.

The gradient must pass through the frozen LM to the mapping. torchao's weight-only
tensors differentiate as the layer they stand for (grad_in = grad_out @ W, W dequantised).
Quantising an activation is a step function with no gradient, so the activation-quantising
formats get a backward of their own: the straight-through estimate, grad_out @ W with the
dequantised weight, the gradient of the layer the quantised one approximates.
"""

from __future__ import annotations

import torch
from torch import nn

from gitcli.config import TORCHAO_FORMATS, check_quant_name
from gitcli.errors import GitcapError

_ACTIVATION_QUANTISED = ("int8-dynamic", "fp8")
FP8_MIN_CAPABILITY = (8, 9)


def check_quant_device(quant: str, device: torch.device) -> None:
    """Refuse, in one line and before any weight loads, a format this machine cannot run."""
    check_quant_name(quant)
    if quant == "bnb-int8":
        _check_bitsandbytes(device)
    elif quant in TORCHAO_FORMATS:
        _import_torchao(quant)
    if quant == "fp8":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < FP8_MIN_CAPABILITY:
            where = f"this GPU has {capability[0]}.{capability[1]}" if capability else f"this is {device.type}"
            raise GitcapError(f"--quant fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper) and {where}; "
                              "use --quant int8-weight")


def _check_bitsandbytes(device: torch.device) -> None:
    """bitsandbytes builds without a CPU backend can only run int8 on CUDA: say so up front."""
    from gitcli.model.quiet import install_log_filters

    install_log_filters()
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise GitcapError("--quant bnb-int8 needs bitsandbytes (pip install bitsandbytes)") from None
    if device.type == "cuda":
        return
    try:
        layer = bnb.nn.Linear8bitLt(4, 4, has_fp16_weights=False).to(device)
        layer(torch.zeros(1, 4))
    except Exception as exc:  # any failure here means: no int8 on this device
        raise GitcapError(f"--quant bnb-int8 needs a CUDA GPU with this bitsandbytes build "
                          f"({str(exc).splitlines()[0][:120]})") from None


def _import_torchao(quant: str):
    from gitcli.model.quiet import install_log_filters

    install_log_filters()
    try:
        import torchao.quantization as torchao_quantization
    except ImportError:
        raise GitcapError(f"--quant {quant} needs torchao (pip install torchao)") from None
    return torchao_quantization


def _torchao_config(quant: str):
    q = _import_torchao(quant)
    if quant == "int8-weight":
        return q.Int8WeightOnlyConfig()
    if quant == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    from torchao.quantization.granularity import PerRow

    return q.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantised_linears(lm: nn.Module) -> list[nn.Linear]:
    """The layers a format quantises: every linear layer of the LM but its output head."""
    head = lm.get_output_embeddings()
    return [m for m in lm.modules() if isinstance(m, nn.Linear) and m is not head]


def quantise_lm(lm: nn.Module, quant: str, *, keep_dense: bool = False) -> nn.Module:
    """Quantise a loaded, frozen LM in place with torchao (`bnb-int8` happens at load).

    `keep_dense`: keep a CPU copy of the weights as they were, for an LM that checkpoints
    save (the tiny preset's): saving them, not the dequantised ones, makes loading and
    quantising again give exactly the same model (torchao's scale of a dequantised row can
    differ in its last bit, and so can a weight)."""
    if quant not in TORCHAO_FORMATS:
        return lm
    quantize_ = _import_torchao(quant).quantize_
    if keep_dense:
        lm.gitcap_dense_state = {name: t.detach().to("cpu", copy=True) for name, t in lm.state_dict().items()}
    targets = {id(m) for m in quantised_linears(lm)}
    for p in lm.parameters():
        p.requires_grad_(False)
    quantize_(lm, _torchao_config(quant), filter_fn=lambda module, _name: id(module) in targets)
    if quant in _ACTIVATION_QUANTISED:
        for module in lm.modules():
            if id(module) in targets:
                module.__class__ = StraightThroughLinear  # still an nn.Linear: peft can wrap it
    return lm


class _StraightThrough(torch.autograd.Function):
    """y = the quantised layer's output; dy/dx = the dequantised weight (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        dense = weight.dequantize().to(grad_out.dtype)
        return (grad_out @ dense).to(ctx.input_dtype), None, None


class StraightThroughLinear(nn.Linear):
    """A torchao activation-quantised linear layer whose input gets a gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _StraightThrough.apply(x, self.weight, self.bias)


def dense_state_dict(lm: nn.Module) -> dict[str, torch.Tensor] | None:
    """What `save_pretrained` should write for a torchao-quantised LM (checkpoints hold plain
    safetensors): the weights kept before quantising, else the dequantised ones; None for
    an LM with no torchao tensor (saved as it is)."""
    state = lm.state_dict()
    if not any(_is_torchao_tensor(t) for t in state.values()):
        return None
    kept = getattr(lm, "gitcap_dense_state", None)
    if kept is not None:
        return kept
    return {name: t.dequantize() if _is_torchao_tensor(t) else t for name, t in state.items()}


def torchao_tensor_names(lm: nn.Module) -> list[str]:
    """Names of the LM's parameters that torchao quantised."""
    return [name for name, p in lm.named_parameters() if _is_torchao_tensor(p)]


def _is_torchao_tensor(t) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and callable(getattr(t, "dequantize", None)) \
        and type(t).__module__.startswith("torchao.")


def stored_bytes(weight: torch.Tensor) -> int:
    """Bytes a quantised linear weight of this shape holds, in every format: one byte per
    element plus one fp32 scale per output row (torchao's per-channel scales, bitsandbytes'
    row statistics)."""
    rows = weight.shape[0]
    return weight.numel() + 4 * rows
