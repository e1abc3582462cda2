"""Helpers of the tests that train: a fixed synthetic batch and a short run's losses."""

import torch

from gitcli.data.datasets import Collator, RecordDataset
from gitcli.data.sources import SyntheticImages, synthetic_records

# The frozen LM here is random: the prefix (or small adapters) can steer it only so far, so
# the test asks for a clear fall, not a dramatic one.
FALL = 0.92


def fixed_batch(model, task, n=8):
    records = synthetic_records(4, 5, task)[:n]
    ds = RecordDataset(records, SyntheticImages(5), model.image_transform(), model.tokenizer, model.config)
    return Collator(model.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def loss_falls(model, task, steps=40, lr=1e-2):
    batch = fixed_batch(model, task)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss, _ = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses
