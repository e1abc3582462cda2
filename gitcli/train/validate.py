"""Validation: loss, and the task's score from generated outputs (CIDEr, VQA accuracy).

One implementation serves `train --val-data` (choosing `best/`) and the demo's
trained-versus-untrained table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from gitcli.config import GenerationConfig
from gitcli.data.datasets import Record
from gitcli.data.text import encode_pair, pad_right
from gitcli.dist import autocast
from gitcli.errors import GitcapError
from gitcli.generate import generate_for_images, prompts_for


@dataclass
class Evaluation:
    loss: float | None = None
    cider: float | None = None  # over caption records
    vqa_accuracy: float | None = None  # exact match after VQA answer normalisation
    examples: list[dict] = field(default_factory=list)
    captions: int = 0
    questions: int = 0

    @property
    def score(self) -> float | None:
        """What `best/` is chosen by: CIDEr when there are captions, else VQA accuracy."""
        return self.cider if self.cider is not None else self.vqa_accuracy

    def as_dict(self) -> dict:
        return {"loss": self.loss, "CIDEr": self.cider, "vqa_accuracy": self.vqa_accuracy, "score": self.score,
                "captions": self.captions, "questions": self.questions, "examples": self.examples[:4]}


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def evaluate_records(model, records: list[Record], load_image, references: dict[str, list[str]] | None = None,
                     *, batch_size: int = 64, precision: str = "fp32", gen: GenerationConfig | None = None,
                     answer_tokens: int = 8, with_loss: bool = True) -> Evaluation:
    """Generate for every record and score: captions by CIDEr against `references[key]`
    (default: the record's own target), answers by normalised exact match.

    Captions and questions are batched apart, and answers (short by nature) decode at
    most `answer_tokens` tokens, so neither waits for the other's length.
    """
    from gitcli.evaluate.captions import score_captions
    from gitcli.evaluate.vqa import exact_match_accuracy

    gen = gen or GenerationConfig(max_new_tokens=24)
    answer_gen = dataclasses.replace(gen, max_new_tokens=min(gen.max_new_tokens, answer_tokens))
    was_training = model.training
    model.eval()
    result = Evaluation()
    cap_out: dict[str, str] = {}
    cap_refs: dict[str, list[str]] = {}
    preds, answers = [], []
    loss_sum, loss_n = 0.0, 0
    transform = model.image_transform()
    captions = [r for r in records if r.question is None]
    questions = [r for r in records if r.question is not None]
    for group, group_gen in ((captions, gen), (questions, answer_gen)):
        for chunk in _batches(group, batch_size):
            outs, loss = _decode(model, chunk, load_image, transform, group_gen, precision, with_loss)
            if loss is not None:
                loss_sum, loss_n = loss_sum + loss * len(chunk), loss_n + len(chunk)
            for rec, out in zip(chunk, outs):
                if rec.question is None:
                    key = rec.key or str(len(cap_out))
                    cap_out[key] = out.text
                    cap_refs[key] = (references or {}).get(key, [rec.target])
                else:
                    preds.append(out.text)
                    answers.append(rec.target)
                shown = [e for e in result.examples if (e["question"] is None) == (rec.question is None)]
                if len(shown) < 3:  # a few of each kind
                    result.examples.append({"question": rec.question, "target": rec.target, "output": out.text})
    model.train(was_training)
    result.loss = loss_sum / loss_n if loss_n else None
    result.captions, result.questions = len(cap_out), len(preds)
    if cap_out:
        result.cider = score_captions(cap_out, cap_refs, ("CIDEr",))["CIDEr"]
    if preds:
        result.vqa_accuracy = exact_match_accuracy(preds, answers)
    return result


def _decode(model, chunk: list[Record], load_image, transform, gen: GenerationConfig, precision: str,
            with_loss: bool):
    """One batch: (generations, mean loss or None)."""
    device = model.device
    pixels = torch.stack([transform(load_image(r.image)) for r in chunk]).to(device)
    questions = [r.question for r in chunk]
    loss = None
    with autocast(precision, device):
        prefix = model.image_prefix(pixels)  # computed once: the loss and the decoding share it
        if with_loss:
            prompts = prompts_for(model.config, questions)
            rows = [encode_pair(model.tokenizer, p, r.target) for p, r in zip(prompts, chunk)]
            batch = pad_right([x[0] for x in rows], [x[1] for x in rows], model.tokenizer.pad_token_id)
            loss = float(model(None, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               batch["labels"].to(device), prefix=prefix)[0])
    outs = generate_for_images(model, pixels, questions, gen, precision=precision, prefix=prefix)
    return outs, loss


def make_validator(val_data, samples: int, train_data, synthetic_seed: int | None = None) -> Callable:
    """A validator for `train --val-data`: `val_data` is a DataConfig of any training source.

    `synthetic` means a held-out synthetic set: the scenes of `synthetic_seed` (default:
    `TrainConfig.val_synthetic_seed`), which must not be the training scenes' seed.
    Otherwise caption records are reduced to one per image, scored against all of that
    image's captions, and questions are scored one by one; the first `samples` items count.
    """
    from gitcli.data.sources import SyntheticImages, build_source, synthetic_records
    from gitcli.data.synthetic import make_scene

    if val_data.source == "synthetic":
        from gitcli.config import TrainConfig

        seed = TrainConfig.val_synthetic_seed if synthetic_seed is None else synthetic_seed
        if train_data.source == "synthetic" and train_data.synthetic_seed == seed:
            raise GitcapError(f"--val-data synthetic would score the training scenes (both seed {seed}); "
                              "validate on other scenes")
        scenes = max(1, samples // 8)
        records = synthetic_records(scenes, seed, train_data.task)[:samples]
        refs = {str(i): make_scene(seed, i).captions for i in range(scenes)}
        loader = SyntheticImages(seed)
    else:
        all_records, loader, _ = build_source(val_data)
        refs: dict[str, list[str]] = {}
        records = []
        for rec in all_records:
            if rec.question is not None:
                records.append(rec)
            elif rec.key not in refs:
                refs[rec.key] = [rec.target]
                records.append(rec)
            else:
                refs[rec.key].append(rec.target)
        records = records[:samples]

    def validator(model, step: int) -> dict:
        return evaluate_records(model, records, loader, refs).as_dict()

    return validator
