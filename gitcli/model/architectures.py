"""The shapes of the published LMs that gitcap's aliases name, written out so that sizing
(`train --dry-run`) and benchmarking (`gitcap bench`) need no hub access: an alias or its
hub id builds its transformers config from this table, offline. `lm_config` also reads a
local directory with a `config.json`, or a config already in the Hugging Face cache.
The numbers match the shared naive baseline's models (opt-2.7b, gpt2-large, llama-7b).
"""

from __future__ import annotations

from pathlib import Path

from gitcli.config import LM_ALIASES
from gitcli.errors import GitcapError


def _opt(hidden: int, layers: int, heads: int, ffn: int) -> tuple[str, dict]:
    return "opt", dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                       word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048,
                       do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def _gpt2(hidden: int, layers: int, heads: int) -> tuple[str, dict]:
    return "gpt2", dict(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=50257, n_positions=1024)


def _llama(hidden: int, layers: int, heads: int, ffn: int) -> tuple[str, dict]:
    return "llama", dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=ffn, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)


# short name -> (transformers model type, config fields of the published checkpoint)
LM_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "opt-125m": _opt(768, 12, 12, 3072),
    # opt-350m alone projects its 512-wide embeddings up to the 1024-wide layers, post-norm
    "opt-350m": ("opt", {**_opt(1024, 24, 16, 4096)[1], "word_embed_proj_dim": 512, "do_layer_norm_before": False}),
    "opt-1.3b": _opt(2048, 24, 32, 8192),
    "opt-2.7b": _opt(2560, 32, 32, 10240),
    "opt-6.7b": _opt(4096, 32, 32, 16384),
    "llama-7b": _llama(4096, 32, 32, 11008),
}
# the hub ids `--lm` aliases resolve to name the same shapes
_BY_HUB_ID = {LM_ALIASES[name]: name for name in LM_ARCHITECTURES if name in LM_ALIASES}


class UnknownArchitecture(GitcapError):
    """`name` is no alias, no directory with a config.json, and not in the cache."""

    def __init__(self, name: str) -> None:
        known = ", ".join(LM_ARCHITECTURES)
        super().__init__(f"unknown LM architecture {name!r}; use one of {known}, or a directory with a config.json")
        self.name = name


def lm_config(name: str, *, layers: int | None = None):
    """The transformers config `--lm NAME` stands for; `layers` shrinks it (sizing, tests)."""
    from transformers import AutoConfig

    short = _BY_HUB_ID.get(name, name)
    if short in LM_ARCHITECTURES:
        model_type, fields = LM_ARCHITECTURES[short]
        config = AutoConfig.for_model(model_type, **fields)
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise GitcapError(f"{name!r} has no config.json to build the LM from")
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise GitcapError(f"cannot read the LM config in {name!r}: {str(exc).splitlines()[0]}") from None
    else:
        try:  # a hub model whose config is already cached; never a download
            config = AutoConfig.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            raise UnknownArchitecture(name) from None
    if layers is not None:
        config.num_hidden_layers = layers  # attribute_map turns this into n_layer for GPT-2
    return config
