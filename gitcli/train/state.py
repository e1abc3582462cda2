"""What a run needs to continue exactly: optimizer, scheduler, scaler, RNG, data position.

Stored as `train_state/state.pt` inside each checkpoint directory and read back with
`torch.load(weights_only=True)`: it holds tensors and plain containers only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gitcli.errors import GitcapError

STATE_DIR = "train_state"


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: Path, state: dict) -> None:
    (directory / STATE_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_DIR / "state.pt")


def load_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_DIR / "state.pt"
    if not path.is_file():
        raise GitcapError(f"{checkpoint} has no resume state ({STATE_DIR}/state.pt); use --init-from to start from it")
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class Position:
    """Where the run is: what a checkpoint records so that a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    micro_done: int = 0  # micro-batches of this epoch already trained on
    best: float | None = None
    window: list[float] = field(default_factory=list)  # losses since the last logged line: its mean

    @classmethod
    def from_state(cls, state: dict) -> "Position":
        return cls(int(state["step"]), int(state["epoch"]), int(state["micro_done"]), state.get("best"),
                   [float(x) for x in state.get("loss_window", [])])

    def next_epoch(self) -> None:
        self.epoch, self.micro_done = self.epoch + 1, 0
