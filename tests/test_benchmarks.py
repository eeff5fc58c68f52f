"""Benchmarks are code under test, and the README's performance table is what their results files say.

Every script in benchmarks/ runs at its smoke size as users start it (`python -m benchmarks.NAME --smoke
--results FILE`): its imports, its code paths and its results file, which must have the shape
`python -m benchmarks.readme` reads (that script then renders its README row from it). The committed files
in benchmarks/results/ are full-size runs, one per benchmark, and README.md's table is generated from them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import readme
from benchmarks.record import RESULTS, ROOT

HELPERS = {"__init__", "record", "readme"}
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in HELPERS)
# Float comparisons below: a ratio is recomputed from the same two doubles the file holds, so it agrees to
# within a few ulps; 1e-9 relative is far above that and far below any rounding a reader would see.
REL = 1e-9


def check_record(record: dict, name: str) -> None:
    """The results file's shape: what the README generator and a reader of the file rely on."""
    assert record["schema"] == 1 and record["benchmark"] == name
    assert record["command"].startswith(f"python -m benchmarks.{name}")
    machine = record["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["ram_gib"] > 0
    assert isinstance(machine["gpus"], list)
    assert {"ray", "pyarrow", "pillow"} <= set(record["versions"]) and record["checkout"]["commit"]
    assert len(record["load_before"]) == len(record["load_after"]) == 3 and record["wall_s"] > 0
    assert record["figures"] and record["comparisons"]
    for c in record["comparisons"]:
        base, cand, ratio = c["baseline"], c["candidate"], c["ratio"]
        assert base["name"] and cand["name"] and c["unit"] and c["better"] in ("higher", "lower")
        assert len(base["rounds"]) == len(cand["rounds"]) == len(ratio["rounds"]) >= 1
        for side in (base, cand, ratio):
            assert side["min"] <= side["median"] <= side["max"]
            assert side["min"] == min(side["rounds"]) and side["max"] == max(side["rounds"])
        for b, x, r in zip(base["rounds"], cand["rounds"], ratio["rounds"], strict=True):
            assert r == pytest.approx(x / b, rel=REL)


def test_every_benchmark_has_a_readme_row_and_a_full_size_results_file():
    assert BENCHMARKS == sorted(readme.ROWS), "a benchmark without a row in benchmarks/readme.py, or the reverse"
    records = readme.load()
    for name, record in records.items():
        check_record(record, name)
        assert not record["smoke"], f"benchmarks/results/{name}.json is a smoke run"
        assert f"--results benchmarks/results/{name}.json" in record["command"]
    assert sorted(p.stem for p in RESULTS.glob("*.json")) == BENCHMARKS, "a results file of no benchmark"


def test_the_readme_performance_table_is_generated_from_the_results_files():
    text = readme.README.read_text()
    assert readme.render(text, readme.load()) == text, "README.md is stale: run python -m benchmarks.readme"


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_at_smoke_size(name, tmp_path):
    results = tmp_path / f"{name}.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--results", str(results)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    record = json.loads(results.read_text())
    check_record(record, name)
    assert record["smoke"] and record["command"].endswith(f"--smoke --results {results}")
    for c in record["comparisons"]:   # the printed summary line of each comparison
        assert f"{c['name']}, {c['unit']}, median (min..max)" in run.stdout
    what, result = readme.ROWS[name](record)
    assert what and result
    with pytest.raises(ValueError, match="smoke"):
        readme.row(record)
