"""Request images: uploaded bytes, `data:` URLs and (when allowed) fetched URLs, each
checked against the server's limits before the model sees it.

Decoding runs in a worker thread (`asyncio.to_thread` in the app), never on the event
loop: a large PNG takes long enough to stall every other connection.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from gitcli.serve.errors import ApiError, bad_request, too_large

_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a fully decoded RGB image; 400 for anything that is not one, is truncated, or
    has more than `max_pixels` pixels (checked from the header, before decoding)."""
    if not data:
        raise bad_request("the image is empty", "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise bad_request(f"the image is {width}x{height} = {width * height} pixels, over the limit "
                                      f"of {max_pixels}", "image_too_many_pixels")
                img.load()
                return img.convert("RGB")
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise bad_request("the upload is not an image (PNG, JPEG, WebP, ...)", "invalid_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request("the image has too many pixels", "image_too_many_pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad_request(f"cannot decode the image: {exc}", "invalid_image") from None


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The payload of a `data:` URL (base64 or percent-encoded); 413 over `max_bytes`."""
    match = _DATA_URL.match(url)
    if match is None:
        raise bad_request("image_url is not a data: URL", "invalid_image_url")
    payload = url[match.end():]
    if match.group("b64"):
        if len(payload) * 3 // 4 > max_bytes + 2:  # before decoding: a base64 char carries 6 bits
            raise too_large(f"the image is over the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the data: URL's base64 is malformed", "invalid_image_url") from None
    else:
        from urllib.parse import unquote_to_bytes

        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise too_large(f"the image is over the limit of {max_bytes} bytes")
    return data


async def fetch_image(url: str, max_bytes: int) -> bytes:
    """An http(s) image through `gitcap fetch`'s downloader: its address policy (no private,
    loopback or link-local address, on every redirect hop) and its size limit."""
    from pathlib import Path

    from gitcli.fetch.config import FetchConfig
    from gitcli.fetch.http import Downloader
    from gitcli.fetch.outcomes import FetchFailure

    config = FetchConfig(tsv=Path("-"), out=Path("-"), max_bytes=max_bytes, retries=0, concurrency=4, per_host=4)
    try:
        async with Downloader(config) as downloader:
            return (await downloader.get(url)).body
    except FetchFailure as failure:
        if failure.outcome == "too_large":
            raise too_large(f"the image at the URL is over the limit of {max_bytes} bytes") from None
        raise bad_request(f"cannot fetch the image URL: {failure.outcome}: {failure.detail}"[:300],
                          "image_url_fetch_failed") from None
