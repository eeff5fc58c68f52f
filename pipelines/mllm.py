"""Judge a vision encoder inside a LLaVA-1.5-style MLLM: train the projector, then projector + LM, then evaluate.

  python pipelines/mllm.py stage1 --tower RUN/checkpoints/step_X.pt --lm LM_DIR \\
      --data blip_laion_cc_sbu_558k.json --image-folder IMAGES --out MLLM/stage1
  python pipelines/mllm.py stage1 ... --data 'OUT/wds/*.tar' --out MLLM/stage1   (our recaptions as captions)
  torchrun --nproc-per-node 8 pipelines/mllm.py stage2 --init MLLM/stage1 \\
      --data llava_v1_5_mix665k.json --image-folder IMAGES --out MLLM/stage2 [--fsdp --grad-checkpointing]
  python pipelines/mllm.py eval --model MLLM/stage2 --questions q.jsonl --image-folder IMAGES \\
      --answers answers.jsonl --metric vqa --prompt short

Stage 1 trains the projector only; stage 2 the projector and the LM (and the tower with
--tower-lr). Defaults are LLaVA-1.5's (batch 256 / LR 1e-3, then 128 / 2e-5, one epoch each).
--tower takes one of our checkpoints or "open_clip:NAME" (e.g. open_clip:local-dir:/models/ov).
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import json
from dataclasses import asdict, fields

from dataset.logs import one_line_errors
from train.distributed import fit_with_ray
from train.mllm.conversation import TEMPLATES
from train.mllm.evaluate import METRICS, PROMPTS, EvalConfig, run_eval
from train.mllm.model import MLLMConfig
from train.mllm.projector import PROJECTORS
from train.mllm.train import STAGE1, STAGE2, StageConfig, train

E = EvalConfig(model="", questions="", answers="")
M = MLLMConfig(lm="", tower="")


def add_stage_args(p: argparse.ArgumentParser, D: StageConfig) -> None:
    p.add_argument("--data", required=True,
                   help="LLaVA-format JSON, or recaption wds shards ('OUT/wds/*.tar') as image-caption pairs")
    p.add_argument("--out", required=True, help="run folder: mllm.json, projector.pt (+ lm/, tower.pt), metrics")
    p.add_argument("--init", help="an earlier stage's run folder (its config, projector, LM and tower)")
    p.add_argument("--lm", help="Hugging Face causal LM folder, e.g. SmolLM-135M, Meta-Llama-3-8B "
                                "(default: --init's)")
    p.add_argument("--tower", help="our training checkpoint (.pt) or open_clip:NAME (default: --init's)")
    p.add_argument("--tower-weights", help="open_clip `pretrained` weights file for open_clip:NAME")
    p.add_argument("--image-folder", help="root of the JSON's image paths")
    p.add_argument("--image-size", type=int, help="input resolution (default: the tower's; ours take any multiple "
                                                  "of the patch size, e.g. 384 -> 768)")
    p.add_argument("--layer", type=int, default=D.layer,
                   help=f"tower hidden state fed to the projector, as a Hugging Face hidden_states index "
                        f"(default: --init's, else {M.layer} as LLaVA-1.5)")
    p.add_argument("--projector", default=D.projector,
                   help=f"one of {PROJECTORS} or mlpNx_gelu (default: --init's, else {M.projector})")
    p.add_argument("--template", default=D.template, choices=sorted(TEMPLATES),
                   help="conversation format (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="GLOBAL batch (default: %(default)s)")
    p.add_argument("--micro-batch-size", type=int, default=D.micro_batch_size,
                   help="samples per process and forward pass; gradient accumulation makes up the rest "
                        "(default: %(default)s)")
    p.add_argument("--lr", type=float, default=D.lr,
                   help="peak LR of the projector (and the LM in stage 2) (default: %(default)s)")
    if D.stage == 2:
        p.add_argument("--tower-lr", type=float, help="also train the tower, at this peak LR (default: frozen)")
    p.add_argument("--epochs", type=float, default=D.epochs)
    p.add_argument("--samples", type=int, help="wds: samples per epoch (default: counted from local shards)")
    p.add_argument("--caption-field", default=D.caption_field,
                   help="wds: the member {key}.FIELD that is the target: re_caption.txt (the recaption) or txt "
                        "(the web caption) (default: %(default)s)")
    p.add_argument("--caption-prompt", default=D.caption_prompt,
                   help="wds: the user's request after <image>, e.g. the recaptioning prompt (plain drops it)")
    p.add_argument("--warmup-ratio", type=float, default=D.warmup_ratio)
    p.add_argument("--weight-decay", type=float, default=D.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=D.max_grad_norm)
    p.add_argument("--max-length", type=int, default=D.max_length, help="tokens per sample, image tokens included")
    p.add_argument("--max-bad-fraction", type=float, default=D.max_bad_fraction,
                   help="unusable samples (no decodable image, empty caption, too long, malformed) are skipped and "
                        "counted by reason (RUN/skipped.json); the run fails once they pass this share of the "
                        "samples it trains on (default: %(default)s)")
    p.add_argument("--workers", type=int, default=D.workers, help="data-loader processes per training process")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--fsdp", action="store_true", help="shard the model (fully_shard per LM decoder layer)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute LM activations in backward")
    p.add_argument("--log-every", type=int, default=D.log_every)
    p.add_argument("--ray-workers", type=int, default=0,
                   help="run as a Ray Train TorchTrainer with this many workers (a GPU each when the cluster "
                        "has GPUs); every path must be on storage all nodes see")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_stage_args(sub.add_parser("stage1", help="projector only, on image-caption pairs"), STAGE1)
    add_stage_args(sub.add_parser("stage2", help="projector + LM, on conversations"), STAGE2)
    e = sub.add_parser("eval", help="greedy answers to LLaVA-format jsonl questions, scored")
    e.add_argument("--model", required=True, help="a stage's run folder")
    e.add_argument("--questions", required=True, help="jsonl: question_id, image, text, answer/answers, options")
    e.add_argument("--answers", required=True, help="jsonl written: question_id, prompt, text, score")
    e.add_argument("--image-folder", help="root of the questions' image paths")
    e.add_argument("--metric", default=E.metric, choices=METRICS)
    e.add_argument("--prompt", default=E.prompt, choices=sorted(PROMPTS),
                   help="instruction appended to each question (LLaVA-1.5's short-answer / option-letter)")
    e.add_argument("--batch-size", type=int, default=E.batch_size)
    e.add_argument("--max-new-tokens", type=int, default=E.max_new_tokens)
    e.add_argument("--zero-images", action="store_true", help="control: feed the projector all-zero features")
    e.add_argument("--device", default=E.device)
    return p.parse_args(argv)


def stage_config(args: argparse.Namespace) -> StageConfig:
    D = STAGE1 if args.command == "stage1" else STAGE2
    given = {f.name: getattr(args, f.name) for f in fields(StageConfig) if hasattr(args, f.name)}
    return StageConfig(**{**asdict(D), **given})


def run_stage(config: dict) -> None:
    """Body of each Ray Train worker."""
    train(StageConfig(**config))


@one_line_errors("mllm")
def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.command == "eval":
        names = {f.name for f in fields(EvalConfig)}
        result = run_eval(EvalConfig(**{k: v for k, v in vars(args).items() if k in names}))
        print(json.dumps(result))
        return result
    cfg = stage_config(args)
    if args.ray_workers:
        fit_with_ray(run_stage, asdict(cfg), args.ray_workers, cfg.out, "mllm")
    else:
        train(cfg)
    return None


if __name__ == "__main__":
    main()
