"""Train a CLIPS / OpenVision encoder on the recaption job's `wds/` shards.

  python pipelines/train.py --build-tokenizer --data OUT/wds/ --out TOK   (once, if no BERT folder is at hand)
  python pipelines/train.py --data OUT/wds/ --tokenizer TOK --model Ti/16 --image-size 160 \\
      --batch-size 1024 --samples 10000000 --out RUN
  torchrun --nproc-per-node 8 pipelines/train.py ...          (one process per GPU)
  ray job submit --working-dir . -- python pipelines/train.py ... --ray-workers 16
  python pipelines/train.py --recipe B/16 --data ... --tokenizer TOK --out RUN   (all three stages)

--data takes what the recaption job's --input takes: a folder, a glob, a brace range
('OUT/wds/{00000..00099}.tar'), or an s3:// prefix or glob. Defaults are stage 1 of the
CLIPA/OpenVision schedule (global batch 32,768, 12.8 B samples); set --batch-size and --samples
for anything smaller. Checkpoints go to RUN/checkpoints, metrics to stdout, RUN/metrics.jsonl,
RUN/tensorboard and RUN/loss.png.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
from dataclasses import asdict, fields

from dataset.logs import one_line_errors
from train.data import expand_urls, read_captions
from train.distributed import fit_with_ray
from train.loop import TrainConfig, train
from train.model import LOSSES, OBJECTIVES, SIZES
from train.recipes import run_stages
from train.tokenizer import CaptionTokenizer

D = TrainConfig(data="", out="")
TOKENIZER_SAMPLES = 1_000_000  # captions of this many samples train --build-tokenizer's vocabulary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shards: folder, glob, brace range, or s3:// prefix or glob")
    p.add_argument("--out", required=True, help="run folder (checkpoints, tokenizer, logs)")
    p.add_argument("--build-tokenizer", action="store_true",
                   help="instead of training: learn an uncased 32k WordPiece from the captions of the first "
                        f"{TOKENIZER_SAMPLES:,} samples of --data, write it to --out (a Hugging Face folder for "
                        "--tokenizer) and exit")
    p.add_argument("--model", default=D.model, help=f"SIZE/PATCH with SIZE in {','.join(SIZES)}")
    p.add_argument("--objective", default=D.objective, choices=OBJECTIVES,
                   help="clips: contrastive + caption decoder (OpenVision 1); openvision2: caption only")
    p.add_argument("--loss", default=D.loss, choices=LOSSES, help="contrastive loss")
    p.add_argument("--image-size", type=int, default=D.image_size,
                   help="training resolution (stage 1 for Ti/S/B; L/So400m/H use 84)")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="GLOBAL batch over all processes")
    p.add_argument("--samples", type=int, default=D.samples, help="samples this run sees; sets the schedule length")
    p.add_argument("--base-lr", type=float, default=D.base_lr, help="LR per 256 samples; peak = base-lr x batch/256")
    p.add_argument("--warmup-samples", type=int, default=D.warmup_samples,
                   help="linear warmup length in samples (default: 0.4%% of --samples, stage 1's 51.2M of 12.8B)")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay, help="decoupled, weight matrices only")
    p.add_argument("--tokenizer", default=D.tokenizer,
                   help="Hugging Face tokenizer folder (bert-base-uncased, as the reference, or --build-tokenizer's); "
                        "not needed with --resume or --init-from (the checkpoint carries its tokenizer)")
    p.add_argument("--init-from", default=D.init_from, help="checkpoint whose weights (and tokenizer) start this run")
    p.add_argument("--resume", action="store_true", help="continue from RUN's latest checkpoint, exactly")
    p.add_argument("--depth", type=int, default=D.depth, help="override every tower's depth (small experiments)")
    p.add_argument("--context-length", type=int, default=D.context_length, help="text encoder length incl. [CLS]")
    p.add_argument("--caption-length", type=int, default=D.caption_length,
                   help="decoder tokens [BOS] recaption [EOS] [PAD]..; it predicts all but the first")
    p.add_argument("--vocab-size", type=int, default=D.vocab_size,
                   help="rows of the embedding tables and the decoder head (at least the tokenizer's size)")
    p.add_argument("--keep-ratio", type=float, default=D.keep_ratio,
                   help="openvision2: share of patch tokens the decoder sees (paper: 25-35%%)")
    p.add_argument("--teacher-forcing", action="store_true",
                   help="clips: queries also see the previous recaption token (not the reference decoder)")
    p.add_argument("--workers", type=int, default=D.workers,
                   help="data-loader processes per training process (default: this node's cores / processes - 1, "
                        "or the resumed checkpoint's); --resume needs the same value")
    p.add_argument("--shuffle-buffer", type=int, default=D.shuffle_buffer,
                   help="samples held per loader worker for shuffling (costs memory: ~image bytes each)")
    p.add_argument("--caption-field", default=D.caption_field,
                   help="the WebDataset member trained on as the recaption: a caption set's column C is C.txt")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--log-every", type=int, default=D.log_every, help="steps between metric lines")
    p.add_argument("--save-every", type=int, default=D.save_every, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=D.keep_checkpoints, help="newest checkpoints kept")
    p.add_argument("--stop-at-step", type=int, default=D.stop_at_step,
                   help="stop (with a checkpoint) at this step; the schedule still follows --samples")
    p.add_argument("--compile", action="store_true", help="torch.compile the (DDP-wrapped) model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--recipe", default=None,
                   help="run every stage of a model's progressive-resolution recipe (train/recipes.py: a model "
                        "name such as B/16, or 'tiny') into RUN/stage1.., each from the previous stage's last "
                        "checkpoint; the recipe sets model, resolution, samples, batch, LR and warmup")
    p.add_argument("--stage", type=int, default=None, help="with --recipe: run only this stage (1-based)")
    p.add_argument("--ray-workers", type=int, default=0,
                   help="run as a Ray Train TorchTrainer with this many workers (each takes a GPU when the "
                        "cluster has GPUs); RUN must be on storage every node sees")
    return p.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(config: dict) -> None:
    """Train one run or every stage of --recipe; the body of each Ray worker too."""
    cfg = TrainConfig(**config["train"])
    if config["recipe"]:
        run_stages(cfg, config["recipe"], train, only=config["stage"])
    else:
        train(cfg)


def build_tokenizer(data: str, out: str) -> None:
    tokenizer = CaptionTokenizer.train(read_captions(expand_urls(data), TOKENIZER_SAMPLES))
    tokenizer.save(out)
    print(f"wrote {out}: {tokenizer.vocab_size} tokens")


@one_line_errors("train")
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.build_tokenizer:
        build_tokenizer(args.data, args.out)
        return
    config = {"train": asdict(train_config(args)), "recipe": args.recipe, "stage": args.stage}
    if args.ray_workers:
        fit_with_ray(run, config, args.ray_workers, args.out, "train")
    else:
        run(config)


if __name__ == "__main__":
    main()
