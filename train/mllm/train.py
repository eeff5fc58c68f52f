"""The two LLaVA-1.5 training stages (haotian-liu/LLaVA `scripts/v1_5/pretrain.sh`, `finetune.sh`).

- stage 1: only the projector learns, on image-caption pairs (plain template);
- stage 2: projector + LM learn on conversations (vicuna_v1 template), loss on the answers only;
  the tower stays frozen unless it gets its own learning rate.

Defaults are LLaVA-1.5's: global batch 256 / LR 1e-3 then 128 / 2e-5, one epoch each, AdamW
without weight decay, 3 % linear warmup then cosine, gradient clipping at 1.0, 2048 tokens.
The loss is the mean over every answer token of the global batch, however the batch is split
over processes and accumulation steps. Runs alone, under torchrun or in a Ray Train worker:
DDP by default, FSDP (`fully_shard` per decoder layer) with `fsdp`, bf16 on GPUs.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train import distributed
from train.metrics import RunLogger
from train.mllm.conversation import IGNORE, TEMPLATES
from train.mllm.data import REASONS, ExampleStream, LlavaJson, SkipTally, WdsCaptions, make_loader
from train.mllm.model import (
    LM_DIR,
    PROJECTOR_FILE,
    TOWER_FILE,
    LlavaModel,
    MLLMConfig,
    build,
    load_config,
    save_config,
    summed_loss,
)
from train.optim import warmup_cosine


@dataclass
class StageConfig:
    """One training stage; `STAGE1` / `STAGE2` hold LLaVA-1.5's defaults for each."""
    stage: int
    data: str  # LLaVA-format JSON, or a recaption wds shard pattern
    out: str
    lm: str | None = None  # Hugging Face causal LM folder (default: --init's)
    tower: str | None = None  # our checkpoint or "open_clip:NAME" (default: --init's)
    tower_weights: str | None = None
    init: str | None = None  # an earlier stage's run folder: config, projector, LM and tower
    image_folder: str | None = None
    # None below: --init's value, else MLLMConfig's (LLaVA-1.5: layer -2, mlp2x_gelu, the tower's resolution).
    image_size: int | None = None
    layer: int | None = None
    projector: str | None = None
    template: str = "vicuna_v1"
    caption_field: str = "re_caption.txt"  # wds: the member that is the target (`{key}.re_caption.txt`)
    caption_prompt: str = ""  # wds: the user's words after <image> (the plain template drops them)
    samples: int | None = None  # wds: samples per epoch (counted from local shards when unset)
    batch_size: int = 128  # global
    micro_batch_size: int = 16  # per process and forward pass
    lr: float = 2e-5
    tower_lr: float | None = None  # stage 2: train the tower at this LR (None: frozen)
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    max_bad_fraction: float = 0.01  # unusable samples skipped (by reason) up to this share of the trained ones
    workers: int = 4
    seed: int = 0
    fsdp: bool = False
    grad_checkpointing: bool = False
    log_every: int = 10


STAGE1 = StageConfig(stage=1, data="", out="", template="plain", batch_size=256, micro_batch_size=32, lr=1e-3)
STAGE2 = StageConfig(stage=2, data="", out="")


def model_config(cfg: StageConfig) -> MLLMConfig:
    """--init's config with this stage's flags on top; without --init the flags alone."""
    stage = {"lm": cfg.lm, "tower": cfg.tower, "tower_weights": cfg.tower_weights, "image_size": cfg.image_size,
             "layer": cfg.layer, "projector": cfg.projector, "template": cfg.template}
    if cfg.init:
        base = load_config(cfg.init)
        if (Path(cfg.init) / LM_DIR).is_dir() and cfg.lm is None:
            base = replace(base, lm=str(Path(cfg.init).resolve() / LM_DIR))
        return replace(base, **{k: v for k, v in stage.items() if v is not None})
    if not cfg.lm or not cfg.tower:
        raise ValueError("without --init, both --lm and --tower are needed")
    return MLLMConfig(**{k: v for k, v in stage.items() if v is not None})


def prepare_model(cfg: StageConfig, config: MLLMConfig) -> LlavaModel:
    """Build, load --init's weights, and set what learns: projector; + LM in stage 2; + tower if asked."""
    if cfg.stage == 1 and cfg.tower_lr is not None:
        raise ValueError("stage 1 trains the projector only; --tower-lr is a stage-2 option")
    torch.manual_seed(cfg.seed)  # every rank starts from the same projector
    model = build(config)
    if cfg.init:
        model.projector.load_state_dict(torch.load(Path(cfg.init) / PROJECTOR_FILE, map_location="cpu"))
        if (Path(cfg.init) / TOWER_FILE).exists():
            model.tower.load_state_dict(torch.load(Path(cfg.init) / TOWER_FILE, map_location="cpu"))
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if cfg.stage == 2:
        model.lm.requires_grad_(True)
    if cfg.tower_lr is not None:
        model.tower.requires_grad_(True)
    return model


def make_optimizer(model: LlavaModel, cfg: StageConfig) -> torch.optim.AdamW:
    """AdamW with Hugging Face Trainer's betas (LLaVA trains with it); the tower at its own LR."""
    main = [p for m in (model.projector, model.lm) for p in m.parameters() if p.requires_grad]
    groups = [{"params": main, "lr": cfg.lr}]
    tower = [p for p in model.tower.parameters() if p.requires_grad]
    if tower:
        groups.append({"params": tower, "lr": cfg.tower_lr})
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


def wrap(model: LlavaModel, cfg: StageConfig, ctx: distributed.Context, dtype: torch.dtype) -> nn.Module:
    """FSDP: shard every LM decoder layer, then the rest; else DDP when there are several processes."""
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        layer_types = set(getattr(model.lm, "_no_split_modules", None) or [])
        for module in model.lm.modules():
            if type(module).__name__ in layer_types:
                fully_shard(module, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    if dtype != torch.float32:  # frozen parts need no fp32 master weights
        for part in (model.tower, model.lm):
            if not any(p.requires_grad for p in part.parameters()):
                part.to(dtype)
    if ctx.world > 1:
        return DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    return model


def make_source(cfg: StageConfig) -> LlavaJson | WdsCaptions:
    if cfg.data.endswith(".json"):
        return LlavaJson(cfg.data, cfg.image_folder)
    return WdsCaptions(cfg.data, cfg.caption_field, cfg.samples, cfg.caption_prompt)


def full_state(model: LlavaModel) -> dict[str, torch.Tensor]:
    """Every rank takes part; returns the whole (unsharded) state dict on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_run(model: LlavaModel, cfg: StageConfig, config: MLLMConfig, ctx: distributed.Context) -> Path:
    """mllm.json + projector.pt; stage 2 adds lm/ (weights and tokenizer); a trained tower adds tower.pt."""
    state = full_state(model)
    out = Path(cfg.out)
    if ctx.is_main:
        save_config(config, out)
        torch.save(part(state, "projector."), out / PROJECTOR_FILE)
        if cfg.stage == 2:
            model.lm.save_pretrained(out / LM_DIR, state_dict=part(state, "lm."))
            model.tokenizer.save_pretrained(out / LM_DIR)
        if cfg.tower_lr is not None:
            torch.save(part(state, "tower."), out / TOWER_FILE)
    distributed.barrier()
    return out


def train(cfg: StageConfig) -> Path:
    """Run one stage; returns its output folder."""
    ctx = distributed.setup()
    cuda = ctx.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    accumulation, rest = divmod(cfg.batch_size, ctx.world * cfg.micro_batch_size)
    if rest or not accumulation:
        raise ValueError(f"global batch {cfg.batch_size} is not a multiple of {ctx.world} processes x "
                         f"micro-batch {cfg.micro_batch_size}")
    if cfg.template not in TEMPLATES:
        raise ValueError(f"template {cfg.template!r}: expected one of {sorted(TEMPLATES)}")
    config = model_config(cfg)
    model = prepare_model(cfg, config).to(ctx.device)
    if cfg.grad_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    image_tokens, _ = model.tower.shape()
    net = wrap(model, cfg, ctx, dtype)
    optimizer = make_optimizer(model, cfg)

    source = make_source(cfg)
    total_steps = max(1, math.ceil(cfg.epochs * len(source) / cfg.batch_size))
    scheduler = warmup_cosine(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    stream = ExampleStream(source, model.tokenizer, TEMPLATES[config.template], model.tower.prep,
                           image_tokens=image_tokens, max_length=cfg.max_length, seed=cfg.seed,
                           rank=ctx.rank, world=ctx.world)
    batches = iter(make_loader(stream, cfg.micro_batch_size, cfg.workers, pin_memory=cuda))

    skips = SkipTally.for_run(cfg.max_bad_fraction, total_steps * cfg.batch_size // ctx.world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    logger = RunLogger(cfg.out, ctx.is_main)
    if ctx.is_main:
        print(f"stage {cfg.stage}: {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable of "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {total_steps} steps of {cfg.batch_size} "
              f"({accumulation} x {ctx.world} x {cfg.micro_batch_size}), {len(source)} samples x {cfg.epochs} "
              f"epochs, {image_tokens} image tokens, {ctx.world} process(es) on {ctx.device.type}", flush=True)
    net.train()
    start = time.perf_counter()
    for step in range(1, total_steps + 1):
        micro = [next(batches) for _ in range(accumulation)]
        for m in micro:
            skips.add(m.pop("skipped"))
        loss_sum, tokens = accumulate(net, micro, ctx, dtype if cuda and not cfg.fsdp else None)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == total_steps:
            loss = distributed.all_reduce_sum(loss_sum) / tokens.clamp(min=1)
            logger.log(step, {"loss": loss.item(), "grad_norm": float(grad_norm), "tokens": float(tokens),
                              "skipped": float(skips.total), "lr": scheduler.get_last_lr()[0],
                              "seconds": time.perf_counter() - start})
    logger.plot()
    logger.close()
    report_skips(skips, cfg, ctx)
    out = save_run(model, cfg, config, ctx)
    distributed.teardown(ctx)
    return out


def report_skips(skips: SkipTally, cfg: StageConfig, ctx: distributed.Context) -> None:
    """Skipped samples of every process, by reason: printed and written to RUN/skipped.json (with this
    process's example names)."""
    counts = distributed.all_reduce_sum(torch.tensor([skips.counts[r] for r in REASONS], device=ctx.device))
    if ctx.is_main:
        by_reason = {r: int(n) for r, n in zip(REASONS, counts.tolist(), strict=True) if n}
        (Path(cfg.out) / "skipped.json").write_text(json.dumps({"by_reason": by_reason, "examples": skips.examples},
                                                               indent=1) + "\n")
        if by_reason:
            print(f"stage {cfg.stage}: skipped {sum(by_reason.values())} unusable samples: {skips.describe()}",
                  flush=True)


def accumulate(net: nn.Module, micro: list[dict], ctx: distributed.Context, autocast: torch.dtype | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's micro-batches of one global batch.

    Gradients end up as those of the mean loss over every answer token of the global batch, however
    it is split over processes and micro-batches. Returns this rank's summed loss and the global
    number of answer tokens.
    """
    # Labels shift by one: the first position is never a target.
    tokens = distributed.all_reduce_sum(sum((m["labels"][:, 1:] != IGNORE).sum() for m in micro).to(ctx.device))
    total = torch.zeros((), device=ctx.device)
    for k, m in enumerate(micro):
        m = {key: v.to(ctx.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for key, v in m.items()}
        with sync_context(net, k == len(micro) - 1):  # DDP's no_sync must cover the backward too
            with torch.autocast(ctx.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                logits, labels = net(m["ids"], m["mask"], m["images"], m["labels"])
                loss_sum, _ = summed_loss(logits, labels)
            # DDP and FSDP average gradients over processes: scale back to a sum, then divide by all tokens.
            (loss_sum * ctx.world / tokens.clamp(min=1)).backward()
        total += loss_sum.detach()
    return total, tokens


def sync_context(net: nn.Module, last: bool):
    """Reduce gradients over processes only on an accumulation window's last micro-batch."""
    if isinstance(net, DistributedDataParallel) and not last:
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(last)
    return contextlib.nullcontext()

