"""The captioner: vision tower -> mapping -> prefix of the LM's input embeddings.

Sequence layout, training and generation alike (prefix first, then text):

    [ image prefix (P) | prompt tokens | target tokens + EOS | padding ]

Training pads on the right; generation pads on the left. Position ids are always
`cumsum(attention_mask) - 1`, so both layouts give every real token the same position.
Loss covers the target tokens only: prefix, prompt and padding are -100.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gitcli.config import ModelConfig
from gitcli.errors import GitcapError
from gitcli.model.lm import load_lm, load_tokenizer, storage_dtype
from gitcli.model.mapping import build_mapping, prefix_length_of
from gitcli.model.vision import VisionTower, create_clip_visual, image_transform


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Captioner(nn.Module):
    def __init__(self, config: ModelConfig, vision: VisionTower, mapping: nn.Module, lm: nn.Module, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.mapping = mapping
        self.lm = lm
        self.tokenizer = tokenizer
        self.prefix_length = prefix_length_of(config, vision.num_tokens)
        # where the weights came from (a checkpoint's identity), so outputs can record it;
        # None: built here with fresh weights
        self.origin: dict | None = None

    def train(self, mode: bool = True) -> "Captioner":
        """A frozen tower stays in eval mode while the rest trains: a ResNet's BatchNorm
        would otherwise update its running statistics (a frozen model that changes) and
        normalise by batch statistics, unlike the features a cache or inference sees."""
        super().train(mode)
        if mode and not self.config.train_vision:
            self.vision.eval()
        return self

    # ---- pieces ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.mapping.parameters()).device

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def image_transform(self, is_train: bool = False):
        return image_transform(self.vision.visual, is_train=is_train)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D_vision) tower features, on the tower's device (which is the
        host when a run trains from cached features and keeps the tower off the GPU)."""
        weight = next(self.vision.parameters())
        return self.vision(pixel_values.to(weight.device, weight.dtype))

    def map_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, D_vision) tower features, live or cached -> (B, P, D_lm) prefix embeddings."""
        mapping_dtype = next(self.mapping.parameters()).dtype
        return self.mapping(features.to(self.device, mapping_dtype)).to(self.embed_dtype)

    def image_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P, D_lm) prefix embeddings."""
        return self.map_features(self.vision_features(pixel_values))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def join(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             left_pad: bool = False):
        """Prefix + text -> (inputs_embeds, attention_mask, position_ids) for the LM.

        With `left_pad` (generation) the text's padding is moved in front of the prefix,
        so that every row ends with its last real token: `[pad | prefix | prompt]`.
        """
        embeds = torch.cat([prefix, self.embed_tokens(input_ids)], dim=1)  # (B, P+T, D)
        ones = attention_mask.new_ones(prefix.shape[:2])
        mask = torch.cat([ones, attention_mask], dim=1)
        if left_pad:
            order = torch.argsort(mask, dim=1, stable=True)  # padding (0) first, order kept
            embeds = torch.gather(embeds, 1, order[:, :, None].expand_as(embeds))
            mask = torch.gather(mask, 1, order)
        return embeds, mask, position_ids_from_mask(mask)

    # ---- training forward ---------------------------------------------------------
    def forward(self, pixel_values, input_ids, attention_mask, labels=None, prefix=None, features=None):
        """Right-padded text after the prefix. Returns (loss or None, logits over text).

        `logits[:, i]` predicts `input_ids[:, i]`; only the T text positions are run
        through the LM head (never the prefix), which saves memory on large vocabularies.
        `features` (B, N, D_vision), precomputed by the frozen tower, replace `pixel_values`.
        """
        if prefix is None:
            prefix = self.map_features(features) if features is not None else self.image_prefix(pixel_values)
        embeds, mask, positions = self.join(prefix, input_ids, attention_mask)
        t = input_ids.shape[1]
        out = self.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
            logits_to_keep=t + 1, use_cache=False,
        )
        logits = out.logits[:, :-1]  # (B, T, V): position P-1+i predicts text token i
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return loss, logits


# ---- building --------------------------------------------------------------------
def freeze_for_training(captioner: Captioner) -> None:
    """What trains follows the config: mapping always; tower, LM on request."""
    cfg = captioner.config
    captioner.vision.requires_grad_(cfg.train_vision)
    captioner.mapping.requires_grad_(True)
    if cfg.lora_rank == 0:
        captioner.lm.requires_grad_(cfg.train_lm and not cfg.quantised)  # quantised weights take no gradients


def apply_lora(captioner: Captioner) -> None:
    """Wrap the LM with peft LoRA adapters (also on a quantised LM); only adapters train."""
    from peft import LoraConfig, get_peft_model

    cfg = captioner.config
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # on torchao weights peft warns that merging adapters into them is impossible;
            # gitcap never merges (adapters are saved apart and applied on load)
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            # peft asks transformers a question under a name transformers 5 renamed
            warnings.filterwarnings("ignore", message=".is_gradient_checkpointing. is deprecated")
            captioner.lm = get_peft_model(captioner.lm, lora)
    except ValueError as exc:
        raise GitcapError(f"cannot add LoRA adapters to {cfg.lm}: {str(exc).splitlines()[0]}") from None


def build_captioner(
    config: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    vocabulary: list[str] | None = None,
    lm_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    vision_pretrained: str | None | type(...) = ...,
) -> Captioner:
    """Build a captioner from its config: the one builder of models, for training, inference,
    benchmarks and the demo.

    The tiny preset builds its tokenizer from `vocabulary` (default: the preset's own,
    gitcli.config.TINY_VOCABULARY) and its LM at random. A checkpoint
    passes `lm_path` / `tokenizer_path` (saved copies) and `vision_pretrained=None` when
    it carries the tower's weights itself.
    """
    config.validate()
    device = torch.device(device)
    dtype = storage_dtype(config.dtype, device)
    if config.quant == "bnb-int8" and device.type == "cpu":
        logging.getLogger(__name__).info("8-bit LM on CPU: bitsandbytes' CPU backend, slow but exact")
    pretrained = config.vision_pretrained if vision_pretrained is ... else vision_pretrained

    visual = create_clip_visual(config.vision, pretrained)

    if config.preset == "tiny" and lm_path is None:
        from gitcli.model.tiny import build_tiny_lm, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(vocabulary) if vocabulary is not None else build_tiny_tokenizer()
        if config.quant == "bnb-int8":  # bitsandbytes quantises while loading saved weights
            raise GitcapError("--quant bnb-int8 loads a saved LM; build the tiny preset first, then load it 8-bit")
        from gitcli.model.quant import check_quant_device, quantise_lm

        check_quant_device(config.quant, device)
        lm = quantise_lm(build_tiny_lm(tokenizer).to(device=device, dtype=dtype), config.quant, keep_dense=True)
    else:
        source = str(lm_path) if lm_path is not None else config.lm
        tokenizer = load_tokenizer(str(tokenizer_path) if tokenizer_path is not None else source)
        # the tiny preset's LM is saved in its checkpoints: keep its weights as loaded
        lm = load_lm(source, dtype=dtype, quant=config.quant, device=device, keep_dense=config.preset == "tiny")

    return assemble_captioner(config, visual, lm, tokenizer, device=device, dtype=dtype)


def assemble_captioner(config: ModelConfig, visual: nn.Module, lm: nn.Module, tokenizer, *,
                       device: torch.device, dtype: torch.dtype) -> Captioner:
    """A built tower and LM (on `device`, frozen weights in `dtype`) -> the captioner, frozen as
    the config says. Shared with `gitcap bench`, which builds its LM from a config at random."""
    vision = VisionTower(visual, grid=config.grid)
    lm_dim = lm.get_input_embeddings().embedding_dim
    mapping = build_mapping(config, vision.feature_dim, vision.num_tokens, lm_dim)
    # Trained parts stay fp32 (autocast computes in low precision); frozen ones may not.
    vision_dtype = torch.float32 if config.train_vision else dtype
    vision.to(device=device, dtype=vision_dtype)
    mapping.to(device=device, dtype=torch.float32)
    captioner = Captioner(config, vision, mapping, lm, tokenizer)
    if config.lora_rank > 0:
        apply_lora(captioner)
    freeze_for_training(captioner)
    return captioner
