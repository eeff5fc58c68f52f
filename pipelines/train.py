"""Train a CLIPS / OpenVision encoder on the recaption job's `wds/` shards.

  python pipelines/train.py --data 'OUT/wds/*.tar' --model Ti/16 --image-size 160 \\
      --batch-size 1024 --samples 10000000 --out RUN
  torchrun --nproc-per-node 8 pipelines/train.py ...          (one process per GPU)
  ray job submit --working-dir . -- python pipelines/train.py ... --ray-workers 16
  python pipelines/train.py --config B-16 --data ... --out RUN  (all progressive-resolution stages)

Defaults are RECIPE.md's stage 1 (global batch 32,768, 12.8 B samples); set --batch-size and
--samples for anything smaller. Checkpoints go to RUN/checkpoints, metrics to stdout,
RUN/metrics.jsonl, RUN/tensorboard and RUN/loss.png.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import os
from dataclasses import asdict, fields
from pathlib import Path

from train.loop import TrainConfig, train
from train.stages import run_stages

ROOT = Path(__file__).resolve().parents[1]

D = TrainConfig(data="", out="")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard glob or brace pattern, e.g. 'OUT/wds/*.tar'")
    p.add_argument("--out", required=True, help="run folder (checkpoints, tokenizer, logs)")
    p.add_argument("--model", default=D.model, help="SIZE/PATCH with SIZE in Ti,S,B,L,So400m,H")
    p.add_argument("--objective", default=D.objective, choices=["clips", "openvision2"],
                   help="clips: contrastive + caption decoder (OpenVision 1); openvision2: caption only")
    p.add_argument("--loss", default=D.loss, choices=["softmax", "sigmoid"], help="contrastive loss")
    p.add_argument("--image-size", type=int, default=D.image_size,
                   help="training resolution (RECIPE stage 1 for Ti/S/B; L/So400m/H use 84)")
    p.add_argument("--batch-size", type=int, default=D.batch_size,
                   help="GLOBAL batch over all processes (RECIPE stage 1: 32768)")
    p.add_argument("--samples", type=int, default=D.samples,
                   help="samples this run sees; sets the schedule length (RECIPE stage 1: 12.8e9)")
    p.add_argument("--base-lr", type=float, default=D.base_lr,
                   help="LR per 256 samples; peak LR = base-lr x batch/256 (8e-6 gives 1.024e-3 at 32768)")
    p.add_argument("--warmup-samples", type=int, default=None,
                   help="linear warmup length in samples (default: 0.4%% of --samples, RECIPE's 51.2M of 12.8B)")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay, help="decoupled, weight matrices only")
    p.add_argument("--tokenizer", default=None,
                   help="Hugging Face tokenizer folder (e.g. bert-base-uncased); default: train an uncased "
                        "WordPiece on the training captions and keep it in RUN/tokenizer")
    p.add_argument("--tokenizer-samples", type=int, default=D.tokenizer_samples,
                   help="captions of this many samples train the default tokenizer")
    p.add_argument("--init-from", default=None, help="checkpoint whose weights (and tokenizer) start this run")
    p.add_argument("--resume", action="store_true", help="continue from RUN's latest checkpoint, exactly")
    p.add_argument("--depth", type=int, default=None, help="override every tower's depth (small experiments)")
    p.add_argument("--context-length", type=int, default=D.context_length,
                   help="text encoder length including [CLS] (RECIPE: 80)")
    p.add_argument("--caption-length", type=int, default=D.caption_length,
                   help="recaption tokens the decoder predicts (RECIPE: 128)")
    p.add_argument("--keep-ratio", type=float, default=D.keep_ratio,
                   help="openvision2: share of patch tokens kept for the decoder (paper: ~25-35%%)")
    p.add_argument("--workers", type=int, default=D.workers,
                   help="data-loader processes per training process (about one per 250 images/s needed); "
                        "--resume needs the same value")
    p.add_argument("--shuffle-buffer", type=int, default=D.shuffle_buffer,
                   help="samples held per loader worker for shuffling (costs memory: ~image bytes each)")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--log-every", type=int, default=D.log_every, help="steps between metric lines")
    p.add_argument("--save-every", type=int, default=D.save_every, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=D.keep_checkpoints, help="newest checkpoints kept")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop (with a checkpoint) at this step; the schedule still follows --samples")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--config", default=None,
                   help="stage file (train/configs/*.json or its name, e.g. B-16): runs its stages into "
                        "RUN/stage1.. each from the previous one's last checkpoint; its fields override the flags")
    p.add_argument("--stage", type=int, default=None, help="with --config: run only this stage (1-based)")
    p.add_argument("--ray-workers", type=int, default=0,
                   help="run as a Ray Train TorchTrainer with this many workers (each takes a GPU when the "
                        "cluster has GPUs); RUN must be on storage every node sees")
    return p.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(config: dict) -> None:
    """Train one run or every stage of --config; the body of each Ray worker too."""
    cfg = TrainConfig(**config["train"])
    if config["stages"]:
        run_stages(cfg, config["stages"], train, only=config["stage"])
    else:
        train(cfg)


def run_with_ray(config: dict, workers: int) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if "RAY_ADDRESS" not in os.environ:  # a local instance: let its workers import this repository
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    out = Path(config["train"]["out"]).resolve()
    trainer = TorchTrainer(run, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                           run_config=RunConfig(storage_path=str(out / "ray"), name="train"))
    trainer.fit()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = {"train": asdict(train_config(args)), "stages": args.config, "stage": args.stage}
    if args.ray_workers:
        run_with_ray(config, args.ray_workers)
    else:
        run(config)


if __name__ == "__main__":
    main()
