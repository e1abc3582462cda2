"""A store of precomputed image features (`gitcap train --cache-features DIR`).

A frozen vision tower maps each image to the same features every epoch, so they can be
computed once and read back instead of decoding the image and running the tower (as
ClipCap trains). This module knows tensors and files only; what fills the store (a model)
lives in `gitcli.train.features`.

Layout of DIR:

    meta.json                     identity of tower + data, image count, chunk size, shape, dtype
    chunk-00000.safetensors       "features" (n, N, D) fp16 and "ok" (n,) uint8, images [0, n)
    chunk-00001.safetensors       images [chunk, 2*chunk), ...

Each chunk is written to a temporary name and renamed, so a chunk that exists is complete:
an interrupted pass leaves whole chunks behind and the next one computes only the missing
ones. Images are numbered in sorted order of their references (several records, e.g. the
questions about one image, share one entry): the same images give the same cache whatever
order or subset of questions or captions refers to them, and a pass over tar shards reads
each shard front to back.

Features are stored as fp16: half the disk of fp32, and what the frozen tower produces on a
GPU (bf16) converts to fp16 without loss (fp16 has more mantissa bits; CLIP features lie far
inside its range), while fp32 features round by at most 2^-11 relative, eight times finer
than the bf16 autocast the LM then runs under.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gitcli.config import read_json, write_json
from gitcli.errors import GitcapError
from gitcli.formats.atomic import TMP_MARK, publish_file, temporary_path

FORMAT = "gitcap-features"
FORMAT_VERSION = 1
META_FILE = "meta.json"
STORE_DTYPE = torch.float16
FP16_MAX = 65504.0
CHUNK_BYTES = 256 * 1024**2  # per chunk file: small enough to rewrite, few enough files


def unique_images(records: Sequence) -> tuple[list[Any], list[int]]:
    """-> (distinct image references, sorted; each record's position among them)."""
    distinct = {rec.image for rec in records}
    try:
        refs = sorted(distinct)
    except TypeError:  # references of mixed kinds: no source makes them, but order them anyway
        refs = sorted(distinct, key=repr)
    position = {ref: i for i, ref in enumerate(refs)}
    return refs, [position[rec.image] for rec in records]


def source_digest(refs: Sequence[Any], loader: Any) -> str:
    """A digest of which images, in which order, through which loader (and its settings, such as
    the synthetic seed or the TSV path): a cache is only valid for the images it was built from.
    File contents are not hashed (that would read every image again); a path names an image."""
    h = hashlib.sha256()
    settings = {k: v for k, v in sorted(vars(loader).items()) if not k.startswith("_")}
    h.update(json.dumps([type(loader).__name__, settings], default=str).encode())
    for ref in refs:
        h.update(json.dumps(ref, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _normal(value: Any) -> Any:
    """What a value reads back as from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


class FeatureStore:
    """The files of one cache directory, for writing (the filling pass) and checking."""

    def __init__(self, root: Path, meta: dict) -> None:
        self.root = Path(root)
        self.meta = meta

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def prepare(cls, root: str | Path, identity: dict, images: int, shape: Sequence[int], *,
                create: bool, chunk: int | None = None) -> FeatureStore:
        """Open the store at `root` for this identity, creating it when `create` (rank 0).

        A store built for another tower, weights, preprocessing, feature kind or data is
        refused rather than rebuilt: it may have cost hours of GPU time, and a mistyped
        option must not silently delete it.
        """
        root = Path(root)
        identity = _normal(identity)
        shape = [int(s) for s in shape]
        meta_path = root / META_FILE
        if meta_path.is_file():
            meta = read_json(meta_path, what=f"feature cache {meta_path}")
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise GitcapError(f"{root} is not a gitcap feature cache; choose another --cache-features directory")
            if meta.get("format_version") != FORMAT_VERSION:
                raise GitcapError(f"feature cache {root} has format version {meta.get('format_version')}, "
                                  f"this gitcap writes {FORMAT_VERSION}; delete it or choose another directory")
            _check_identity(root, meta, identity, images, shape)
            return cls(root, meta)
        if not create:
            raise GitcapError(f"feature cache {root} has no {META_FILE}: every process must see the same "
                              "--cache-features directory (a shared file system)")
        if root.exists() and any(root.iterdir()):
            raise GitcapError(f"{root} is not empty and not a gitcap feature cache; choose another "
                              "--cache-features directory")
        per_image = max(1, shape[0] * shape[1] * STORE_DTYPE.itemsize)
        chunk = chunk or max(1, min(4096, CHUNK_BYTES // per_image))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "identity": identity, "images": int(images),
                "shape": shape, "dtype": "float16", "chunk": int(chunk)}
        root.mkdir(parents=True, exist_ok=True)
        write_json(meta_path, meta)
        return cls(root, meta)

    # ---- geometry -----------------------------------------------------------------------
    @property
    def images(self) -> int:
        return int(self.meta["images"])

    @property
    def chunk(self) -> int:
        return int(self.meta["chunk"])

    @property
    def chunks(self) -> int:
        return -(-self.images // self.chunk)

    def chunk_range(self, k: int) -> range:
        return range(k * self.chunk, min(self.images, (k + 1) * self.chunk))

    def chunk_path(self, k: int) -> Path:
        return self.root / f"chunk-{k:05d}.safetensors"

    def missing_chunks(self) -> list[int]:
        return [k for k in range(self.chunks) if not self.chunk_path(k).is_file()]

    def complete(self) -> bool:
        return not self.missing_chunks()

    # ---- writing ------------------------------------------------------------------------
    def write_chunk(self, k: int, features: torch.Tensor, ok: torch.Tensor) -> None:
        """Store chunk `k`: features (n, N, D) of its n images, `ok` (n,) false where the image
        could not be read (those records are skipped and counted, as in live training)."""
        from safetensors.torch import save_file

        n = len(self.chunk_range(k))
        if tuple(features.shape) != (n, *self.meta["shape"]) or tuple(ok.shape) != (n,):
            raise ValueError(f"chunk {k}: features {tuple(features.shape)} / ok {tuple(ok.shape)}, "
                             f"expected ({n}, {', '.join(map(str, self.meta['shape']))}) / ({n},)")
        features = features.detach().float()
        if features.numel() and float(features.abs().max()) > FP16_MAX:
            raise GitcapError("the tower's features exceed the fp16 range of the feature cache; "
                              "train without --cache-features")
        tensors = {"features": features.to(STORE_DTYPE).cpu().contiguous(),
                   "ok": ok.to(torch.uint8).cpu().contiguous()}
        path = self.chunk_path(k)
        tmp = temporary_path(path)
        save_file(tensors, tmp)
        publish_file(tmp, path)  # fsynced first: the rename never publishes data still in flight

    def clean_temporary(self) -> None:
        """Drop half-written chunks an interrupted pass left behind."""
        for tmp in self.root.glob(f".chunk-*{TMP_MARK}*"):
            tmp.unlink(missing_ok=True)

    def reader(self) -> FeatureReader:
        missing = self.missing_chunks()
        if missing:
            raise GitcapError(f"feature cache {self.root} is missing {len(missing)} of {self.chunks} chunks "
                              f"(first: {self.chunk_path(missing[0]).name}); run the caching pass again")
        return FeatureReader(self.root, self.chunk, self.images)


def _check_identity(root: Path, meta: dict, identity: dict, images: int, shape: list[int]) -> None:
    built = meta.get("identity", {})
    for key, ours in identity.items():
        if built.get(key) != ours:
            theirs, ours = _show(built.get(key)), _show(ours)
            raise GitcapError(f"feature cache {root} was built with a different {key} ({theirs}; this run: "
                              f"{ours}); choose another --cache-features directory or delete this one")
    if meta.get("images") != images or meta.get("shape") != shape:
        raise GitcapError(f"feature cache {root} holds {meta.get('images')} images of shape {meta.get('shape')}, "
                          f"this run has {images} of {shape}; choose another --cache-features directory "
                          "or delete this one")


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


class FeatureReader:
    """Features by image position, read through memory-mapped safetensors files.

    Picklable: DataLoader workers receive a copy and open the files lazily themselves.
    """

    def __init__(self, root: Path, chunk: int, images: int) -> None:
        self.root, self.chunk, self.images = Path(root), chunk, images
        self._files: dict[int, Any] = {}

    def __getstate__(self):
        return {"root": self.root, "chunk": self.chunk, "images": self.images, "_files": {}}

    def __len__(self) -> int:
        return self.images

    def __getitem__(self, position: int) -> torch.Tensor | None:
        """(N, D) fp16 features of image `position`, or None when it could not be read."""
        from safetensors import safe_open

        k, row = divmod(position, self.chunk)
        handle = self._files.get(k)
        if handle is None:
            path = self.root / f"chunk-{k:05d}.safetensors"
            try:
                handle = self._files[k] = safe_open(str(path), framework="pt")
            except OSError as exc:
                raise GitcapError(f"cannot read feature cache {path}: {exc}") from None
        if not int(handle.get_slice("ok")[row : row + 1][0]):
            return None
        return handle.get_slice("features")[row : row + 1][0]
