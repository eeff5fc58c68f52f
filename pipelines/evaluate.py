"""Evaluate a training checkpoint: zero-shot classification and image-text retrieval.

  python pipelines/evaluate.py --checkpoint RUN/checkpoints/step_00001000.pt \
      --zeroshot IMAGEFOLDER [--classnames FILE] [--retrieval 'DATA/*.tar' | --retrieval karpathy.json --images DIR]

Prints top-1/top-5 and R@1/5/10 in both directions, and writes them as JSON.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import json
from pathlib import Path

from train.evaluate import evaluate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    p.add_argument("--zeroshot", help="ImageFolder tree: one folder per class")
    p.add_argument("--classnames", help="one class name per line, in sorted folder order (default: folder names)")
    p.add_argument("--templates", help="one prompt template per line with {} (default: CLIP's 80 + '{}')")
    p.add_argument("--retrieval", help="WebDataset shards (glob; caption from .txt) or a Karpathy-style JSON")
    p.add_argument("--images", help="image root for a Karpathy JSON (default: the JSON's folder)")
    p.add_argument("--split", default="test", help="Karpathy split to use")
    p.add_argument("--image-size", type=int, help="evaluation resolution (default: the checkpoint's training size)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    p.add_argument("--out", help="JSON results file (default: CHECKPOINT with .eval.json)")
    a = p.parse_args(argv)
    if not (a.zeroshot or a.retrieval):
        p.error("give --zeroshot and/or --retrieval")
    results = evaluate(a.checkpoint, zeroshot=a.zeroshot, classnames=a.classnames, templates=a.templates,
                       retrieval=a.retrieval, retrieval_images=a.images, split=a.split, image_size=a.image_size,
                       device=a.device, batch_size=a.batch_size, workers=a.workers)
    if "zeroshot" in results:
        z = results["zeroshot"]
        print(f"zero-shot: top-1 {100 * z['top1']:.2f}%  top-5 {100 * z['top5']:.2f}%  "
              f"({z['images']} images, {z['classes']} classes)")
    if "retrieval" in results:
        r = results["retrieval"]
        for direction in ("image_to_text", "text_to_image"):
            print(f"{direction}: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in r[direction].items()))
    out = Path(a.out or Path(a.checkpoint).with_suffix(".eval.json"))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
