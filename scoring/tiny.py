"""Build a deterministic random-weight open_clip model folder that loads with `local-dir:DIR`.

`python -m scoring.tiny OUTDIR`. Nothing is downloaded: the folder holds `open_clip_config.json`
(a `model_cfg` for open_clip's CLIP) and `open_clip_pytorch_model.bin`; the tokenizer is open_clip's
bundled BPE. Its context is 16 tokens, so tests exercise the cut of long captions.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_pytorch_model.bin"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model's folder; returns it (load with `local-dir:` + the folder)."""
    import open_clip
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"wrote {build_tiny_clip(a.out, a.seed)}; score with --clip-model local-dir:{a.out}")


if __name__ == "__main__":
    main()
