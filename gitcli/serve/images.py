"""Request images: uploaded bytes, `data:` URLs and (when allowed) fetched URLs, each
checked against the server's limits before the model sees it.

Decoding runs in a worker thread (`asyncio.to_thread` in the app), never on the event
loop: a large PNG takes long enough to stall every other connection.
"""

from __future__ import annotations

import base64
import binascii
import re

from PIL import Image

from gitcli.data.images import TooManyPixels, open_rgb
from gitcli.errors import GitcapError
from gitcli.serve.errors import bad_request, too_large

_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a fully decoded RGB image, opened as every gitcap command opens one
    (`data.images.open_rgb`: photo formats only, the pixel limit checked from the header
    before decoding); 400 for anything that is not one, is truncated, or is too large."""
    if not data:
        raise bad_request("the image is empty", "invalid_image")
    try:
        return open_rgb(data, "the upload", max_pixels=max_pixels)
    except TooManyPixels as exc:
        raise bad_request(str(exc), "image_too_many_pixels") from None
    except GitcapError as exc:
        raise bad_request(str(exc), "invalid_image") from None


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
