"""The converted Recap captioner against the ORIGINAL LLaVA code (llava-torch 1.2.2.post1).

tests/fixtures/llava_reference/ was written by infra/llava_reference/make_fixture.py in the throwaway
environment of infra/llava_reference/build_env.sh: a tiny random checkpoint in the original layout,
plus the original code's padded pixel values, prompt ids, logits and greedy ids on fixed images.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from recaption import convert as convert_cli
from recaption.convert import ConvertConfig, convert
from recaption.llava_original import ConversionError
from recaption.prompt import DEFAULT_PROMPT, PromptBuilder

FIXTURE = Path(__file__).parent / "fixtures" / "llava_reference"
CHECKPOINT, VISION, TOKENIZER = FIXTURE / "checkpoint", FIXTURE / "clip-vision", FIXTURE / "tokenizer"
META = json.loads((FIXTURE / "golden.json").read_text())
GOLDEN = load_file(FIXTURE / "golden.safetensors")
ORIGINAL_VOCAB = GOLDEN["last_logits"].shape[1]
IMAGE_TOKENS = 16  # (56 / 14)^2 patches, CLS dropped (mm_vision_select_feature: patch)
# Float32 logits computed by two implementations differ only in summation order (eager vs SDPA attention,
# fused norms): each dot product over <= 256 terms carries a relative error of about 256 x 6e-8 = 1.5e-5,
# and the logits are below 4 in magnitude, so 1e-4 bounds the difference; measured: 6e-6. The smallest
# greedy margin in the fixture (golden.json min_top2_gap) is 1.6e-3, far above it.
LOGIT_ATOL = 1e-4
# Same pixels give the same float32 normalisation up to rounding; one uint8 level is 1/255/std >= 0.0146.
PIXEL_ATOL = 1e-6
ONE_LEVEL = 1 / 255 / 0.26130258


def fixture_images() -> list[Image.Image]:
    return [Image.open(FIXTURE / "images" / name).convert("RGB") for name in META["images"]]


def reference_ids(image_token_id: int) -> list[int]:
    """The original's prompt ids with its -200 placeholder expanded to the llava-hf image tokens."""
    ids = GOLDEN["input_ids"].tolist()
    at = ids.index(META["image_token_index"])
    return ids[:at] + [image_token_id] * IMAGE_TOKENS + ids[at + 1:]


def greedy_reference() -> list[list[int]]:
    return [[t for t in row if t != META["greedy_padding"]] for row in GOLDEN["greedy_ids"].tolist()]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The fixture checkpoint converted once for the module, in several shards as an 8B model is."""
    out = tmp_path_factory.mktemp("converted") / "llava-hf"
    convert_cli.main([str(CHECKPOINT), "--out", str(out), "--vision-tower", str(VISION), "--tokenizer", str(TOKENIZER),
                      "--shard-bytes", "300000"])
    return out


def test_layout_config_and_added_token(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == ORIGINAL_VOCAB  # <image> appended after the original vocabulary
    assert config["text_config"]["vocab_size"] == ORIGINAL_VOCAB + 1
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 500000.0
    eos = json.loads((converted / "generation_config.json").read_text())["eos_token_id"]
    assert eos == META["eos_token_ids"]  # <|end_of_text|> and the end of turn <|eot_id|>
    index = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    weights = {}
    for name in set(index.values()):
        weights.update(load_file(converted / name))
    assert set(weights) == set(index)
    prefixes = ("language_model.", "vision_tower.vision_model.", "multi_modal_projector.")  # the llava-hf layout
    assert all(name.startswith(prefixes) for name in weights)
    assert not weights["language_model.lm_head.weight"][ORIGINAL_VOCAB:].any()
    assert all(t.dtype == torch.float16 for t in weights.values())  # the checkpoint's dtype, as the original runs


def test_prompt_and_ids_match_original(converted):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted)
    prompt = PromptBuilder(processor, DEFAULT_PROMPT).build()
    assert prompt == META["prompt"]
    ids = processor(images=fixture_images()[:1], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == reference_ids(ORIGINAL_VOCAB)


def test_padding_preprocessing_matches_original(converted):
    """(c) Pad to a square with the image mean, then resize: the original's pixels on non-square images."""
    from transformers import AutoProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    images = fixture_images()
    non_square = [i for i, im in enumerate(images) if im.width != im.height]
    assert len(non_square) >= 8
    reference = GOLDEN["pixel_values"][non_square]
    pil = AutoProcessor.from_pretrained(converted, backend="pil").image_processor
    ours = pil([images[i] for i in non_square], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, reference, atol=PIXEL_ATOL, rtol=0)
    # transformers' default torchvision backend resamples slightly differently from PIL: never more than
    # one uint8 level, on a small fraction of values.
    default = AutoProcessor.from_pretrained(converted).image_processor
    diff = (default([images[i] for i in non_square], return_tensors="pt")["pixel_values"] - reference).abs()
    assert diff.max() <= ONE_LEVEL + PIXEL_ATOL and (diff > PIXEL_ATOL).float().mean() < 0.01
    # The control: CLIP's own centre crop (what transformers' LLaVA converter configures) is far off.
    crop = LlavaImageProcessorPil(**{**pil.to_dict(), "do_pad": False})
    cropped = crop([images[i] for i in non_square], return_tensors="pt")["pixel_values"]
    assert (cropped - reference).abs().amax(dim=(1, 2, 3)).min() > 10 * ONE_LEVEL


def test_transformers_logits_match_original(converted):
    """(a) The converted model's logits in transformers, on the original's pixels and prompt ids."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([reference_ids(model.config.image_token_index)])
    with torch.inference_mode():
        for i in range(len(META["images"])):
            logits = model(input_ids=ids, pixel_values=GOLDEN["pixel_values"][i:i + 1]).logits[0]
            assert (logits[:, ORIGINAL_VOCAB:] == 0).all()  # the zero output row of <image>
            torch.testing.assert_close(logits[-1, :ORIGINAL_VOCAB], GOLDEN["last_logits"][i], atol=LOGIT_ATOL, rtol=0)
            if i < META["full_logits_images"]:
                torch.testing.assert_close(logits[:, :ORIGINAL_VOCAB], GOLDEN["full_logits"][i], atol=LOGIT_ATOL,
                                           rtol=0)


def engine_greedy_ids(converted: Path, **engine: object) -> list[list[int]]:
    """Greedy ids of our own engine (AutoProcessor + PromptBuilder + generate) on the fixture images."""
    from recaption.engines import EngineConfig, SamplingConfig, make_engine

    engine = make_engine(EngineConfig(str(converted), dtype="float32", **engine),
                         SamplingConfig(max_tokens=META["max_new_tokens"]))
    try:
        prompt = PromptBuilder(engine.processor, DEFAULT_PROMPT).build()
        images = fixture_images()
        return [g.token_ids for g in engine.generate([prompt] * len(images), images)]
    finally:
        engine.close()


def test_transformers_engine_greedy_matches_original(converted):
    """Our transformers engine captions like the original code."""
    assert engine_greedy_ids(converted, backend="transformers") == greedy_reference()


@pytest.mark.slow
def test_vllm_greedy_ids_match_original(converted):
    """(b) vLLM (CPU build, float32) through our engine: the original's greedy ids on all fixture images."""
    reference = greedy_reference()
    assert len(reference) >= 8 and any(len(r) < META["max_new_tokens"] for r in reference)  # some stop at <|eot_id|>
    assert engine_greedy_ids(converted, backend="vllm", max_model_len=512) == reference


# ---- every unknown key, shape or option is an error naming it --------------------------------------------

def source_copy(tmp_path: Path, config: dict | None = None, weights=None) -> Path:
    """A copy of the fixture checkpoint with config keys replaced (None deletes) and weights edited."""
    src = tmp_path / "src"
    shutil.copytree(CHECKPOINT, src)
    if config:
        data = json.loads((src / "config.json").read_text())
        for key, value in config.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        (src / "config.json").write_text(json.dumps(data))
    if weights:
        tensors = load_file(src / "model.safetensors")
        weights(tensors)
        save_file(tensors, src / "model.safetensors")
    return src


def convert_copy(src: Path, tmp_path: Path, vision: Path = VISION, tokenizer: Path | None = TOKENIZER) -> Path:
    return convert(ConvertConfig(str(src), str(tmp_path / "out"), str(vision), str(tokenizer) if tokenizer else None))


@pytest.mark.parametrize("change, message", [
    ({"mm_resampler_type": "perceiver"}, "unknown config keys ['mm_resampler_type']"),
    ({"mm_projector_type": "linear"}, "mm_projector_type='linear' is not supported"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio='anyres' is not supported"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature='cls' is not supported"),
    ({"mm_use_im_patch_token": None}, "mm_use_im_patch_token=None is not supported"),
    ({"model_type": "llava_mistral"}, "model_type='llava_mistral' is not supported"),
    ({"mm_hidden_size": 64}, "mm_hidden_size=64 but the vision tower's hidden_size is 32"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert_copy(source_copy(tmp_path, config=change), tmp_path)
    assert not (tmp_path / "out").exists()


def test_weight_errors_name_the_weight(tmp_path):
    def extra(t):
        t["model.mm_projector.3.weight"] = torch.zeros(2, 2, dtype=torch.float16)

    with pytest.raises(ConversionError, match=r"unknown weight 'model\.mm_projector\.3\.weight'"):
        convert_copy(source_copy(tmp_path / "a", weights=extra), tmp_path / "a")

    def wrong_shape(t):
        t["model.mm_projector.0.weight"] = t["model.mm_projector.0.weight"][:, :16].clone()

    with pytest.raises(ConversionError, match=r"'multi_modal_projector\.linear_1\.weight' has shape \(128, 16\), "
                                              r"the config implies \(128, 32\)"):
        convert_copy(source_copy(tmp_path / "b", weights=wrong_shape), tmp_path / "b")

    with pytest.raises(ConversionError, match=r"missing weights \['language_model\.model\.norm\.weight'\]"):
        convert_copy(source_copy(tmp_path / "c", weights=lambda t: t.pop("model.norm.weight")), tmp_path / "c")

    def other_tower(t):
        name = "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"
        t[name] = t[name] + 1

    with pytest.raises(ConversionError, match=r"copy of 'vision_tower\.vision_model\.post_layernorm\.weight' "
                                              r"differs from the vision tower"):
        convert_copy(source_copy(tmp_path / "d", weights=other_tower), tmp_path / "d")


def test_tokenizer_and_output_errors(tmp_path, tiny_model, capsys):
    src = source_copy(tmp_path)
    with pytest.raises(ConversionError, match="no tokenizer files; pass --tokenizer"):
        convert_copy(src, tmp_path, tokenizer=None)
    with pytest.raises(ConversionError, match=r"lacks \['<\|start_header_id\|>', '<\|end_header_id\|>', "
                                              r"'<\|eot_id\|>'\]"):
        convert_copy(src, tmp_path, tokenizer=Path(tiny_model))  # the pipeline's tiny LLaVA: no LLaMA-3 turns
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert_copy(src, tmp_path)
    with pytest.raises(SystemExit, match="^2$"):
        convert_cli.main([str(src), "--out", str(tmp_path / "out")])
    assert re.match(r"\[convert\] error: .*out: exists and is not empty", capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial")] == []


def test_legacy_clip_preprocessor_and_unfrozen_tower(tmp_path, converted):
    """openai/clip-vit-large-patch14-336's int sizes give the same processor; an unfrozen tower is read from
    the checkpoint (here equal to the separate one, so the weights are identical)."""
    vision = tmp_path / "clip"
    shutil.copytree(VISION, vision)
    raw = json.loads((vision / "preprocessor_config.json").read_text())
    raw.update(size=56, crop_size=56, feature_extractor_type="CLIPFeatureExtractor")
    (vision / "preprocessor_config.json").write_text(json.dumps(raw))
    out = convert_copy(source_copy(tmp_path, config={"unfreeze_mm_vision_tower": True}), tmp_path, vision=vision)
    assert json.loads((out / "processor_config.json").read_text()) == \
        json.loads((converted / "processor_config.json").read_text())
    ours, reference = load_file(out / "model.safetensors"), {}
    for name in set(json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"].values()):
        reference.update(load_file(converted / name))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    raw["do_pad"] = True
    (vision / "preprocessor_config.json").write_text(json.dumps(raw))
    with pytest.raises(ConversionError, match=r"preprocessor_config\.json: unknown image processor keys \['do_pad'\]"):
        convert_copy(source_copy(tmp_path / "b"), tmp_path / "b", vision=vision)
