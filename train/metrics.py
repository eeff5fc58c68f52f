"""Training metrics to stdout, TensorBoard, `metrics.jsonl` and a loss-curve PNG in the run folder."""
from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """Only the main rank writes; a resumed run drops records logged after its checkpoint."""

    def __init__(self, run: str | Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run) / "metrics.jsonl"
        self.png = Path(run) / "loss.png"
        self.writer = None
        if not enabled:
            return
        kept = [r for r in self.records() if r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.writer = SummaryWriter(str(Path(run) / "tensorboard"), purge_step=start_step + 1)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        print(f"step {step:>7d} " + " ".join(f"{k} {v:.4g}" for k, v in values.items()), flush=True)
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def plot(self) -> None:
        """Redraw `loss.png` from everything logged so far."""
        records = self.records() if self.enabled else []
        if not records:
            return
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        steps = [r["step"] for r in records]
        for key in ("loss", "contrastive", "caption"):
            if key in records[0]:
                ax.plot(steps, [r[key] for r in records], label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.png, dpi=100)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
