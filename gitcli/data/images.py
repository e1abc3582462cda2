"""Opening images safely: RGB, fully decoded, with one clear error per bad file."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from gitcli.errors import GitcapError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = 10_000 * 10_000  # refuse decompression bombs early


def open_rgb(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode fully (so truncation is found now, not in a worker later) and convert to RGB."""
    label = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise GitcapError(f"image not found: {label}") from None
    except IsADirectoryError:
        raise GitcapError(f"{label} is a directory, not an image") from None
    try:
        with fh, Image.open(fh) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise GitcapError(f"{label} is not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise GitcapError(f"cannot decode {label}: {exc}") from None


def expand_image_paths(inputs: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files, sorted by name."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise GitcapError(f"no images in folder {item}")
            paths.extend(found)
        elif item.exists():
            paths.append(item)
        else:
            raise GitcapError(f"image not found: {item}")
    return paths
