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
QuantOpt = Annotated[str, typer.Option(
    "--quant", help="Hold the frozen LM's linear layers quantised: none, bnb-int8 (bitsandbytes LLM.int8), "
                    "int8-weight (torchao int8 weights), int8-dynamic (int8 weights and activations), "
                    "fp8 (float8, GPUs of compute capability 8.9+).")]
Int8Opt = Annotated[bool, typer.Option("--int8", help="The same as --quant bnb-int8.")]
TrainVisionOpt = Annotated[bool, typer.Option("--train-vision", help="Train the vision tower too.")]
LoraOpt = Annotated[int, typer.Option("--lora", min=0, help="LoRA rank on the LM (0 = none).")]
TrainLmOpt = Annotated[bool, typer.Option("--train-lm", help="Fully tune the LM.")]


def resolve_quant(quant: str, int8: bool) -> str:
    """--int8 is the older name of --quant bnb-int8; both at once must agree."""
    from gitcli.errors import GitcapError

    if int8 and quant not in ("none", "bnb-int8"):
        raise GitcapError(f"--int8 means --quant bnb-int8; give one of --int8 and --quant {quant}")
    return "bnb-int8" if int8 else quant


def model_config_from_options(*, preset, vision, vision_pretrained, lm, mapping, prefix_length, grid, quant, int8,
                              dtype, train_vision, lora, train_lm):
    """Typed options -> ModelConfig (the tiny preset fills what was left at its default)."""
    from gitcli.cli.common import given_on_command_line
    from gitcli.config import ModelConfig
    from gitcli.errors import GitcapError

    quant = resolve_quant(quant, int8)

    if preset is not None:
        if preset != "tiny":
            raise GitcapError(f"unknown preset {preset!r}; the built-in preset is: tiny")
        mixed = given_on_command_line("vision", "vision_pretrained", "lm", "mapping", "prefix_length", "grid",
                                       "train_vision", "train_lm")
        if mixed:
            names = ", ".join("--" + name.replace("_", "-") for name in mixed)
            raise GitcapError(f"--preset tiny builds its own model; it cannot be combined with {names}")
        from gitcli.model.tiny import tiny_model_config

        # everything of the tiny preset trains, except a quantised LM (frozen; LoRA adapters may train)
        return tiny_model_config(dtype=dtype, lora_rank=lora, quant=quant, train_lm=not (quant != "none" or lora))
    return ModelConfig(vision=vision, vision_pretrained=vision_pretrained, lm=lm, mapping=mapping,
                       prefix_length=prefix_length, grid=grid, quant=quant, dtype=dtype,
                       train_vision=train_vision, lora_rank=lora, train_lm=train_lm)
