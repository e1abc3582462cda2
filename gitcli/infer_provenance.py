"""What produced an infer-tsv output, recorded beside it as `OUT.provenance.json`.

A rerun keeps every row an earlier run finished; that is only right when the rows came
from the same model, decoding options and inputs. The record is written (atomically)
before the first row, and every later run compares against it: the same inputs resume,
anything else is refused in one line that names the difference and the way out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from gitcli.config import GenerationConfig, read_json, to_dict, upgrade_model_fields
from gitcli.errors import GitcapError
from gitcli.formats.atomic import write_json

FORMAT = "gitcap-infer-tsv-provenance"
# decoding options that cannot change an output (the compiled step decodes the same tokens)
_OUTPUT_NEUTRAL = ("compile",)


def provenance_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.provenance.json")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_run(model, precision: str, gen: GenerationConfig, images: Path, keys: list[str],
                 questions: Path | None) -> dict:
    """The record of a run: model (checkpoint identity + config), decoding, inputs.

    The image TSV (often tens of GB) is known by its size, modification time and keys;
    the question TSV, small, by its content.
    """
    stat = Path(images).stat()
    decoding = {k: v for k, v in to_dict(gen).items() if k not in _OUTPUT_NEUTRAL}
    return {
        "format": FORMAT,
        "model": {"origin": model.origin, "config": to_dict(model.config)},
        "decoding": {**decoding, "precision": precision},
        "images": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "rows": len(keys),
                   "keys_sha256": hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()},
        "questions": None if questions is None else {"sha256": _sha256_file(Path(questions))},
    }


def _option(name: str) -> str:
    return "--precision" if name == "precision" else "--" + name.replace("_", "-")


def difference(old: dict, new: dict) -> str | None:
    """What differs between two records, in the user's words; None when nothing does."""
    if old.get("format") != FORMAT:
        return "an unrecognised provenance record"
    old_model, new_model = old.get("model") or {}, new["model"]
    if _checkpoint_key(old_model.get("origin")) != _checkpoint_key(new_model["origin"]):
        return f"another model ({_model_name(old_model.get('origin'))} then, {_model_name(new_model['origin'])} now)"
    old_config = upgrade_model_fields(old_model.get("config") or {}, "provenance")
    for name, value in new_model["config"].items():
        if old_config.get(name) != value:  # the checkpoint is the same: an override such as --dtype
            return f"another model configuration ({name} {old_config.get(name)} then, {value} now)"
    old_dec, new_dec = old.get("decoding") or {}, new["decoding"]
    for name, value in new_dec.items():
        if old_dec.get(name) != value:
            return f"other decoding options ({_option(name)} {old_dec.get(name)} then, {value} now)"
    if old.get("images") != new["images"]:
        return "another image TSV (or the same one changed since)"
    if (old.get("questions") is None) != (new["questions"] is None):
        return "--questions " + ("now but not then" if old.get("questions") is None else "then but not now")
    if old.get("questions") != new["questions"]:
        return "another --questions TSV (or the same one changed since)"
    return None


def _checkpoint_key(origin: dict | None):
    """What identifies the weights: content hash and file stamps, not the path (a checkpoint
    moved with its times kept is the same checkpoint)."""
    if not origin:
        return None
    return origin.get("config_sha256"), origin.get("files")


def _model_name(origin: dict | None) -> str:
    if not origin:
        return "a freshly built untrained model"
    return f"checkpoint {origin.get('checkpoint')}"


def check_provenance(out: Path, record: dict, *, has_rows: bool) -> None:
    """Refuse to add rows to `out` that an earlier run made from other inputs."""
    path = provenance_path(out)
    if not path.exists():
        if has_rows:
            raise GitcapError(f"{out} holds rows that no provenance record describes ({path.name} is missing), so "
                              "they may come from another model or options; pass --overwrite to start over, or "
                              "choose another --out")
        return
    try:
        old = read_json(path, what=f"infer-tsv provenance record {path}")
    except GitcapError as exc:
        raise GitcapError(f"{exc}; pass --overwrite to start over, or choose another --out") from None
    why = difference(old if isinstance(old, dict) else {}, record)
    if why is not None:
        raise GitcapError(f"{out} holds rows made with {why}; pass --overwrite to start over, "
                          "or choose another --out")


def write_provenance(out: Path, record: dict) -> None:
    write_json(provenance_path(out), record)


__all__ = ["check_provenance", "describe_run", "difference", "provenance_path", "write_provenance"]
