"""Progressive-resolution schedules: a stage file (train/configs/*.json) runs stage after stage.

A stage file names the model and lists stages; each stage's fields override the command line's
TrainConfig. Stage k trains into RUN/stage{k} and starts from stage k-1's last checkpoint.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from train import checkpoint
from train.loop import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"
STAGE_FIELDS = {f.name for f in fields(TrainConfig)} - {"data", "out", "init_from", "resume"}


def load_stages(path: str | Path) -> tuple[str, list[dict]]:
    """(model name, stage overrides) from a stage file; a bare name looks in train/configs/."""
    path = Path(path)
    if not path.exists():
        path = CONFIG_DIR / f"{path.name.removesuffix('.json')}.json"
    spec = json.loads(path.read_text())
    for stage in spec["stages"]:
        unknown = set(stage) - STAGE_FIELDS
        if unknown:
            raise ValueError(f"{path}: unknown stage fields {sorted(unknown)}")
    return spec["model"], spec["stages"]


def run_stages(base: TrainConfig, stage_file: str | Path, run: Callable[[TrainConfig], Path],
               only: int | None = None) -> Path | None:
    """Run every stage (or just stage `only`), each initialised from the previous one's last checkpoint."""
    model, stages = load_stages(stage_file)
    previous = Path(base.init_from) if base.init_from else None
    for number, overrides in enumerate(stages, start=1):
        cfg = replace(base, model=model, out=str(Path(base.out) / f"stage{number}"),
                      init_from=str(previous) if previous else None, **overrides)
        if only is None or only == number:
            previous = run(cfg)
        else:
            previous = checkpoint.latest(cfg.out)
    return previous
