"""Exported folders load in open_clip (CLIP) and timm (vision tower) with no code of ours and give our features."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.synthetic.shapes import write_imagefolder
from dataset.synthetic.training_shards import write_recaptioned_wds
from pipelines import export as export_cli
from train.data import eval_transform, expand_urls, read_captions
from train.evaluate import Evaluator
from train.loop import TrainConfig, train
from train.tokenizer import CaptionTokenizer

TEXTS = ["a red circle", "Photo of a BLUE square on a white background!!", "a green &amp; yellow ring",
         " ".join(["a purple cross"] * 40)]  # the last one is truncated

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """Two-step runs of both objectives (their checkpoints are what we export)."""
    root = tmp_path_factory.mktemp("export")
    write_recaptioned_wds(root / "wds", shards=1, per_shard=16, image_size=48)
    write_imagefolder(root / "images", per_class=1, image_size=48)
    CaptionTokenizer.train(read_captions(expand_urls(str(root / "wds")), 100)).save(root / "tokenizer")
    ckpts = {objective: train(TrainConfig(
        data=str(root / "wds"), out=str(root / objective), tokenizer=str(root / "tokenizer"), model="Ti/16", depth=2,
        objective=objective, image_size=48, batch_size=8, samples=16, base_lr=0.03, context_length=20, vocab_size=1024,
        caption_length=12, workers=0, shuffle_buffer=8)) for objective in ("clips", "openvision2")}
    return ckpts, root


@pytest.mark.parametrize("image_size", [None, 64])  # the training resolution, and another one
def test_open_clip_loads_the_export_and_matches(trained: tuple[dict[str, Path], Path], image_size: int | None) -> None:
    ckpts, root = trained
    ckpt = ckpts["clips"]
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


@pytest.mark.parametrize("objective", ["clips", "openvision2"])
def test_timm_loads_the_vision_export_and_matches(trained: tuple[dict[str, Path], Path], objective: str) -> None:
    ckpts, root = trained
    out = root / f"timm_{objective}"
    export_cli.main(["--checkpoint", str(ckpts[objective]), "--out", str(out), "--format", "timm"])
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ours = Evaluator.from_checkpoint(ckpts[objective]).model
    config = timm.data.resolve_data_config({}, model=model)
    preprocess = timm.data.create_transform(**config)
    paths = sorted((root / "images").glob("*/*.jpg"))[:6]
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    assert torch.allclose(pixels, torch.stack([eval_transform(48)(Image.open(p)) for p in paths]), atol=1e-6)
    with torch.no_grad():
        pooled = F.cosine_similarity(model(pixels), ours.encode_image(pixels))
        tokens = model.forward_features(pixels)
        torch.testing.assert_close(tokens, ours.vision.tokens(pixels), rtol=1e-5, atol=1e-5)
    assert pooled.min() > 0.9999
    width = ours.cfg.embed_dim if objective == "clips" else ours.cfg.vision.width  # OV2: the mean patch token
    assert model(pixels).shape == (6, width)


def test_open_clip_export_of_openvision2_explains_itself(trained: tuple[dict[str, Path], Path], capsys) -> None:
    ckpts, root = trained
    with pytest.raises(SystemExit, match="^2$"):
        export_cli.main(["--checkpoint", str(ckpts["openvision2"]), "--out", str(root / "nope")])
    assert "export it as timm" in capsys.readouterr().err
