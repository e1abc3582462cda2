"""Checkpoint directories: `gitcap.json` + safetensors of what cannot be fetched again.

Layout (DESIGN.md): `gitcap.json` (model config, format version, gitcap version),
`mapping.safetensors` always, `vision.safetensors` when the tower was trained or has no
fetchable source, `lm/` (a transformers directory) when the LM was fully trained or is the
tiny preset, `lora.safetensors` for LoRA adapters, `tokenizer/` when built locally.
A training output directory holds `checkpoint-STEP/` and a `latest` pointer file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from gitcli import __version__
from gitcli.config import ModelConfig, from_dict, read_json, to_dict, upgrade_model_fields, write_json
from gitcli.errors import GitcapError
from gitcli.formats.atomic import atomic_dir, write_text
from gitcli.model.captioner import Captioner, build_captioner
from gitcli.model.quiet import quiet_libraries

FORMAT = "gitcap-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "gitcap.json"
LATEST_FILE = "latest"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose `latest` names one."""
    path = Path(path)
    if not path.exists():
        raise GitcapError(f"checkpoint not found: {path}")
    if (path / CONFIG_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        target = path / latest.read_text(encoding="utf-8").strip()
        if (target / CONFIG_FILE).is_file():
            return target
        raise GitcapError(f"{latest} points to {target.name}, which is not a checkpoint")
    raise GitcapError(f"{path} is not a gitcap checkpoint (no {CONFIG_FILE}) nor a run directory (no {LATEST_FILE})")


def checkpoint_identity(path: str | Path) -> dict:
    """What tells this checkpoint from any other, read in milliseconds whatever its size:
    the hash of `gitcap.json` and every weight file's size and modification time
    (`train_state/`, the optimiser's resume state, does not change what the model outputs).
    A copy made without keeping times counts as another checkpoint: refusing too much is
    the safe side for outputs that a rerun would otherwise trust."""
    ckpt = resolve_checkpoint(path)
    files = {}
    for file in sorted(ckpt.rglob("*")):
        rel = file.relative_to(ckpt)
        if rel.parts[0] != "train_state" and file.is_file():
            stat = file.stat()
            files[rel.as_posix()] = [stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256((ckpt / CONFIG_FILE).read_bytes()).hexdigest()
    return {"checkpoint": str(ckpt.resolve()), "config_sha256": digest, "files": files}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _lm_is_saved(config: ModelConfig) -> bool:
    return config.preset == "tiny" or config.train_lm


def _vision_is_saved(config: ModelConfig) -> bool:
    return config.train_vision or config.vision_pretrained is None or config.preset == "tiny"


def saved_parameters(captioner: Captioner) -> list[torch.nn.Parameter]:
    """The parameters a checkpoint writes: what a ZeRO-3 run must gather before saving."""
    config = captioner.config
    params = list(captioner.mapping.parameters())
    if _vision_is_saved(config):
        params += list(captioner.vision.parameters())
    lm = captioner.lm.parameters()
    params += list(lm) if _lm_is_saved(config) else [p for p in lm if p.requires_grad]  # LoRA adapters
    return params


def save_checkpoint(captioner: Captioner, directory: str | Path, extra: dict | None = None,
                    also_write: Callable[[Path], None] | None = None) -> Path:
    """Write atomically: into a temporary sibling, then rename over `directory`.

    `also_write(tmp_dir)` adds files (a training run's resume state) before the rename,
    so the checkpoint and its state appear together or not at all.
    """
    quiet_libraries()
    directory = Path(directory)
    with atomic_dir(directory) as tmp:  # every file fsynced before the rename publishes it
        if also_write is not None:
            also_write(tmp)
        _write(captioner, tmp, extra or {})
    return directory


def _write(captioner: Captioner, out: Path, extra: dict) -> None:
    config = captioner.config
    save_file(_contiguous(captioner.mapping.state_dict()), out / "mapping.safetensors")
    if _vision_is_saved(config):
        save_file(_contiguous(captioner.vision.visual.state_dict()), out / "vision.safetensors")
    lm = captioner.lm
    if config.lora_rank > 0:
        from peft import get_peft_model_state_dict

        save_file(_contiguous(get_peft_model_state_dict(lm)), out / "lora.safetensors")
        lm = lm.get_base_model()
    if _lm_is_saved(config):
        from gitcli.model.quant import dense_state_dict

        lm.save_pretrained(out / "lm", safe_serialization=True, state_dict=dense_state_dict(lm))
    if config.preset == "tiny":
        captioner.tokenizer.save_pretrained(out / "tokenizer")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "gitcap_version": __version__,
            "model": to_dict(config)}
    meta.update(extra)
    write_json(out / CONFIG_FILE, meta)  # last: its presence marks a complete checkpoint


def read_checkpoint_config(path: str | Path) -> tuple[Path, ModelConfig, dict]:
    ckpt = resolve_checkpoint(path)
    meta = read_json(ckpt / CONFIG_FILE, what=f"{ckpt / CONFIG_FILE}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GitcapError(f"{ckpt} is not a gitcap checkpoint ({CONFIG_FILE} has no gitcap format marker)")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise GitcapError(f"{ckpt / CONFIG_FILE}: field 'format_version' must be int, not {version!r}")
    if version > FORMAT_VERSION:
        raise GitcapError(f"{ckpt} was written by a newer gitcap ({meta.get('gitcap_version')}); upgrade gitcap")
    what = f"{ckpt / CONFIG_FILE} model config"
    config = from_dict(ModelConfig, upgrade_model_fields(meta.get("model"), what), what=what)
    try:
        config.validate()  # before anything is built from it: the file may come from anyone
    except GitcapError as exc:
        raise GitcapError(f"{what}: {exc}") from None
    return ckpt, config, meta


def _load_weights(file: Path, what: str) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise GitcapError(f"checkpoint is incomplete: {file.name} is missing ({what})")
    try:
        return load_file(file)
    except Exception as exc:  # safetensors raises its own error types
        raise GitcapError(f"cannot read {file}: {exc}") from None


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu", dtype: str | None = None,
                    quant: str | None = None) -> Captioner:
    """Rebuild exactly the saved model. `dtype`/`quant` override how frozen weights are held."""
    ckpt, config, _ = read_checkpoint_config(path)
    quiet_libraries()
    if dtype is not None:
        config.dtype = dtype
    if quant is not None:
        config.quant = quant
        config.validate()
    lm_path = ckpt / "lm" if _lm_is_saved(config) else None
    tok_path = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else None
    if lm_path is not None and not lm_path.is_dir():
        raise GitcapError(f"checkpoint is incomplete: {lm_path} is missing")
    vision_saved = _vision_is_saved(config)
    captioner = build_captioner(
        config, device=device, lm_path=lm_path, tokenizer_path=tok_path,
        vision_pretrained=None if vision_saved else config.vision_pretrained,
    )
    _strict_load(captioner.mapping, _load_weights(ckpt / "mapping.safetensors", "mapping weights"), "mapping")
    if vision_saved:
        _strict_load(captioner.vision.visual, _load_weights(ckpt / "vision.safetensors", "vision weights"), "vision tower")
    if config.lora_rank > 0:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(captioner.lm, _load_weights(ckpt / "lora.safetensors", "LoRA adapters"))
    captioner.origin = checkpoint_identity(ckpt)
    return captioner


def _strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GitcapError(f"the checkpoint's {what} does not match its config: {str(exc).splitlines()[0]}") from None


def write_latest(run_dir: str | Path, checkpoint_name: str) -> None:
    """Point `run_dir/latest` at a checkpoint directory, atomically."""
    write_text(Path(run_dir) / LATEST_FILE, checkpoint_name + "\n")
