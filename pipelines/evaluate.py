"""Evaluate a training checkpoint: zero-shot classification, image-text retrieval, k-NN and linear probe,
caption token accuracy against a zeroed-image control.

  python pipelines/evaluate.py --checkpoint RUN/checkpoints/step_00001000.pt \\
      --zeroshot IMAGENET_VAL --classnames imagenet \\
      [--retrieval 'DATA/*.tar' | --retrieval karpathy.json --images DIR] \\
      [--probe-train TRAIN_FOLDER --probe-val VAL_FOLDER] [--captioning 'HELDOUT/*.tar']

Zero-shot and retrieval need a text tower (objective clips); the k-NN / linear probe works for
every encoder, OpenVision 2's included, and so does --captioning (the decoder's teacher-forced
token accuracy, with the images and with every image zeroed). Prints top-1/top-5, R@1/5/10 both
ways, probe top-1 and caption token accuracy, and writes them as JSON.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import json
from pathlib import Path

import torch

from dataset.logs import one_line_errors
from train.evaluate import CLASSNAME_SETS, Evaluator, evaluate


@one_line_errors("evaluate")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    p.add_argument("--zeroshot", help="ImageFolder tree: one folder per class")
    p.add_argument("--classnames", help=f"{' or '.join(CLASSNAME_SETS)} (open_clip's CLIP class names, for folders in "
                                        "sorted synset order), or a file with one name per line in sorted folder "
                                        "order (default: the folder names)")
    p.add_argument("--templates", help="one prompt template per line with {} (default: CLIP's 80 + '{}')")
    p.add_argument("--retrieval", help="WebDataset shards (caption from .txt) or a Karpathy-style JSON")
    p.add_argument("--images", help="image root for a Karpathy JSON (default: the JSON's folder)")
    p.add_argument("--split", default="test", help="Karpathy split to use")
    p.add_argument("--probe-train", help="ImageFolder tree the k-NN index and the linear probe are fit on")
    p.add_argument("--probe-val", help="ImageFolder tree (same classes) the probe is scored on")
    p.add_argument("--captioning", help="recaption shards (image, .txt, .re_caption.txt): the caption decoder's "
                                        "teacher-forced token accuracy, with the images and with every image zeroed")
    p.add_argument("--image-size", type=int, help="evaluation resolution (default: the checkpoint's training size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=Evaluator.batch_size)
    p.add_argument("--workers", type=int, default=Evaluator.workers, help="image-decoding processes")
    p.add_argument("--out", help="JSON results file (default: CHECKPOINT with .eval.json)")
    a = p.parse_args(argv)
    if not (a.zeroshot or a.retrieval or a.probe_train or a.captioning):
        p.error("give --zeroshot, --retrieval, --captioning and/or --probe-train with --probe-val")
    if bool(a.probe_train) != bool(a.probe_val):
        p.error("--probe-train and --probe-val go together")
    results = evaluate(a.checkpoint, zeroshot=a.zeroshot, classnames=a.classnames, templates=a.templates,
                       retrieval=a.retrieval, retrieval_images=a.images, split=a.split, probe_train=a.probe_train,
                       probe_val=a.probe_val, captioning=a.captioning, image_size=a.image_size, device=a.device,
                       batch_size=a.batch_size, workers=a.workers)
    if "zeroshot" in results:
        z = results["zeroshot"]
        print(f"zero-shot: top-1 {100 * z['top1']:.2f}%  top-5 {100 * z['top5']:.2f}%  "
              f"({z['images']} images, {z['classes']} classes)")
    if "retrieval" in results:
        r = results["retrieval"]
        for direction in ("image_to_text", "text_to_image"):
            print(f"{direction}: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in r[direction].items()))
    if "probe" in results:
        pr = results["probe"]
        print(f"k-NN top-1 {100 * pr['knn_top1']:.2f}%  linear probe top-1 {100 * pr['linear_top1']:.2f}%  "
              f"({pr['train_images']} / {pr['val_images']} images, {pr['classes']} classes)")
    if "captioning" in results:
        c = results["captioning"]
        print(f"caption token accuracy {100 * c['token_acc']:.2f}%  with zeroed images "
              f"{100 * c['zero_images_token_acc']:.2f}%  ({c['tokens']} tokens, {c['images']} images)")
    out = Path(a.out or Path(a.checkpoint).with_suffix(".eval.json"))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
