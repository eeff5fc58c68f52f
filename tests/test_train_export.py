"""An exported folder loads in open_clip with no code of ours and gives our embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.synthetic.shapes import write_imagefolder
from dataset.synthetic.training_shards import write_recaptioned_wds
from pipelines import export as export_cli
from train.data import eval_transform
from train.evaluate import Evaluator
from train.loop import TrainConfig, train

TEXTS = ["a red circle", "Photo of a BLUE square on a white background!!", "a green &amp; yellow ring",
         " ".join(["a purple cross"] * 40)]  # the last one is truncated


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    write_recaptioned_wds(root / "wds", shards=1, per_shard=16, image_size=48)
    write_imagefolder(root / "images", per_class=1, image_size=48)
    ckpt = train(TrainConfig(data=str(root / "wds" / "*.tar"), out=str(root / "run"), model="Ti/16", depth=2,
                             image_size=48, batch_size=8, samples=16, base_lr=0.03, context_length=20,
                             caption_length=12, workers=0, shuffle_buffer=8))
    return ckpt, root


@pytest.mark.parametrize("image_size", [None, 64])  # the training resolution, and another one
def test_open_clip_loads_the_export_and_matches(trained: tuple[Path, Path], image_size: int | None) -> None:
    ckpt, root = trained
    out = root / f"open_clip_{image_size}"
    size_args = ["--image-size", str(image_size)] if image_size else []
    export_cli.main(["--checkpoint", str(ckpt), "--out", str(out), *size_args])
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["tokenizer_mode"] == "clips"

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    ours = Evaluator.from_checkpoint(ckpt, image_size=image_size)
    size = image_size or 48

    paths = sorted((root / "images").glob("*/*.jpg"))[:6]
    theirs_pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
    our_pixels = torch.stack([eval_transform(size)(Image.open(p)) for p in paths])
    assert torch.equal(theirs_pixels, our_pixels)
    ids = tokenizer(TEXTS)
    assert torch.equal(ids, ours.tokenizer.encode(TEXTS, ours.model.cfg.context_length))
    with torch.no_grad():
        image_cos = F.cosine_similarity(model.encode_image(theirs_pixels), ours.model.encode_image(our_pixels))
        text_cos = F.cosine_similarity(model.encode_text(ids), ours.model.encode_text(ids))
    assert image_cos.min() > 0.9999 and text_cos.min() > 0.9999
    assert model.logit_scale.item() == pytest.approx(ours.model.logit_scale.item())
