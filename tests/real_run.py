"""A real recaption run for the publish and report tests: `pipelines/recaption.py --backend null` on two
img2dataset-style shards, 00000 clean but with hostile web captions (Markdown, HTML, links), 00001 with
every kind of bad input the synthetic writer makes. Made once per pytest process (it costs ~20 s). The job
runs as a subprocess: it starts a local Ray instance and leaves it running, which must not outlive it here."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

from dataset.synthetic.input_shards import write_shard

ROOT = Path(__file__).resolve().parent.parent
HOSTILE_CAPTIONS = [
    '<script>alert("x")</script> a **bold** _red_ circle',
    "[click here](http://evil.example/x) ![pixel](http://evil.example/p.png) square",
    "| col | umn |\n# not a heading\n- not a list `code` ~~struck~~",
    "<img src=x onerror=alert(1)> &amp; &lt;b&gt; www.evil.example",
    "$x^2$ <https://autolink.example> \\* escaped \\ backslash *",
    "{'max_side': 1024} None True",
]
_RUNS: dict[str, Path] = {}


def set_captions(tar_path: Path, captions: list[str]) -> None:
    """Rewrite the tar with its `.txt` members replaced by `captions`, in turn."""
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read() if info.isfile() else None))
    texts = iter(captions * len(members))
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.name.endswith(".txt"):
                data = next(texts).encode()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def real_run(base: Path, model: str) -> Path:
    """OUT of the run (made under `base` by the first caller in this process)."""
    if "out" not in _RUNS:
        inputs, out = base / "inputs", base / "out"
        inputs.mkdir(parents=True)
        write_shard(inputs, 0, len(HOSTILE_CAPTIONS), image_size=64)
        write_shard(inputs, 1, 4, image_size=64, bad=True)
        set_captions(inputs / "00000.tar", HOSTILE_CAPTIONS)
        job = subprocess.run([sys.executable, "pipelines/recaption.py", "--input", str(inputs), "--output", str(out),
                              "--model", model, "--backend", "null", "--num-workers", "1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        _RUNS["out"] = out
    return _RUNS["out"]
