"""Training-step throughput (images/s): our model next to open_clip's model of the same size.

  python -m benchmarks.train_throughput --model Ti/16 --image-size 160 --batch-size 32

Both sides run the same towers (open_clip's CLIP is built from our export config), one text
view, softmax contrastive loss, AdamW, in one process and one after the other per round, so
machine noise hits both alike. Our full CLIPS step (two text views + caption decoder) is
reported beside it. Prints images/s and the ratio ours / open_clip.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import open_clip
import torch
from open_clip.loss import ClipLoss

from train.export import open_clip_config
from train.loop import forward_loss
from train.losses import softmax_contrastive
from train.model import build_model, model_config
from train.tokenizer import CaptionTokenizer


def make_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.2)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Ti/16")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per side (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = model_config(a.model)
    b, t = a.batch_size, cfg.context_length
    images = torch.randn(b, 3, a.image_size, a.image_size)
    texts = torch.randint(1000, 30000, (2 * b, t))
    captions = torch.randint(1000, 30000, (b, cfg.caption_length + 1))
    batch = {"images": images, "texts": texts, "captions": captions}

    ours = build_model(cfg).train()
    theirs = open_clip.CLIP(**open_clip_config(cfg, a.image_size, CaptionTokenizer.train([]), "bench")["model_cfg"]).train()
    clip_loss = ClipLoss()

    def ours_contrastive() -> torch.Tensor:
        return softmax_contrastive(ours.encode_image(images), [ours.encode_text(texts[:b])], ours.logit_scale)

    def theirs_contrastive() -> torch.Tensor:
        image = theirs.encode_image(images, normalize=True)
        text = theirs.encode_text(texts[:b], normalize=True)
        return clip_loss(image, text, theirs.logit_scale.exp())

    steps = {
        "ours (towers + contrastive)": make_step(ours, ours_contrastive),
        "open_clip (towers + contrastive)": make_step(theirs, theirs_contrastive),
        "ours full CLIPS step (2 views + decoder)": make_step(ours, lambda: forward_loss(ours, batch, cfg)[0]),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        step()  # warm-up
    for _ in range(a.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    print(f"{a.model} @ {a.image_size}px, batch {b}, {torch.get_num_threads()} threads, median of {a.rounds} steps")
    rate = {name: b / statistics.median(ts) for name, ts in times.items()}
    for name, r in rate.items():
        print(f"  {name:<42s} {r:8.2f} images/s")
    ratio = rate["ours (towers + contrastive)"] / rate["open_clip (towers + contrastive)"]
    print(f"  ratio ours / open_clip (same work): {ratio:.2f}")


if __name__ == "__main__":
    main()
