"""Validate and normalise one downloaded image: decode, RGB, resize, re-encode as JPEG.

Cheap checks come first: the header gives the dimensions before any pixel is decoded
(so a PNG declaring 100000x100000 costs nothing), and JPEGs are decoded in draft mode at
the smallest DCT scale that still covers the target size (1/2, 1/4 or 1/8 of the work).
A JPEG that needs no resize is verified by decoding but kept byte for byte (no second
lossy encode). Runs in worker processes; PIL only, no torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

RESIZE_MODES = ("keep-ratio", "center-crop", "none")
# the formats a web image plausibly has; anything else (HTML, PDF, SVG...) is not an image.
# MPO (a JPEG with extra frames) is not listed: Pillow opens it through its JPEG opener,
# and naming it makes Pillow raise KeyError('MPO') for any unrecognised bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"


class ImageRejected(Exception):
    """The bytes are not a usable image; `cause` is the outcome name recorded for the row."""

    def __init__(self, cause: str, detail: str = ""):
        super().__init__(cause, detail)
        self.cause = cause
        self.detail = detail


@dataclass(frozen=True)
class ImageSettings:
    resize: int = 0  # target shortest side (keep-ratio) or square side (center-crop); 0 = none
    mode: str = "keep-ratio"
    jpeg_quality: int = 95
    max_pixels: int = 50_000_000  # refused before decoding: decompression bombs


@dataclass(frozen=True)
class NormalizedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def target_size(width: int, height: int, s: ImageSettings) -> tuple[int, int]:
    """Output size for an input size (before any center crop)."""
    if s.mode == "none" or s.resize <= 0:
        return width, height
    scale = s.resize / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels become white, not whatever colour hides under alpha 0
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def normalize_image(data: bytes, s: ImageSettings) -> NormalizedImage:
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except Exception:  # PIL raises many types for garbage; all mean "not an image"
        raise ImageRejected("not_an_image", _not_an_image(data)) from None
    ow, oh = im.size
    if ow < 1 or oh < 1:
        raise ImageRejected("not_an_image", "zero-sized image")
    if ow * oh > s.max_pixels:
        raise ImageRejected("too_many_pixels", f"{ow}x{oh} > {s.max_pixels} pixels")
    tw, th = target_size(ow, oh, s)
    kind = f"{im.format} {im.mode}"  # `im` is replaced as it is converted
    try:
        if im.format == "JPEG" and (tw, th) == (ow, oh) and im.mode == "RGB" and s.mode != "center-crop":
            im.load()  # verify every scan decodes (truncated files fail here)
            return NormalizedImage(bytes(data), ow, oh, ow, oh)
        if im.format == "JPEG" and tw < ow:
            # decode at 1/2, 1/4 or 1/8 scale, never below the target size
            im.draft("RGB", (tw, th))
        im = _to_rgb(im)  # loads the pixels
        if s.mode == "center-crop" and s.resize > 0:
            im = _center_crop(im, ow, oh, s.resize)
        elif im.size != (tw, th):
            im = im.resize((tw, th), _filter(im.size, (tw, th)))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=s.jpeg_quality)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated / corrupt data
        raise ImageRejected("decode_error", f"corrupt or truncated {kind} image: {str(exc)[:160]}") from None
    except Exception:
        # anything else is Pillow meeting a variant it cannot decode in full (KeyError,
        # NotImplementedError, struct.error...): the row's outcome, never a crash
        raise ImageRejected("unsupported_image", f"a {kind} image that gitcap cannot decode") from None
    return NormalizedImage(out.getvalue(), im.width, im.height, ow, oh)


def _not_an_image(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if not data:
        return "empty body"
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg", b"<")):
        return f"not a {_FORMAT_NAMES} image (an HTML/XML page)"
    return f"not a {_FORMAT_NAMES} image"


def _filter(size: tuple[int, int], target: tuple[int, int]) -> int:
    """Area averaging (BOX) to shrink -- what OpenCV's INTER_AREA does, the usual choice
    for dataset downscaling, and half the cost of bicubic; bicubic to enlarge."""
    return Image.BOX if target[0] <= size[0] and target[1] <= size[1] else Image.BICUBIC


def _center_crop(im: Image.Image, ow: int, oh: int, side: int) -> Image.Image:
    """Shortest side to `side`, then the central square, in one resampling pass.
    The crop box is in the coordinates of the (possibly draft-reduced) decoded image."""
    w, h = im.size
    short = min(w, h)
    left = (w - short) / 2
    top = (h - short) / 2
    return im.resize((side, side), _filter((short, short), (side, side)), box=(left, top, left + short, top + short))


def probe_size(data: bytes) -> tuple[int, int] | None:
    """Header dimensions without decoding, or None if the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            return im.size
    except Exception:
        return None


__all__ = ["ImageRejected", "ImageSettings", "NormalizedImage", "RESIZE_MODES", "normalize_image", "target_size", "probe_size"]
