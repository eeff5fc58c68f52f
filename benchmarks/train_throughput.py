"""Training-step throughput (images/s): our model next to open_clip's of the same size, and where
the full CLIPS step's time goes.

  python -m benchmarks.train_throughput --model Ti/16 --image-size 160 --batch-size 32 --rounds 5

Same work on both sides: open_clip's CLIP is built from our export config (the same towers), one
text view, softmax contrastive loss, AdamW; the steps alternate round by round in one process,
so machine noise hits both alike. Then the full CLIPS step (two text views, caption decoder,
fp32 vocabulary head; loss 1 x contrastive + 2 x caption) and its parts, each forward + backward
on detached inputs: towers + contrastive, the decoder's transformer, the vocabulary head.
On a GPU (if present) everything runs in bf16 autocast as training does.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import open_clip
import torch
from open_clip.loss import ClipLoss

from benchmarks.record import Record, alternate, parse
from train.data import normalize_images
from train.export import open_clip_config
from train.loop import forward_loss
from train.losses import softmax_contrastive
from train.model import CLIPS, build_model, model_config
from train.tokenizer import CaptionTokenizer

SMOKE = {"image_size": 32, "batch_size": 2, "depth": 1, "rounds": 2}


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds for one forward + backward of `fn`'s scalar."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = fn()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def optimizer_step(params: list[torch.nn.Parameter], fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` after an AdamW step on the previous call's gradients, so timings include the update."""
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.2)

    def step() -> torch.Tensor:
        opt.step()
        opt.zero_grad(set_to_none=True)
        return fn()
    return step


def cost_split(model: CLIPS, batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """Forward + backward of each part of the CLIPS step on detached inputs."""
    b = batch["images"].shape[0]
    images = normalize_images(batch["images"])
    with torch.no_grad():
        patches = model.vision.tokens(images)
        _, states = model.text(batch["texts"])
    decoder, captions = model.decoder, batch["captions"]
    prefix = torch.cat([decoder.image_proj(patches[:, 1:]), decoder.text_proj(states[:b, :-1])], dim=1).detach()
    n = captions.shape[1] - 1
    mask = torch.ones(prefix.shape[1] + n, prefix.shape[1] + n, dtype=torch.bool, device=prefix.device).tril()
    mask[:, :prefix.shape[1]] = True
    mask[:prefix.shape[1], prefix.shape[1]:] = False
    with torch.no_grad():
        queries = decoder.queries[:n].expand(b, -1, -1)
        hidden = decoder.transformer(torch.cat([prefix, queries], 1), mask)[:, prefix.shape[1]:]

    def towers() -> torch.Tensor:
        image = model.vision.pool(model.vision.tokens(images))
        text, _ = model.text(batch["texts"])
        return softmax_contrastive(image, list(text.split(b)), model.logit_scale)

    def decoder_blocks() -> torch.Tensor:
        x = torch.cat([prefix.requires_grad_(), queries.detach()], 1)
        return decoder.transformer(x, mask)[:, prefix.shape[1]:].float().square().mean()

    def head() -> torch.Tensor:
        return decoder.out(hidden.detach().requires_grad_(), captions[:, 1:])["caption_nll"]

    return {"towers + contrastive": towers, "decoder blocks": decoder_blocks, "vocabulary head (fp32)": head}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Ti/16")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--depth", type=int, help="blocks of every tower (default: the model size's own)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per side (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = parse(p, argv, SMOKE)
    record = Record("train_throughput", a, argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = model_config(a.model, depth=a.depth)
    b, t = a.batch_size, cfg.context_length
    batch = {"images": torch.randint(0, 256, (b, 3, a.image_size, a.image_size), dtype=torch.uint8),
             "texts": torch.randint(1000, 30000, (2 * b, t)),
             "captions": torch.randint(1000, 30000, (b, cfg.caption_length))}
    batch = {k: v.to(device) for k, v in batch.items()}
    images, texts = normalize_images(batch["images"]), batch["texts"]

    ours = build_model(cfg).to(device).train()
    towers = build_model(cfg).to(device).train()  # the contrastive comparison: its own copy and optimizer
    tower_params = [p for n, p in towers.named_parameters() if not n.startswith("decoder.")]
    model_cfg = open_clip_config(cfg, a.image_size, CaptionTokenizer.train([]), "bench")["model_cfg"]
    theirs = open_clip.CLIP(**model_cfg).to(device).train()
    clip_loss = ClipLoss()

    def ours_contrastive() -> torch.Tensor:
        return softmax_contrastive(towers.encode_image(images), [towers.encode_text(texts[:b])], towers.logit_scale)

    def theirs_contrastive() -> torch.Tensor:
        image = theirs.encode_image(images, normalize=True)
        text = theirs.encode_text(texts[:b], normalize=True)
        return clip_loss(image, text, theirs.logit_scale.exp())

    steps = {
        "open_clip (towers + contrastive)": optimizer_step(list(theirs.parameters()), theirs_contrastive),
        "ours (towers + contrastive)": optimizer_step(tower_params, ours_contrastive),
        "ours full CLIPS step": optimizer_step(list(ours.parameters()), lambda: forward_loss(ours, batch, cfg)[0]),
        **cost_split(ours, batch),
    }
    for step in steps.values():
        timed(step, device)  # warm-up
    times = alternate(a.rounds, {name: lambda step=step: timed(step, device) for name, step in steps.items()})

    cuda = device.type == "cuda"
    where = f"{torch.cuda.get_device_name()} bf16" if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{a.model} @ {a.image_size}px, batch {b}, {where}, median of {a.rounds} steps")
    record.figures["device"] = where
    rates = {name: [b / t for t in ts] for name, ts in times.items()}
    record.compare("towers + contrastive, same work", "images/s",
                   ("open_clip", rates["open_clip (towers + contrastive)"]),
                   ("ours", rates["ours (towers + contrastive)"]))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    record.figures["full CLIPS step images/s"] = round(b / median["ours full CLIPS step"], 3)
    print(f"  ours full CLIPS step {b / median['ours full CLIPS step']:9.2f} images/s")
    parts = list(steps)[3:]
    total = sum(median[name] for name in parts)
    print(f"  full step {1e3 * median['ours full CLIPS step']:.1f} ms; its parts (forward + backward, sum "
          f"{1e3 * total:.1f} ms):")
    for name in parts:
        record.figures[f"part: {name} ms"] = round(1e3 * median[name], 3)
        record.figures[f"part: {name} share"] = round(median[name] / total, 4)
        print(f"    {name:<26s} {1e3 * median[name]:8.1f} ms  {100 * median[name] / total:5.1f} %")
    record.write()


if __name__ == "__main__":
    main()
