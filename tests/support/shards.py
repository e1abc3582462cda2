"""Hostile tar shards for the reader's tests."""

from __future__ import annotations

import io
import tarfile

from gitcli.formats.shards import row_key


def sparse_member_tar(path, declared: int, then_keys=(1,)) -> None:
    """A tar whose first member, 000000000.jpg, is an old-GNU sparse file declaring
    `declared` bytes while storing 512: a few KB on disk that claim gigabytes."""
    info = tarfile.TarInfo("000000000.jpg")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512  # what is stored
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % 0  # one data region: offset 0 ...
    header[398:410] = b"%011o\0" % 512  # ... 512 bytes long
    header[483:495] = b"%011o\0" % declared  # the size the member claims
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    rest = io.BytesIO()
    with tarfile.open(fileobj=rest, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for k in then_keys:
            for ext, data in (("jpg", f"jpeg{k}".encode()), ("txt", f"caption {k}".encode())):
                member = tarfile.TarInfo(f"{row_key(k)}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    path.write_bytes(bytes(header) + b"\xff" * 512 + rest.getvalue())
