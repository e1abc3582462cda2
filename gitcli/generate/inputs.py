"""What the LM reads before its first new token: `[pad | image prefix | prompt]`.

The prompt text comes from `gitcli.data.text.prompt_text` (the template, shared with
training's collation, which must build the very same prompt); here it is encoded
left-padded and joined to the image prefix. Public because every decoder needs it: the
batch step of `generate_for_images`, and a server that prepares each request on its own
before it joins a running batch.
"""

from __future__ import annotations

import torch

from gitcli.config import ModelConfig
from gitcli.data.text import encode_prompts, prompt_text


def prompts_for(config: ModelConfig, questions: list[str | None]) -> list[str]:
    """One prompt per image: the caption prompt for None, the question template otherwise."""
    return [prompt_text(config, q) for q in questions]


def prepare_inputs(captioner, prefix: torch.Tensor, prompts: list[str]):
    """(B, P, D) image prefix + B prompt texts -> (inputs_embeds, attention_mask, position_ids),
    left-padded so that every row's last real token sits in the last column."""
    ids, mask = encode_prompts(captioner.tokenizer, prompts)
    return captioner.join(prefix, ids.to(prefix.device), mask.to(prefix.device), left_pad=True)
