"""Score our captions against published ones, per chat template (and backend): which template reproduces them?

  python -m pipelines.fidelity --input new_data.parquet --model models/llava-llama-3-8b-hqedit-hf \\
      --caption-column CAPTION_COLUMN [--sample 500] [--backends vllm,transformers] [--out fidelity.json]

Draws a seeded sample of rows (image + published caption), captions each image greedily under every
--templates candidate, and prints per candidate, best first: exact-match rate, mean shared-prefix tokens,
token F1 and length difference, each with a 95% interval, then the best candidate's margin over the
runner-up. --out writes the report with every caption as JSON.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import json
from pathlib import Path

from dataset.logs import one_line_errors
from recaption.fidelity import FidelityConfig, format_report, run_fidelity
from recaption.prompt import load_prompt


def names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def engine_options(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("want a JSON object, e.g. '{\"batch_invariant\": true}'")
    return value


@one_line_errors("fidelity")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="Parquet file(s) with images and published captions")
    p.add_argument("--model", required=True, help="the converted captioner (folder or Hub id)")
    p.add_argument("--revision", default=FidelityConfig.revision)
    p.add_argument("--templates", type=names, default=FidelityConfig.templates,
                   help="comma-separated chat templates to compare (names or 'system:TEXT'; default: "
                        f"{','.join(FidelityConfig.templates)})")
    p.add_argument("--backends", type=names, default=FidelityConfig.backends,
                   help="comma-separated: vllm, transformers (one engine each)")
    p.add_argument("--caption-column", default=FidelityConfig.caption_column)
    p.add_argument("--image-column", default=FidelityConfig.image_column,
                   help="image bytes, {bytes, path} structs (Hugging Face Image) or paths")
    p.add_argument("--image-root", default=FidelityConfig.image_root,
                   help="folder relative image paths start from (default: the Parquet file's)")
    p.add_argument("--sample", type=int, default=FidelityConfig.sample, help="rows drawn at random")
    p.add_argument("--seed", type=int, default=FidelityConfig.seed)
    p.add_argument("--prompt", help="instruction text or file (default: Recap-DataComp-1B's)")
    p.add_argument("--max-tokens", type=int, default=FidelityConfig.max_tokens)
    p.add_argument("--dtype", default=FidelityConfig.dtype)
    p.add_argument("--max-model-len", type=int, default=FidelityConfig.max_model_len)
    p.add_argument("--engine-kwargs", type=engine_options, default={},
                   help="vLLM engine options as JSON, e.g. '{\"batch_invariant\": true}'")
    p.add_argument("--batch-size", type=int, default=FidelityConfig.batch_size, help="transformers batch size")
    p.add_argument("--resamples", type=int, default=FidelityConfig.resamples, help="bootstrap resamples")
    p.add_argument("--out", help="JSON report to write (with every caption)")
    a = p.parse_args(argv)
    cfg = FidelityConfig(inputs=tuple(a.input), model=a.model, revision=a.revision, templates=a.templates,
                         backends=a.backends, caption_column=a.caption_column, image_column=a.image_column,
                         image_root=a.image_root, sample=a.sample, seed=a.seed, prompt=load_prompt(a.prompt),
                         max_tokens=a.max_tokens, dtype=a.dtype, max_model_len=a.max_model_len,
                         engine_kwargs=a.engine_kwargs, batch_size=a.batch_size, resamples=a.resamples)
    report = run_fidelity(cfg)
    print(format_report(report))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
