"""`--report-to tensorboard|wandb`: the metrics that go to metrics.jsonl, also to a tracker.

Both are optional installs; asking for one that is missing is a user error, found before
anything loads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gitcli.errors import GitcapError

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_available(kind: str | None) -> None:
    if kind is not None and importlib.util.find_spec(_PACKAGES[kind]) is None:
        raise GitcapError(f"--report-to {kind} needs the {kind} package, which is not installed "
                          f"(pip install {_PACKAGES[kind]})")


class Reporter:
    """Scalars per step; rank 0 only (the loop creates it there)."""

    def __init__(self, kind: str, output_dir: Path, config: dict) -> None:
        self.kind = kind
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        else:
            import wandb

            self._run = wandb.init(project="gitcap", dir=str(output_dir), config=config, resume="allow")

    def log(self, values: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)
        else:
            self._run.log(scalars, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self._writer.close()
        else:
            self._run.finish()
