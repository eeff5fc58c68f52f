"""Export a training checkpoint as an open_clip model folder, or its vision tower as a timm folder.

  python pipelines/export.py --checkpoint RUN/checkpoints/step_00001000.pt --out DIR
  #   open_clip.create_model_and_transforms('local-dir:DIR'); open_clip.get_tokenizer('local-dir:DIR')
  python pipelines/export.py --checkpoint ... --out DIR --format timm      (vision tower; OpenVision 2)
  #   timm.create_model('local-dir:DIR', pretrained=True)
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse

from dataset.logs import one_line_errors
from train.export import FORMATS, export, export_timm


@one_line_errors("export")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                   help="open_clip: the CLIP model (objective clips); timm: the vision tower alone (any objective)")
    p.add_argument("--image-size", type=int,
                   help="resolution the exported position table is written for (default: the training size)")
    p.add_argument("--hub-id", help="open_clip: Hub repo id recorded as the tokenizer source for hf-hub: loading "
                                    "(default: the folder name; local-dir: loading ignores it)")
    a = p.parse_args(argv)
    if a.format == "timm":
        out = export_timm(a.checkpoint, a.out, a.image_size)
    else:
        out = export(a.checkpoint, a.out, a.image_size, a.hub_id)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
