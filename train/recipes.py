"""Progressive-resolution recipes as code (big_vision style): one schedule per size family.

CLIPA's inverse scaling law (arXiv:2305.07017) as OpenVision trains it (arXiv:2505.04601;
UCSC-VLAA/OpenVision `scripts/project/openvision/train.sh`): a long first stage at low
resolution, then two short ones at higher resolution, each starting from the previous stage's
last checkpoint. Peak LR = base_lr x batch / 256.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from train import checkpoint
from train.loop import TrainConfig


@dataclass(frozen=True)
class Stage:
    image_size: int
    samples: int
    batch_size: int
    base_lr: float
    warmup_samples: int


def clipa_schedule(low_res: int, high_res: int) -> tuple[Stage, ...]:
    """12.8 B samples at `low_res` (batch 32k, warmup 51.2 M), 1.025 B at 224 (batch 16k, warmup
    25.6 M), 256 M at `high_res` (batch 8k, no warmup): 10,000 / 800 / 200 ImageNet "epochs"."""
    return (Stage(low_res, 12_800_000_000, 32_768, 8e-6, 51_200_000),
            Stage(224, 1_025_000_000, 16_384, 4e-7, 25_600_000),
            Stage(high_res, 256_000_000, 8_192, 1e-7, 0))


# Size -> schedule. Ti/S/B start at 160 px and end at 384; L and H start at 84 and end at 336;
# So400m ends at 384 (the released openvision-vit-*-patch{16,8}-{160,224,384}, -large/huge-patch14-
# {84,224,336} and -so400m-patch14-{84,224,384} checkpoints).
FAMILIES = {"Ti": clipa_schedule(160, 384), "S": clipa_schedule(160, 384), "B": clipa_schedule(160, 384),
            "L": clipa_schedule(84, 336), "H": clipa_schedule(84, 336), "So400m": clipa_schedule(84, 384)}
# Two CPU-sized stages for tests and smoke runs.
TINY = ("Ti/16", (Stage(32, 16, 8, 1e-2, 0), Stage(48, 8, 4, 1e-3, 0)))


def recipe(name: str) -> tuple[str, tuple[Stage, ...]]:
    """(model, stages) for a model name such as 'B/16' or 'L/14', or 'tiny'."""
    if name == "tiny":
        return TINY
    size = name.partition("/")[0]
    if size not in FAMILIES:
        raise ValueError(f"no recipe for {name!r}: give SIZE/PATCH with SIZE in {list(FAMILIES)}, or 'tiny'")
    return name, FAMILIES[size]


def run_stages(base: TrainConfig, name: str, run: Callable[[TrainConfig], Path],
               only: int | None = None) -> Path | None:
    """Run every stage of recipe `name` (or just stage `only`, 1-based) into RUN/stage{k}, each
    initialised from the previous one's last checkpoint; the stage's fields override `base`."""
    model, stages = recipe(name)
    previous = Path(base.init_from) if base.init_from else None
    for number, stage in enumerate(stages, start=1):
        cfg = replace(base, model=model, out=str(Path(base.out) / f"stage{number}"),
                      init_from=str(previous) if previous else None, **vars(stage))
        if only is None or only == number:
            previous = run(cfg)
        else:
            previous = checkpoint.latest(cfg.out)
    return previous
