"""Turning prompts and targets into token ids, labels and padded batches.

Training sequences are `prompt + target + EOS`, right-padded; only target and EOS carry
labels (prompt and padding are -100, and the image prefix gets no label at all). Prompts
for generation are left-padded so that every row's next token sits in the last column.
"""

from __future__ import annotations

import torch

from gitcli.config import ModelConfig

IGNORE = -100


def prompt_text(config: ModelConfig, question: str | None) -> str:
    """The text between the image prefix and the output."""
    if question is None:
        return config.caption_prompt
    # plain replacement: the template's only placeholder is {question} (ModelConfig.validate)
    return config.question_template.replace("{question}", question.strip())


def target_text(prompt: str, target: str) -> str:
    # BPE vocabularies fold the space into the next word: after a prompt the target
    # starts with one, right after the image prefix it does not.
    return (" " + target.strip()) if prompt else target.strip()


def encode_pair(tokenizer, prompt: str, target: str, max_target_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels) of one training example, EOS appended to the target."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    target_ids = tokenizer(target_text(prompt, target), add_special_tokens=False)["input_ids"]
    if max_target_tokens is not None:
        target_ids = target_ids[: max_target_tokens - 1]
    target_ids = target_ids + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids


def pad_right(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_t[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, (B, T); T may be 0 when every prompt is empty."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in prompts]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask
