"""Options that choose and build a model (train, bench), shared so they read the same."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

VisionOpt = Annotated[str, typer.Option("--vision", help="open_clip tower: RN50, ViT-B-32, ViT-L-14, ViT-L/14, ...")]
VisionPretrainedOpt = Annotated[
    Optional[str], typer.Option("--vision-pretrained", help="open_clip pretrained tag (openai, laion2b_...) or a local weights file.")
]
LmOpt = Annotated[str, typer.Option("--lm", help="Causal LM: hub id, local directory, or gpt2 / gpt2-large / opt-2.7b / llama-7b.")]
MappingOpt = Annotated[str, typer.Option("--mapping", help="linear, linear-ln (GIT), mlp (ClipCap), transformer (ClipCap).")]
PrefixLengthOpt = Annotated[int, typer.Option("--prefix-length", min=1, help="Prefix tokens for mlp/transformer (and pooled linear).")]
GridOpt = Annotated[bool, typer.Option("--grid/--pooled", help="Patch-grid features instead of the pooled embedding.")]
Int8Opt = Annotated[bool, typer.Option("--int8", help="Load the LM 8-bit with bitsandbytes.")]
TrainVisionOpt = Annotated[bool, typer.Option("--train-vision", help="Train the vision tower too.")]
LoraOpt = Annotated[int, typer.Option("--lora", min=0, help="LoRA rank on the LM (0 = none).")]
TrainLmOpt = Annotated[bool, typer.Option("--train-lm", help="Fully tune the LM.")]


def model_config_from_options(*, preset, vision, vision_pretrained, lm, mapping, prefix_length, grid, int8, dtype,
                              train_vision, lora, train_lm):
    """Typed options -> ModelConfig (the tiny preset fills what was left at its default)."""
    from gitcli.cli.common import given_on_command_line
    from gitcli.config import ModelConfig
    from gitcli.errors import GitcapError

    if preset is not None:
        if preset != "tiny":
            raise GitcapError(f"unknown preset {preset!r}; the built-in preset is: tiny")
        mixed = given_on_command_line("vision", "vision_pretrained", "lm", "mapping", "prefix_length", "grid",
                                       "train_vision", "train_lm")
        if mixed:
            names = ", ".join("--" + name.replace("_", "-") for name in mixed)
            raise GitcapError(f"--preset tiny builds its own model; it cannot be combined with {names}")
        from gitcli.model.tiny import tiny_model_config

        # everything of the tiny preset trains, except an 8-bit LM (LoRA adapters instead)
        return tiny_model_config(dtype=dtype, lora_rank=lora, int8=int8, train_lm=not (int8 or lora))
    return ModelConfig(vision=vision, vision_pretrained=vision_pretrained, lm=lm, mapping=mapping,
                       prefix_length=prefix_length, grid=grid, int8=int8, dtype=dtype,
                       train_vision=train_vision, lora_rank=lora, train_lm=train_lm)
