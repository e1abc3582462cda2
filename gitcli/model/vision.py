"""The CLIP vision tower, from open_clip, and the image transform that belongs to it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from gitcli.errors import GitcapError
from gitcli.model.hub import did_you_mean, hub_reachable, quiet_loggers

# Model configs shipped with gitcap (the tiny preset's ViT); registered with open_clip so
# that they load through `open_clip.create_model` exactly as the hub architectures do.
_CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def _register_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def create_clip_visual(name: str, pretrained: str | None, *, device: torch.device | str = "cpu") -> nn.Module:
    """Build the visual half of an open_clip model: `pretrained` is a tag, a file or None;
    `device="meta"` gives its shapes without allocating it (train --dry-run)."""
    import open_clip

    _register_configs()
    if name not in open_clip.list_models():
        raise GitcapError(
            f"unknown vision tower {name!r}{did_you_mean(name, open_clip.list_models())}; use an open_clip "
            "model name such as RN50, ViT-B-32, ViT-L-14 (see open_clip.list_models())"
        )
    if pretrained is not None and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise GitcapError(
                f"{pretrained!r} is neither a local weights file nor a pretrained tag of {name} "
                f"(tags: {', '.join(tags) or 'none'})"
            )
    if pretrained is not None and not os.path.exists(pretrained):
        hub_reachable()  # out of reach: the download answers from the cache at once, no retries
    # open_clip logs a warning (random weights, intended here) or an error, and the hub
    # client logs every retry of a failed download; gitcap reports in one line instead.
    with quiet_loggers("", "huggingface_hub"):
        try:
            clip = open_clip.create_model(name, pretrained=pretrained, require_pretrained=pretrained is not None,
                                          device=device)
        except Exception as exc:  # the weights come from the user or the network: any failure is theirs to fix
            _loading_failed(name, pretrained, exc)
    return clip.visual


def _loading_failed(name: str, pretrained: str | None, exc: Exception) -> None:
    if pretrained and os.path.exists(pretrained):
        raise GitcapError(f"cannot load {pretrained} as {name} weights: is it an open_clip checkpoint of this "
                          f"architecture? ({_first_line(exc)})") from None
    where = "the hub could not be reached" if not hub_reachable() else f"the download failed ({_first_line(exc)})"
    raise GitcapError(f"cannot load {name} weights {pretrained!r}: not in the local cache and {where}; "
                      "download them where there is internet and pass --vision-pretrained FILE") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class VisionTower(nn.Module):
    """open_clip visual encoder returning features as a token sequence `(B, N, D)`.

    Pooled mode gives the projected CLIP embedding as one token (N = 1); grid mode gives
    the last layer's patch tokens (ViT: N = patches, D = width; ResNets: N = H*W of the
    final feature map, D = channels).
    """

    def __init__(self, visual: nn.Module, grid: bool) -> None:
        super().__init__()
        self.visual = visual
        self.grid = grid
        if grid:
            self.feature_dim, self.num_tokens = _grid_shape(visual)
        else:
            self.feature_dim, self.num_tokens = int(visual.output_dim), 1

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.grid:
            return self.visual(pixel_values).unsqueeze(1)  # (B, 1, D)
        fmt = "NLC" if _is_vit(self.visual) else "NCHW"
        out = self.visual.forward_intermediates(
            pixel_values, indices=1, stop_early=True, intermediates_only=True,
            normalize_intermediates=True, output_fmt=fmt,
        )
        feats = out["image_intermediates"][-1]
        if fmt == "NCHW":
            feats = feats.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return feats


def _is_vit(visual: nn.Module) -> bool:
    return hasattr(visual, "transformer") and hasattr(visual, "conv1")


def _grid_shape(visual: nn.Module) -> tuple[int, int]:
    """(feature dim, number of grid tokens) of a tower's last feature map."""
    if _is_vit(visual):
        grid = visual.grid_size
        return int(visual.transformer.width), int(grid[0] * grid[1])
    if hasattr(visual, "attnpool"):  # open_clip ModifiedResNet
        dim = int(visual.attnpool.k_proj.in_features)
        side = visual.image_size // 32
        return dim, side * side
    raise GitcapError(f"--grid is not supported for the {type(visual).__name__} tower; use pooled features")


def image_transform(visual: nn.Module, is_train: bool = False):
    """The tower's own preprocessing (its size, CLIP mean/std, interpolation)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=is_train)
