"""Training checkpoints: written atomically as `RUN/checkpoints/step_XXXXXXXX.pt`.

A checkpoint holds everything `--resume` needs to continue exactly: model, optimizer and
scheduler state, the step, every rank's RNG states and data-stream positions, the model and
training configs, and the tokenizer files (so a checkpoint is self-contained for evaluation
and export).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def checkpoint_dir(run: str | Path) -> Path:
    return Path(run) / "checkpoints"


def step_path(run: str | Path, step: int) -> Path:
    return checkpoint_dir(run) / f"step_{step:08d}.pt"


def list_checkpoints(run: str | Path) -> list[Path]:
    """This run's checkpoints, oldest first."""
    found = [p for p in checkpoint_dir(run).glob("step_*.pt") if STEP_FILE.search(p.name)]
    return sorted(found, key=lambda p: int(STEP_FILE.search(p.name).group(1)))


def latest(run: str | Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def save(state: dict[str, Any], path: Path, keep: int | None = None) -> None:
    """Write under a temporary name and rename, then drop all but the newest `keep`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    if keep:
        for old in list_checkpoints(path.parent.parent)[:-keep]:
            old.unlink()


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
