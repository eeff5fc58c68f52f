"""The training loop: one stage of CLIPS / OpenVision training, read top to bottom.

`train(TrainConfig(...))` runs alone, under torchrun (one process per device) or inside a
Ray Train worker; it returns the path of the last checkpoint it wrote.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from train import checkpoint, distributed
from train.data import ShardStream, default_workers, expand_urls, make_loader, normalize_images
from train.losses import caption_loss, match_accuracy, sigmoid_contrastive, softmax_contrastive
from train.metrics import RunLogger
from train.model import ModelConfig, build_model, model_config
from train.optim import make_optimizer, warmup_cosine
from train.tokenizer import CaptionTokenizer

# Loss = 1 x contrastive + 2 x caption (OpenVision 2: 2 x caption), the reference configs'
# `clip_loss_weight` and `coca_caption_loss_weight`.
CONTRASTIVE_WEIGHT, CAPTION_WEIGHT = 1.0, 2.0


@dataclass
class TrainConfig:
    """One training stage; defaults are stage 1 of the CLIPA/OpenVision schedule (`train.recipes`)."""
    data: str
    out: str
    model: str = "B/16"
    objective: str = "clips"
    loss: str = "softmax"
    image_size: int = 160
    batch_size: int = 32768  # global
    samples: int = 12_800_000_000
    base_lr: float = 8e-6  # per 256 samples of global batch
    warmup_samples: int | None = None  # None: 0.4 % of `samples`
    weight_decay: float = 0.2
    tokenizer: str | None = None  # Hugging Face tokenizer folder; a resumed or initialised run uses its checkpoint's
    init_from: str | None = None
    resume: bool = False
    depth: int | None = None
    context_length: int = 80
    caption_length: int = 128
    vocab_size: int = 32000  # embedding tables and decoder head (bert-base-uncased's 30,522 ids fit)
    keep_ratio: float = 0.35
    teacher_forcing: bool = False
    workers: int | None = None  # None: from the CPUs (`default_workers`), or a resumed checkpoint's
    shuffle_buffer: int = 2000
    caption_field: str = "re_caption.txt"  # the WebDataset member that is the recaption (a caption set's C.txt)
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2
    stop_at_step: int | None = None
    compile: bool = False
    grad_checkpointing: bool = False

    @property
    def total_steps(self) -> int:
        return max(1, self.samples // self.batch_size)

    @property
    def warmup_steps(self) -> int:
        warmup = self.warmup_samples if self.warmup_samples is not None else self.samples * 0.004
        return int(warmup // self.batch_size)

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


def forward_loss(net: nn.Module, batch: dict[str, Tensor], cfg: ModelConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss = 1 x contrastive + 2 x caption (OpenVision 2: caption only), plus logged parts."""
    out = net(normalize_images(batch["images"]), batch["captions"], texts=batch.get("texts"), keep=batch.get("keep"))
    caption = caption_loss(out["caption_nll"], out["caption_tokens"])
    loss = CAPTION_WEIGHT * caption
    parts = {"caption": caption, "token_acc": out["caption_correct"] / out["caption_tokens"].clamp(min=1)}
    if cfg.has_text_tower:
        views = list(out["text"].split(batch["images"].shape[0]))  # web caption, sub-caption
        if cfg.loss == "softmax":
            contrastive = softmax_contrastive(out["image"], views, out["logit_scale"])
        else:
            contrastive = sigmoid_contrastive(out["image"], views, out["logit_scale"], out["logit_bias"])
        loss = loss + CONTRASTIVE_WEIGHT * contrastive
        parts.update(contrastive=contrastive, match_acc=match_accuracy(out["image"], views[0]),
                     logit_scale=out["logit_scale"].exp())
    return loss, {"loss": loss, **parts}


def prepare_tokenizer(cfg: TrainConfig, ctx: distributed.Context, state: dict | None,
                      init: dict | None) -> CaptionTokenizer:
    """The resumed or initialising checkpoint's tokenizer, else --tokenizer (kept in RUN/tokenizer)."""
    if state is not None or init is not None:
        return CaptionTokenizer.from_files((state or init)["tokenizer"])
    if not cfg.tokenizer:
        raise ValueError("give --tokenizer DIR (a Hugging Face tokenizer folder, e.g. bert-base-uncased), or "
                         "build one from the captions first: pipelines/train.py --build-tokenizer --data ... --out DIR")
    tokenizer = CaptionTokenizer.load(cfg.tokenizer)
    if ctx.is_main:
        tokenizer.save(Path(cfg.out) / "tokenizer")
    return tokenizer


def save_checkpoint(cfg: TrainConfig, ctx: distributed.Context, model: nn.Module, optimizer, scheduler,
                    step: int, positions: dict, workers: int, model_cfg: ModelConfig,
                    tokenizer: CaptionTokenizer) -> Path:
    rngs = distributed.gather_objects(checkpoint.rng_state())
    data = distributed.gather_objects(dict(positions))
    path = checkpoint.step_path(cfg.out, step)
    if ctx.is_main:
        checkpoint.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "rng": rngs, "data": data, "world": ctx.world, "workers": workers,
            "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg),
            "tokenizer": tokenizer.to_files(),
        }, path, keep=cfg.keep_checkpoints)
    distributed.barrier()
    return path


def train(cfg: TrainConfig) -> Path:
    """Run or resume one stage; returns the last checkpoint written."""
    ctx = distributed.setup()
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % ctx.world:
        raise ValueError(f"global batch {cfg.batch_size} does not split over {ctx.world} processes")
    cuda = ctx.device.type == "cuda"

    # Where we start from: our own latest checkpoint (--resume), another run's (--init-from), or scratch.
    resume_path = checkpoint.latest(run) if cfg.resume else None
    state = checkpoint.load(resume_path) if resume_path else None
    init = checkpoint.load(cfg.init_from) if cfg.init_from and state is None else None
    workers = cfg.workers if cfg.workers is not None else (
        state["workers"] if state is not None else default_workers(ctx.local_world))
    if state is not None and (state["world"], state["workers"]) != (ctx.world, workers):
        raise ValueError(f"resume needs the same processes x loader workers as {resume_path} "
                         f"({state['world']} x {state['workers']}), not {ctx.world} x {workers}")
    tokenizer = prepare_tokenizer(cfg, ctx, state, init)

    # Model, optimizer, schedule. Every rank builds the same initial weights from cfg.seed.
    torch.manual_seed(cfg.seed)
    model_cfg = model_config(cfg.model, depth=cfg.depth, objective=cfg.objective, loss=cfg.loss,
                             context_length=cfg.context_length, caption_length=cfg.caption_length,
                             vocab_size=cfg.vocab_size, keep_ratio=cfg.keep_ratio, teacher_forcing=cfg.teacher_forcing,
                             pad_id=tokenizer.pad_id, grad_checkpointing=cfg.grad_checkpointing)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the embedding tables {model_cfg.vocab_size}")
    model = build_model(model_cfg).to(ctx.device)
    if init is not None:
        model.load_state_dict(init["model"])
    optimizer = make_optimizer(model, cfg.peak_lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.total_steps)
    step, positions = 0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, positions = state["step"], state["data"][ctx.rank]
        checkpoint.set_rng_state(state["rng"][ctx.rank])
    net: nn.Module = model
    if ctx.world > 1:
        net = DistributedDataParallel(net, device_ids=[ctx.device] if cuda else None)
    if cfg.compile:  # after the DDP wrap, so DDP's graph splitting can overlap gradient buckets with backward
        net = torch.compile(net)

    # Data: this rank's slice of the shard stream, continued from where the checkpoint left it.
    patches = (cfg.image_size // model_cfg.patch_size) ** 2
    stream = ShardStream(expand_urls(cfg.data), tokenizer, image_size=cfg.image_size,
                         batch_size=cfg.batch_size // ctx.world, context_length=cfg.context_length,
                         caption_length=cfg.caption_length, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                         caption_field=cfg.caption_field, text_views=model_cfg.has_text_tower,
                         keep=None if model_cfg.has_text_tower else (patches, model_cfg.kept_tokens(patches)),
                         rank=ctx.rank, world=ctx.world, start=positions, first_worker=step % max(1, workers))
    batches = iter(make_loader(stream, workers, pin_memory=cuda))

    logger = RunLogger(run, ctx.is_main, start_step=step)
    stop = min(cfg.total_steps, cfg.stop_at_step or cfg.total_steps)
    if ctx.is_main:
        print(f"{cfg.model} {cfg.objective}/{cfg.loss}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"params, steps {step}->{stop} of {cfg.total_steps}, global batch {cfg.batch_size}, "
              f"peak lr {cfg.peak_lr:.3g}, {ctx.world} process(es) on {ctx.device.type}", flush=True)
    path = resume_path
    window_start, window_steps = time.perf_counter(), 0
    net.train()
    while step < stop:
        batch, worker, position = next(batches)
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss, parts = forward_loss(net, batch, model_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        positions[worker] = position
        step += 1
        window_steps += 1

        if step % cfg.log_every == 0 or step == stop:
            means = distributed.all_reduce_sum(torch.stack([v.float() for v in parts.values()])) / ctx.world
            values = dict(zip(parts, means.tolist(), strict=True))
            elapsed = time.perf_counter() - window_start
            values.update(lr=scheduler.get_last_lr()[0], images_per_s=window_steps * cfg.batch_size / elapsed)
            logger.log(step, values)
            window_start, window_steps = time.perf_counter(), 0
        if step % cfg.save_every == 0 or step == stop:
            path = save_checkpoint(cfg, ctx, model, optimizer, scheduler, step, positions, workers, model_cfg,
                                   tokenizer)
            logger.plot()
    logger.close()
    distributed.teardown(ctx)
    return path
