"""`gitcap train --dry-run`: parameter counts and an estimate of peak memory per GPU.

The model is built on the `meta` device from configs only (open_clip's model config, the
LM's `AutoConfig`): shapes and dtypes, no weights, nothing downloaded. The estimate is a
sum of four parts, each per GPU, for a run on GPUs (frozen weights stored in `--dtype`,
`auto` = bf16; compute in `--precision`, default bf16):

- weights: every parameter at its storage size (trained parts fp32 as gitcap keeps them;
  with --quant, the LM's linear layers but the head 1 byte per weight plus an fp32 scale
  per output row, whatever the format: bitsandbytes and torchao store alike); ZeRO-3
  splits them over the GPUs; ZeRO-3 + offload keeps them on the host;
- gradients: trainable parameters at their dtype; ZeRO-2/3 split them;
- optimizer: AdamW's two moments per trainable parameter at its dtype; ZeRO-1/2/3 split
  them; with offload they live in host RAM (reported separately);
- activations kept for backward, per transformer layer `B*T*(6*D + 2*F) + 2*B*H*T*T`
  elements (input, norm, q, k, v, attention output; FFN hidden and its activation; scores
  and softmax, eager attention) plus the LM head's logits over the text, in the compute
  dtype plus an fp32 copy for the loss. The LM always back-propagates (the mapping's
  gradient passes through it); the vision tower only with `--train-vision`. Gradient
  checkpointing keeps each layer's input and one layer's full activations.
With `--cache-features` the tower's weights are not on the GPU (they wait in host RAM for
validation), except under DeepSpeed, which places the whole module on the GPU itself.
Not counted: the CUDA context and allocator slack (often 0.5-1 GiB), temporary buffers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from gitcli.config import ModelConfig, TrainConfig
from gitcli.errors import GitcapError
from gitcli.model.quant import quantised_linears, stored_bytes

GIB = 1024**3


@dataclass
class Stack:
    """A transformer stack's shape, for activations: layers, width, FFN width, heads, tokens."""

    name: str
    layers: int
    width: int
    ffn: int
    heads: int
    tokens: int


@dataclass
class MemoryEstimate:
    trainable: int
    frozen: int
    weights: int  # bytes per GPU
    gradients: int
    optimizer: int
    activations: int
    host_offload: int = 0  # bytes in host RAM per process (offload)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


# ---- the model on the meta device ----------------------------------------------------------
def _lm_config(model_cfg: ModelConfig):
    """The LM's transformers config: every alias from the shared architecture table (as
    `gitcap bench` builds them, offline), else a local directory or the HF cache, else the
    hub when it can be reached."""
    from transformers import AutoConfig

    from gitcli.model.architectures import UnknownArchitecture, lm_config
    from gitcli.model.hub import hub_reachable, quiet_loggers
    from gitcli.model.lm import lm_suggestion

    name = model_cfg.lm
    try:
        return lm_config(name)
    except UnknownArchitecture:
        pass
    close = lm_suggestion(name)
    if close or not hub_reachable():
        raise GitcapError(f"--dry-run needs the config of {name!r}{close}, which is no known alias, no local "
                          "directory and not in the Hugging Face cache" + ("" if close else ", and the hub is out of reach"))
    try:
        with quiet_loggers("transformers", "huggingface_hub"):
            return AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        raise GitcapError(f"--dry-run needs the config of {name!r} and the hub has none (no such model, or a "
                          "gated one: `hf auth login`)") from None


def build_meta_captioner(model_cfg: ModelConfig):
    """The captioner with every tensor on `meta`, in the dtypes a GPU run would use: the
    tower and the captioner come from the same builders a real run uses, only the LM is
    made from its config instead of loaded."""
    from gitcli.model.captioner import assemble_captioner
    from gitcli.model.lm import TORCH_DTYPES
    from gitcli.model.vision import create_clip_visual

    model_cfg.validate()
    dtype = TORCH_DTYPES.get(model_cfg.dtype, torch.bfloat16)  # auto on a GPU: bf16
    meta = torch.device("meta")
    visual = create_clip_visual(model_cfg.vision, None, device=meta)
    with meta:
        if model_cfg.preset == "tiny":
            from gitcli.model.tiny import build_tiny_lm, build_tiny_tokenizer

            lm = build_tiny_lm(build_tiny_tokenizer())
        else:
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_config(_lm_config(model_cfg))
        lm.to(dtype)
        captioner = assemble_captioner(model_cfg, visual, lm, None, device=meta, dtype=dtype)
    return captioner


# ---- counting ------------------------------------------------------------------------------
def _quantised_weights(lm: torch.nn.Module) -> set[int]:
    """ids of the weights --quant stores in 8 bits: the LM's frozen linear layers but the head."""
    return {id(m.weight) for m in quantised_linears(lm) if not m.weight.requires_grad}


def _text_config(lm_config):
    """The language part of an LM's config (multimodal configs nest it)."""
    return lm_config.get_text_config() if hasattr(lm_config, "get_text_config") else lm_config


def lm_stack(lm_config, tokens: int) -> Stack:
    text = _text_config(lm_config)
    width = int(text.hidden_size)
    ffn = next((int(v) for k in ("intermediate_size", "ffn_dim", "n_inner")
                if (v := getattr(text, k, None))), 4 * width)
    return Stack("LM", int(text.num_hidden_layers), width, ffn, int(text.num_attention_heads), tokens)


def vision_stack(visual: torch.nn.Module) -> Stack | None:
    """A ViT tower's stack; None for towers whose activations are not modelled (ResNets)."""
    if not (hasattr(visual, "transformer") and hasattr(visual, "conv1")):
        return None
    block = visual.transformer.resblocks[0]
    width = int(visual.transformer.width)
    grid = visual.grid_size
    return Stack("vision", len(visual.transformer.resblocks), width, int(block.mlp.c_fc.out_features),
                 int(block.attn.num_heads), int(grid[0] * grid[1]) + 1)


def activation_elements(stack: Stack, batch: int, checkpointing: bool) -> int:
    """Elements kept for backward by one transformer stack (see the module docstring)."""
    b, t = batch, stack.tokens
    per_layer = b * t * (6 * stack.width + 2 * stack.ffn) + 2 * b * stack.heads * t * t
    if checkpointing:
        return stack.layers * b * t * stack.width + per_layer
    return stack.layers * per_layer


def stored_weight_bytes(captioner, skip: set[int] = frozenset()) -> int:
    """Bytes of every parameter but those in `skip` (ids), as `--quant` stores the LM's."""
    quantised = _quantised_weights(captioner.lm) if captioner.config.quantised else set()
    total = 0
    for p in captioner.parameters():
        if id(p) not in skip:
            total += stored_bytes(p) if id(p) in quantised else p.numel() * p.element_size()
    return total


def decoding_estimate(captioner, *, rows: int, tokens: int, precision: str) -> int:
    """Peak bytes of decoding `rows` sequences (images x beams) of `tokens` positions (prefix
    and new tokens): the weights as stored, the KV cache (keys and values of every layer
    in the compute dtype) and one step's logits in fp32. Not counted: one layer's
    activations in flight, the tower's on the prefill step, allocator slack."""
    text = _text_config(captioner.lm.config)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    kv_width = int(text.hidden_size) * kv_heads // heads
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    cache = 2 * int(text.num_hidden_layers) * rows * tokens * kv_width * act_bytes
    logits = rows * int(text.vocab_size) * 4
    return stored_weight_bytes(captioner) + cache + logits


def estimate(captioner, cfg: TrainConfig, *, world: int, stage: int | None, offload: bool,
             precision: str, text_tokens: int, cached_features: bool | None = None) -> MemoryEstimate:
    """Per-GPU estimate for `captioner` (built on meta) trained with `cfg`; `cached_features`
    (default: whether `cfg` caches them) trains from precomputed tower features."""
    cached = bool(cfg.cache_features) if cached_features is None else cached_features
    tower_off = cached and stage is None and not captioner.config.train_vision  # as the loop does
    tower = {id(p) for p in captioner.vision.parameters()} if tower_off else set()
    stage = stage or 0
    weight_bytes = stored_weight_bytes(captioner, skip=tower)
    trainable = frozen = grad_bytes = 0
    for p in captioner.parameters():
        if p.requires_grad:
            trainable += p.numel()
            grad_bytes += p.numel() * p.element_size()
        else:
            frozen += p.numel()
    opt_bytes = 2 * grad_bytes  # AdamW: exp_avg and exp_avg_sq in the parameter's dtype
    notes = []
    host = 0
    if tower_off:
        notes.append("--cache-features: the vision tower's weights wait in host RAM (for validation), not counted")
    elif cached:
        notes.append("--cache-features under DeepSpeed: the tower's weights stay on the GPU, unused by training")
    if stage >= 1:
        opt_bytes //= world
    if stage >= 2:
        grad_bytes //= world
    if stage >= 3:
        weight_bytes //= world
    if offload:
        host += opt_bytes
        opt_bytes = 0
        if stage >= 3:
            host += weight_bytes
            weight_bytes = 0
            notes.append("ZeRO-3 offload: weights stream in from host RAM layer by layer (not counted)")

    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    b = cfg.batch_size
    lm = lm_stack(captioner.lm.config, captioner.prefix_length + text_tokens)
    # the loop checkpoints the LM only when it trains, the tower only with --train-vision
    acts = activation_elements(lm, b, cfg.grad_checkpointing and captioner.config.lm_trained) * act_bytes
    vocab = int(captioner.lm.get_output_embeddings().weight.shape[0])
    acts += b * (text_tokens + 1) * vocab * (act_bytes + 4)  # logits + the fp32 copy for the loss
    if captioner.config.train_vision:
        vstack = vision_stack(captioner.vision.visual)
        if vstack is None:
            notes.append("vision tower activations not estimated for this (ResNet) tower")
        else:
            acts += activation_elements(vstack, b, cfg.grad_checkpointing) * act_bytes
    return MemoryEstimate(trainable, frozen, weight_bytes, grad_bytes, opt_bytes, acts, host, notes)


def dry_run(model_cfg: ModelConfig, cfg: TrainConfig, *, text_tokens: int, world: int | None = None) -> MemoryEstimate:
    """What `--dry-run` prints: checks the options, builds on meta, estimates; loads nothing."""
    from gitcli.train.deepspeed_config import check_combination, offloads, zero_stage
    from gitcli.train.features import check_cache_features

    override = check_combination(model_cfg, cfg)
    check_cache_features(model_cfg, cfg)
    stage = zero_stage(cfg, override)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    captioner = build_meta_captioner(model_cfg)
    return estimate(captioner, cfg, world=world, stage=stage, offload=offloads(cfg, override),
                    precision=cfg.precision or "bf16", text_tokens=text_tokens)
