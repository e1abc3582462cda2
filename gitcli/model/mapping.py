"""Mapping networks: vision features `(B, N, Dv)` -> LM input-embedding prefix `(B, P, Dlm)`.

- `linear` / `linear-ln`: a linear projection (GIT puts a LayerNorm after it). On a patch
  grid it maps token for token (P = N); on the pooled embedding it maps the one vector to
  `prefix_length` tokens.
- `mlp`: ClipCap's prefix MLP, pooled embedding -> hidden (half the output) -> P tokens.
- `transformer`: ClipCap's transformer mapper: the input tokens, projected to the LM width,
  are concatenated with `prefix_length` learned constants; after a transformer encoder the
  constants' positions are the prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from gitcli.config import ModelConfig


class LinearMapping(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, in_tokens: int, prefix_length: int, layer_norm: bool) -> None:
        super().__init__()
        # A single pooled vector is spread over `prefix_length` tokens; a grid maps 1:1.
        self.tokens_out = prefix_length if in_tokens == 1 else 1
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim * self.tokens_out)
        self.norm = nn.LayerNorm(out_dim) if layer_norm else nn.Identity()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, n, _ = feats.shape
        x = self.proj(feats).view(b, n * self.tokens_out, self.out_dim)
        return self.norm(x)


class MLPMapping(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, prefix_length: int) -> None:
        super().__init__()
        self.prefix_length, self.out_dim = prefix_length, out_dim
        hidden = out_dim * prefix_length // 2
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim * prefix_length)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # feats: (B, 1, Dv)
        return self.net(feats[:, 0]).view(feats.shape[0], self.prefix_length, self.out_dim)


def _heads_for(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


class TransformerMapping(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, in_tokens: int, prefix_length: int, layers: int) -> None:
        super().__init__()
        # pooled input: expand to `prefix_length` tokens as ClipCap does (clip_length = P)
        self.tokens_in = prefix_length if in_tokens == 1 else in_tokens
        self.expand = prefix_length if in_tokens == 1 else 1
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim * self.expand)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, out_dim))
        layer = nn.TransformerEncoderLayer(
            out_dim, _heads_for(out_dim), dim_feedforward=2 * out_dim, dropout=0.0,
            activation="relu", batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, n, _ = feats.shape
        x = self.proj(feats).view(b, n * self.expand, self.out_dim)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1)
        out = self.transformer(torch.cat([x, const], dim=1))
        return out[:, x.shape[1]:]  # (B, P, Dlm): the learned constants' positions


def build_mapping(config: ModelConfig, in_dim: int, in_tokens: int, out_dim: int) -> nn.Module:
    if config.mapping in ("linear", "linear-ln"):
        return LinearMapping(in_dim, out_dim, in_tokens, config.prefix_length, config.mapping == "linear-ln")
    if config.mapping == "mlp":
        return MLPMapping(in_dim, out_dim, config.prefix_length)
    return TransformerMapping(in_dim, out_dim, in_tokens, config.prefix_length, config.mapping_layers)


def prefix_length_of(config: ModelConfig, in_tokens: int) -> int:
    """How many prefix tokens the mapping produces."""
    if config.mapping in ("linear", "linear-ln") and in_tokens > 1:
        return in_tokens
    return config.prefix_length
