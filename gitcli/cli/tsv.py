"""`gitcap tsv images|captions|questions`: build GIT TSVs (and their line indexes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gitcli.cli.common import console, output_file, user_errors

app = typer.Typer(
    name="tsv",
    help="Build GIT TSVs (image, caption, question) with their .lineidx/.lineidx.8b from image folders and COCO/VQA files.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="TSV file to write (its .lineidx and .lineidx.8b beside it).")]
SplitOpt = Annotated[Optional[Path], typer.Option("--split", help="Karpathy split file (dataset_coco.json): keep one split, in its order.")]
SplitNameOpt = Annotated[str, typer.Option("--split-name", help="Which Karpathy split: test, val, train or restval.")]


@app.command("images")
@user_errors
def images(
    source: Annotated[Path, typer.Argument(help="An image folder (keys: file stems) or a COCO annotation JSON (keys: image ids).")],
    out: OutOpt,
    image_root: Annotated[Optional[Path], typer.Option("--image-root", help="Folder the COCO JSON's file_name entries are in (e.g. val2014/).")] = None,
    split: SplitOpt = None,
    split_name: SplitNameOpt = "test",
) -> None:
    """Image TSV: key<TAB>base64 of the JPEG/PNG bytes, as stored.

    Examples:

        gitcap tsv images photos/ --out photos.img.tsv

        gitcap tsv images captions_val2014.json --image-root val2014/ --split dataset_coco.json --out test.img.tsv
    """
    from gitcli.errors import GitcapError
    from gitcli.formats.coco import read_karpathy_split
    from gitcli.formats.tsv_build import build_image_tsv, coco_images, folder_images
    from gitcli.progress import ProgressBar

    output_file(out)
    if source.is_dir():
        if split is not None:
            raise GitcapError("--split selects COCO ids; it needs a COCO annotation JSON, not a folder")
        pairs = folder_images(source)
    else:
        if image_root is None:
            raise GitcapError("a COCO JSON names files, not folders: pass --image-root (e.g. val2014/)")
        keys = read_karpathy_split(split, split_name) if split is not None else None
        pairs = coco_images(source, image_root, keys)
    with ProgressBar("images", total=len(pairs), console=console, transient=True) as bar:
        rows = build_image_tsv(pairs, out, progress=bar.show)
    console.print(f"wrote {rows} images to {out}")


@app.command("captions")
@user_errors
def captions(
    coco_json: Annotated[Path, typer.Argument(help="COCO caption annotation JSON (e.g. captions_val2014.json).")],
    out: OutOpt,
    split: SplitOpt = None,
    split_name: SplitNameOpt = "test",
) -> None:
    """Caption TSV: key<TAB>[{"caption": ...}, ...] for every image (or one Karpathy split).

    Example:

        gitcap tsv captions captions_val2014.json --split dataset_coco.json --out test.caption.tsv
    """
    from gitcli.formats.tsv_build import build_caption_tsv

    output_file(out)
    rows = build_caption_tsv(coco_json, out, split=split, split_name=split_name)
    console.print(f"wrote {rows} caption rows to {out}")


@app.command("questions")
@user_errors
def questions(
    questions_json: Annotated[Path, typer.Argument(help="Official VQA questions JSON.")],
    images_tsv: Annotated[Path, typer.Option("--images", help="The image TSV the rows must align with.")],
    out: OutOpt,
) -> None:
    """Question TSV: key<TAB>[{"question": ..., "question_id": N}, ...], row by row aligned with --images.

    Example:

        gitcap tsv questions v2_OpenEnded_mscoco_val2014_questions.json --images val.img.tsv --out val.question.tsv
    """
    from gitcli.formats.tsv_build import build_question_tsv

    output_file(out)
    rows, empty = build_question_tsv(questions_json, images_tsv, out)
    if empty:
        console.print(f"{empty} images have no question: their rows hold [] (nothing to answer)")
    console.print(f"wrote {rows} question rows to {out}")
