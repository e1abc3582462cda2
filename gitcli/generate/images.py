"""One decoding step from images to text: the function every caller of the decoder uses
(caption, ask, infer-tsv, validation, the server)."""

from __future__ import annotations

import torch

from gitcli.config import GenerationConfig
from gitcli.dist import autocast
from gitcli.generate.decode import Generation, generate
from gitcli.generate.inputs import prompts_for


@torch.no_grad()
def generate_for_images(captioner, pixel_values: torch.Tensor, questions: list[str | None] | None,
                        config: GenerationConfig, *, precision: str = "fp32",
                        prefix: torch.Tensor | None = None) -> list[Generation]:
    """(B, 3, H, W) images, each with its question (None: a caption) -> B generations.

    Runs under `precision`'s autocast on the captioner's device. `prefix` (B, P, D), when
    the caller has already computed it (validation, for its loss), is reused as it is.
    """
    device = captioner.device
    batch = pixel_values.shape[0] if prefix is None else prefix.shape[0]
    prompts = prompts_for(captioner.config, questions if questions is not None else [None] * batch)
    with autocast(precision, device):
        pixels = pixel_values.to(device) if prefix is None else pixel_values  # unused with a prefix
        return generate(captioner, pixels, prompts, config, prefix=prefix)
