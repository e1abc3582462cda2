"""Opening images safely: RGB, fully decoded, with one clear error per bad file."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from gitcli.errors import GitcapError
from gitcli.formats.images import ACCEPTED_FORMATS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = 10_000 * 10_000  # Pillow's own backstop; open_rgb refuses far earlier
# The same limit as `gitcap fetch --max-pixels`: a sub-megabyte PNG can declare enough
# pixels to take gigabytes to decode, so the header's size is checked before decoding.
MAX_PIXELS = 50_000_000
# fetch's formats that this Pillow registers: Pillow 13 opens MPO through its JPEG plugin
# and has no "MPO" opener, which Image.open(formats=...) would fail on with a KeyError
Image.init()
OPEN_FORMATS = tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


class TooManyPixels(GitcapError):
    """The image's header declares more pixels than the limit (it was not decoded)."""


def open_rgb(source: str | Path | bytes, name: str | None = None, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully (so truncation is found now, not in a worker later) and convert to RGB.

    Only the formats a photo comes in are read (those fetch accepts: no PDF, EPS, PSD...),
    and an image over `max_pixels` is refused from its header, before any pixel is decoded.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise GitcapError(f"image not found: {label}") from None
    except IsADirectoryError:
        raise GitcapError(f"{label} is a directory, not an image") from None
    try:
        with fh, Image.open(fh, formats=OPEN_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise TooManyPixels(f"{label} is {width}x{height}, more than the limit of {max_pixels} pixels; "
                                    "refused before decoding")
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise GitcapError(f"{label} is not an image ({', '.join(OPEN_FORMATS)})") from None
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
