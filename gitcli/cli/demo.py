"""`gitcap demo`: the whole life of a model on the built-in default, on a CPU.

Synthetic scenes -> train the tiny preset -> caption and question a held-out set ->
score (CIDEr, VQA exact match) beside the untrained model -> keep the checkpoint.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from gitcli.cli.common import console, user_errors

TRAIN_SCENES = 4000
QUESTIONS_PER_SCENE = 2  # with the caption: one caption in three examples
HELD_OUT_SCENES = 150
TRAIN_SEED, HELD_OUT_SEED = 0, 1
SETTINGS = dict(batch_size=32, lr=1e-3, warmup_steps=50, schedule="cosine", weight_decay=0.01)


@user_errors
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the run and its checkpoint go.")] = Path("gitcap-demo"),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps (the default fits in ~4 minutes on 2 cores).")] = 2000,
    train_scenes: Annotated[int, typer.Option("--train-scenes", min=10)] = TRAIN_SCENES,
    held_out: Annotated[int, typer.Option("--held-out", min=5, help="Held-out scenes scored.")] = HELD_OUT_SCENES,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="DataLoader workers (scenes are cheap to draw: 0 keeps both cores on the model).")] = 0,
) -> None:
    """Train the tiny preset on synthetic scenes, then caption, answer and score a held-out set.

    Example: gitcap demo && gitcap caption --checkpoint ./gitcap-demo my_scene.png
    """
    import torch
    from rich.table import Table

    from gitcli.config import DataConfig, GenerationConfig, TrainConfig
    from gitcli.data.sources import SyntheticImages, synthetic_records
    from gitcli.data.synthetic import make_scene
    from gitcli.cli.common import output_dir as output_dir_checked
    from gitcli.errors import GitcapError
    from gitcli.model.captioner import build_captioner
    from gitcli.model.checkpoint import load_checkpoint
    from gitcli.model.tiny import tiny_model_config
    from gitcli.train.loop import train
    from gitcli.train.validate import evaluate_records

    output_dir_checked(output_dir, option="--output-dir")  # a file in the way is said before training
    if (output_dir / "latest").exists():
        raise GitcapError(f"{output_dir} already holds a demo run; remove it or pass --output-dir")
    started = time.perf_counter()
    # Worker processes and intra-op threads share few cores; oversubscribing them makes
    # OpenMP spin and slows training several-fold, so threads get the cores workers leave.
    # Only ever fewer threads than the process has: a caller that already gave it fewer
    # (one per pytest-xdist worker, OMP_NUM_THREADS on a shared node) keeps its choice.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - num_workers)))
    model_cfg = tiny_model_config()
    data_cfg = DataConfig(source="synthetic", synthetic_size=train_scenes, synthetic_seed=TRAIN_SEED, task="both",
                          questions_per_scene=QUESTIONS_PER_SCENE, num_workers=num_workers)
    train_cfg = TrainConfig(output_dir=str(output_dir), max_steps=steps, save_every=steps, keep_last=1,
                            log_every=50, device="cpu", seed=0, **SETTINGS)
    command = (f"gitcap train --preset tiny --data synthetic --synthetic-size {train_scenes} --task both "
               f"--questions-per-scene {QUESTIONS_PER_SCENE} --num-workers {num_workers} "
               f"--max-steps {steps} --batch-size {SETTINGS['batch_size']} --lr {SETTINGS['lr']} "
               f"--warmup-steps {SETTINGS['warmup_steps']} --schedule cosine --weight-decay {SETTINGS['weight_decay']} "
               f"--device cpu --output-dir {shlex.quote(str(output_dir))}")
    console.print("[bold]gitcap demo[/]: tiny ViT + tiny OPT, trained from scratch on synthetic scenes")
    console.print(f"  training set: {train_scenes} scenes (seed {TRAIN_SEED}), each its caption + {QUESTIONS_PER_SCENE} of its questions")
    console.print(f"  held-out set: {held_out} scenes (seed {HELD_OUT_SEED}), 2 reference captions per image, all their questions")
    console.print(f"  equivalent command: [cyan]{command}[/]")

    held_records = synthetic_records(held_out, HELD_OUT_SEED, "both")
    refs = {str(i): make_scene(HELD_OUT_SEED, i).captions for i in range(held_out)}
    images = SyntheticImages(HELD_OUT_SEED)
    gen = GenerationConfig(max_new_tokens=24)

    with console.status("scoring the untrained model"):
        torch.manual_seed(0)
        untrained = build_captioner(model_cfg, device="cpu")  # what training starts from
        before = evaluate_records(untrained, held_records, images, refs, gen=gen, with_loss=False)
        del untrained
    result = train(model_cfg, data_cfg, train_cfg)
    with console.status("scoring the trained model"):
        trained = load_checkpoint(output_dir, device="cpu").eval()
        after = evaluate_records(trained, held_records, images, refs, gen=gen, with_loss=False)

    table = Table(title=f"held-out synthetic set: {after.captions} images, {after.questions} questions")
    table.add_column("model")
    table.add_column("CIDEr", justify="right")
    table.add_column("VQA exact match", justify="right")
    table.add_row("untrained", f"{before.cider:.3f}", f"{before.vqa_accuracy:.1%}")
    table.add_row(f"trained ({result.steps} steps)", f"{after.cider:.3f}", f"{after.vqa_accuracy:.1%}")
    console.print(table)
    examples = Table(title="examples (held-out)")
    for col in ("question", "reference", "output"):
        examples.add_column(col)
    for ex in after.examples[:6]:
        examples.add_row(ex["question"] or "(caption)", ex["target"], ex["output"])
    console.print(examples)
    from gitcli.config import write_json

    write_json(output_dir / "demo.json", {
        "train_scenes": train_scenes, "train_seed": TRAIN_SEED, "questions_per_scene": QUESTIONS_PER_SCENE,
        "held_out_scenes": held_out, "held_out_seed": HELD_OUT_SEED, "references_per_image": 2,
        "steps": result.steps, "equivalent_command": command,
        "untrained": {"CIDEr": before.cider, "vqa_exact_match": before.vqa_accuracy},
        "trained": {"CIDEr": after.cider, "vqa_exact_match": after.vqa_accuracy},
        "examples": after.examples, "seconds": round(time.perf_counter() - started, 1)})
    console.print(f"done in {time.perf_counter() - started:.0f} s; checkpoint: {output_dir} "
                  f"(try: gitcap caption --checkpoint {output_dir} IMAGE)")
