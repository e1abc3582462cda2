"""`train_config.json`: what a run was started with, and the truth when it is resumed.

A resumed run is the run it resumes: its data, model and optimisation options come from
the saved file. Options given again must agree with it, except the few that change how
far the run goes or how it is watched (CHANGEABLE_ON_RESUME); anything else would train
a different run under the old one's name, so it is refused in one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gitcli.config import (DataConfig, ModelConfig, TrainConfig, from_dict, read_json, to_dict, upgrade_model_fields,
                           write_json)
from gitcli.errors import GitcapError

RUN_CONFIG_FILE = "train_config.json"

# Field names (unique across the sections) that a resumed run may change. --max-steps and
# --epochs move the end of the run: the learning-rate schedule is recomputed for the new
# total, so from the resume step on the lr is the one a run of that length has there.
CHANGEABLE_ON_RESUME = ("max_steps", "epochs", "save_every", "log_every", "keep_last", "num_workers", "device",
                        "report_to", "val_data", "val_samples")
_NOT_OPTIONS = ("output_dir", "resume")  # where the run is and that it resumes: never compared
_OPTION_NAMES = {"source": "--data", "lora_rank": "--lora"}


def option_name(field: str) -> str:
    """The command-line option that sets a config field: lr -> --lr, source -> --data."""
    return _OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


def write_run_config(run_dir: Path, model: ModelConfig, data: DataConfig, train: TrainConfig, world: int) -> None:
    write_json(Path(run_dir) / RUN_CONFIG_FILE, {"model": to_dict(model), "data": to_dict(data),
                                                  "train": to_dict(train), "world_size": world})


def read_run_config(run_dir: Path) -> tuple[ModelConfig, DataConfig, TrainConfig] | None:
    """The saved configs of the run in `run_dir`, or None when it has no train_config.json."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    saved = read_json(path, what=str(path))
    if not isinstance(saved, dict):
        raise GitcapError(f"{path} is not a JSON object")
    saved["model"] = upgrade_model_fields(saved.get("model"), f"{path} model")
    return tuple(from_dict(cls, _known_fields(cls, saved.get(section)), what=f"{path} {section}")
                 for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)))


def _known_fields(cls: type, data):
    """A run saved by another gitcap version may hold a field this one no longer has."""
    if not isinstance(data, dict):
        return data
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _show(value) -> str:
    return "none" if value is None else str(value)


def _disagreement(run_dir: Path, field: str, saved, given) -> GitcapError:
    return GitcapError(
        f"{option_name(field)} {_show(given)} disagrees with the run in {run_dir}, which was started with "
        f"{_show(saved)}; a resumed run keeps its options (only {', '.join(map(option_name, CHANGEABLE_ON_RESUME))} "
        "may change): leave it out, or train into another --output-dir")


def configs_for_resume(run_dir: Path, given: dict[tuple[str, str], object]
                       ) -> tuple[ModelConfig, DataConfig, TrainConfig] | None:
    """The saved configs of `run_dir` with the options the user gave again applied.

    `given` maps (section, field) -- section being model, data or train -- to the value the
    user asked for. A changeable field takes it; any other must equal the saved value.
    None when the run has no saved config (nothing to hold it to).
    """
    saved = read_run_config(run_dir)
    if saved is None:
        return None
    sections = dict(zip(("model", "data", "train"), saved))
    for (section, field), value in given.items():
        if field in _NOT_OPTIONS:
            continue
        current = getattr(sections[section], field)
        if field in CHANGEABLE_ON_RESUME:
            setattr(sections[section], field, value)
        elif value != current:
            raise _disagreement(run_dir, field, current, value)
    return saved


def check_resume_agrees(run_dir: Path, data: DataConfig, train: TrainConfig) -> None:
    """Library callers resume with full configs: every data and training option that is
    not changeable must equal the saved one."""
    saved = read_run_config(run_dir)
    if saved is None:
        return
    _, saved_data, saved_train = saved
    for given, recorded in ((data, saved_data), (train, saved_train)):
        for field, value in to_dict(given).items():
            if field in _NOT_OPTIONS or field in CHANGEABLE_ON_RESUME:
                continue
            if value != getattr(recorded, field):
                raise _disagreement(run_dir, field, getattr(recorded, field), value)
