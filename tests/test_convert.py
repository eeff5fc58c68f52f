"""The converted Recap captioner against the ORIGINAL LLaVA code (llava-torch 1.2.2.post1).

tests/fixtures/llava_reference/ was written by infra/llava_reference/make_fixture.py in the throwaway
environment of infra/llava_reference/build_env.sh: a tiny random checkpoint in the original layout,
plus the original code's padded pixel values (small images upscaled, images larger than 336 px
downscaled) and, per conversation template rendered by the original code (conv_llama3, llava_llama_3,
none), its prompt ids and greedy ids; logits for the default template, conv_llama3.
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

from pipelines import recaption as recaption_cli
from recaption import convert as convert_cli
from recaption.convert import ConvertConfig, convert
from recaption.engines import EngineConfig, SamplingConfig, load_processor, make_engine
from recaption.job import CaptionJob
from recaption.llava_original import ConversionError
from recaption.prompt import (
    CHAT_TEMPLATES,
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_PROMPT,
    PromptBuilder,
    identify_chat_template,
)

FIXTURE = Path(__file__).parent / "fixtures" / "llava_reference"
CHECKPOINT, VISION, TOKENIZER = FIXTURE / "checkpoint", FIXTURE / "clip-vision", FIXTURE / "tokenizer"
META = json.loads((FIXTURE / "golden.json").read_text())
GOLDEN = load_file(FIXTURE / "golden.safetensors")
ORIGINAL_VOCAB = GOLDEN["last_logits"].shape[1]
IMAGE_TOKENS = 16  # (56 / 14)^2 patches, CLS dropped (mm_vision_select_feature: patch)
# Float32 logits computed by two implementations differ only in summation order (eager vs SDPA attention,
# fused norms): each dot product over <= 256 terms carries a relative error of about 256 x 6e-8 = 1.5e-5,
# and the logits are below 4 in magnitude, so 1e-4 bounds the difference; measured: 6e-6. A greedy step
# can flip only where the original's top-2 gap (golden.json min_top2_gap) is below twice that bound;
# the smallest gap in the fixture is 1.7e-4.
LOGIT_ATOL = 1e-4
# Same pixels give the same float32 normalisation up to rounding; one uint8 level is 1/255/std, at most
# 0.0150 (CLIP's smallest std, green's 0.2613) and at least 0.0142 (blue's 0.2758).
PIXEL_ATOL = 1e-6
ONE_LEVEL = 1 / 255 / 0.26130258


def fixture_images() -> list[Image.Image]:
    return [Image.open(FIXTURE / "images" / name).convert("RGB") for name in META["images"]]


def reference_ids(template: str, image_token_id: int) -> list[int]:
    """The original's prompt ids for `template`, its -200 placeholder expanded to the llava-hf image tokens."""
    ids = list(META["templates"][template]["input_ids"])
    at = ids.index(META["image_token_index"])
    return ids[:at] + [image_token_id] * IMAGE_TOKENS + ids[at + 1:]


def greedy_reference(template: str = DEFAULT_CHAT_TEMPLATE) -> list[list[int]]:
    return [[t for t in row if t != META["greedy_padding"]] for row in GOLDEN[f"greedy_ids.{template}"].tolist()]


def test_fixture_covers_what_it_claims():
    """The images and margins the tests below rely on (a regenerated fixture must keep them)."""
    images = fixture_images()
    assert sum(im.width != im.height for im in images) >= 12
    assert sum(min(im.size) > 336 and im.width != im.height for im in images) >= 4  # DataComp's downscale path
    assert any(max(im.size) < 56 for im in images)                                   # and the upscale path
    assert META["default_template"] == DEFAULT_CHAT_TEMPLATE and set(META["templates"]) == set(CHAT_TEMPLATES)
    for template in META["templates"].values():
        assert min(template["min_top2_gap"]) > LOGIT_ATOL
    assert META["templates"]["conv_llama3"]["input_ids"][:2] == [0, 0]  # two BOS, as tokenizer_image_token keeps them
    assert META["templates"]["none"]["input_ids"][:2] != [0, 0]


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


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_each_template_renders_and_tokenizes_as_the_original(converted, template):
    """Every named template gives the original code's prompt text and ids (two BOS where it has them)."""
    processor = load_processor(EngineConfig(str(converted), chat_template=template))
    prompt = PromptBuilder(processor, DEFAULT_PROMPT).build()
    assert prompt == META["templates"][template]["prompt"]
    ids = processor(images=fixture_images()[:1], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == reference_ids(template, ORIGINAL_VOCAB)
    others = [reference_ids(t, ORIGINAL_VOCAB) for t in CHAT_TEMPLATES if t != template]
    assert ids not in others  # the negative control: no other template gives these ids


def test_converted_folder_renders_the_default_template(converted):
    processor = load_processor(EngineConfig(str(converted)))
    assert PromptBuilder(processor, DEFAULT_PROMPT).build() == META["templates"][DEFAULT_CHAT_TEMPLATE]["prompt"]
    assert identify_chat_template(processor) == DEFAULT_CHAT_TEMPLATE


def test_template_option_writes_that_template(tmp_path):
    custom = "system:Describe images for a blind reader, 'exactly'.\nNo guessing."
    for spec in ("llava_llama_3", custom):
        out = convert(ConvertConfig(str(CHECKPOINT), str(tmp_path / spec[:6]), str(VISION), str(TOKENIZER),
                                    template=spec))
        processor = load_processor(EngineConfig(str(out)))
        assert identify_chat_template(processor) == spec
    assert "No guessing.<|eot_id|><|start_header_id|>user" in PromptBuilder(processor, DEFAULT_PROMPT).build()
    with pytest.raises(ValueError, match=r"unknown chat template 'llama3'; choose one of \['conv_llama3'"):
        convert(ConvertConfig(str(CHECKPOINT), str(tmp_path / "bad"), str(VISION), str(TOKENIZER), template="llama3"))


def test_template_and_image_backend_enter_the_fingerprint_and_the_record(converted):
    def job(**engine) -> CaptionJob:
        return CaptionJob(EngineConfig(str(converted), **engine)).pinned()

    own = job()
    assert own.engine.chat_template == DEFAULT_CHAT_TEMPLATE  # the folder's own template, known by its name
    assert job(chat_template=DEFAULT_CHAT_TEMPLATE).fingerprint == own.fingerprint  # same captions, same run
    others = {job(chat_template="none").fingerprint, job(chat_template="system:Be brief.").fingerprint,
              job(engine_kwargs={"batch_invariant": True}).fingerprint}
    assert own.fingerprint not in others and len(others) == 3
    record = own.caption_config()
    assert record["chat_template"] == DEFAULT_CHAT_TEMPLATE and record["image_backend"] == "pil"
    assert set(record["versions"]) == {"vllm", "transformers", "torch"} and all(record["versions"].values())
    flags = ["--input", "in/", "--output", "out/", "--model", str(converted), "--chat-template", "none"]
    assert recaption_cli.config_from_args(recaption_cli.parse_args(flags)).job.engine.chat_template == "none"


def test_padding_preprocessing_matches_original(converted):
    """(c) Pad to a square with the image mean, then resize with PIL: the original's pixels, also on images
    larger than 336 px (downscaled), through the processor our engines load."""
    from transformers import AutoProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    images = fixture_images()
    reference = GOLDEN["pixel_values"]
    ours = load_processor(EngineConfig(str(converted))).image_processor
    assert isinstance(ours, LlavaImageProcessorPil)
    torch.testing.assert_close(ours(images, return_tensors="pt")["pixel_values"], reference, atol=PIXEL_ATOL, rtol=0)
    # The control: transformers' default where torchvision is installed (its torchvision backend) resamples
    # slightly differently: one uint8 level, on a few values of almost every image.
    default = AutoProcessor.from_pretrained(converted).image_processor
    diff = (default(images, return_tensors="pt")["pixel_values"] - reference).abs()
    assert diff.max() <= ONE_LEVEL + PIXEL_ATOL and (diff.amax(dim=(1, 2, 3)) > ONE_LEVEL / 2).sum() >= 10
    # CLIP's own centre crop (what transformers' LLaVA converter configures) is far off on non-square images.
    non_square = [i for i, im in enumerate(images) if im.width != im.height]
    crop = LlavaImageProcessorPil(**{**ours.to_dict(), "do_pad": False})
    cropped = crop([images[i] for i in non_square], return_tensors="pt")["pixel_values"]
    assert (cropped - reference[non_square]).abs().amax(dim=(1, 2, 3)).min() > 10 * ONE_LEVEL


def test_transformers_logits_match_original(converted):
    """(a) The converted model's logits in transformers, on the original's pixels and prompt ids."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([reference_ids(DEFAULT_CHAT_TEMPLATE, model.config.image_token_index)])
    with torch.inference_mode():
        for i in range(len(META["images"])):
            logits = model(input_ids=ids, pixel_values=GOLDEN["pixel_values"][i:i + 1]).logits[0]
            assert (logits[:, ORIGINAL_VOCAB:] == 0).all()  # the zero output row of <image>
            torch.testing.assert_close(logits[-1, :ORIGINAL_VOCAB], GOLDEN["last_logits"][i], atol=LOGIT_ATOL, rtol=0)
            if i < META["full_logits_images"]:
                torch.testing.assert_close(logits[:, :ORIGINAL_VOCAB], GOLDEN["full_logits"][i], atol=LOGIT_ATOL,
                                           rtol=0)


def greedy_ids(engine, converted: Path, template: str) -> list[list[int]]:
    """Greedy ids of our engine on the fixture images, prompts built as a recaption job builds them."""
    prompt = PromptBuilder(load_processor(EngineConfig(str(converted), chat_template=template)), DEFAULT_PROMPT).build()
    images = fixture_images()
    return [g.token_ids for g in engine.generate([prompt] * len(images), images)]


@pytest.fixture(scope="module")
def transformers_engine(converted):
    engine = make_engine(EngineConfig(str(converted), backend="transformers", dtype="float32"),
                         SamplingConfig(max_tokens=META["max_new_tokens"]))
    yield engine
    engine.close()


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_transformers_engine_greedy_matches_original(converted, transformers_engine, template):
    """Our transformers engine captions like the original code under each template, and like no other
    template's: the negative control that the greedy ids are sensitive to the template."""
    ours = greedy_ids(transformers_engine, converted, template)
    assert ours == greedy_reference(template)
    for other in CHAT_TEMPLATES:
        if other != template:
            assert sum(a == b for a, b in zip(ours, greedy_reference(other), strict=True)) == 0, other


@pytest.fixture(scope="module")
def vllm_converted(converted):
    """One vLLM engine on the converted model for this module. No multimodal processor cache: with it, a
    request for an image seen before carries no pixels to the engine core (the test below reads them)."""
    engine = make_engine(EngineConfig(str(converted), dtype="float32", max_model_len=512,
                                      engine_kwargs={"mm_processor_cache_gb": 0}),
                         SamplingConfig(max_tokens=META["max_new_tokens"]))
    yield engine
    engine.close()


@pytest.mark.slow
def test_vllm_pixels_equal_the_originals(vllm_converted):
    """vLLM's own preprocessing (the request its front end builds for the engine core) gives the original's
    pixel values bit for bit: PIL, not the torchvision backend transformers would pick inside vLLM."""
    engine = vllm_converted.engine
    prompt = PromptBuilder(vllm_converted.processor, DEFAULT_PROMPT).build()
    for i, image in enumerate(fixture_images()):
        request = engine.input_processor.process_inputs(
            f"pixels-{i}", {"prompt": prompt, "multi_modal_data": {"image": image}}, vllm_converted.params,
            supported_tasks=engine.get_supported_tasks())
        assert request.prompt_token_ids[:2] == [0, 0]  # the default template's two BOS reach the engine
        pixels = request.mm_features[0].data["pixel_values"].data
        torch.testing.assert_close(pixels, GOLDEN["pixel_values"][i], atol=PIXEL_ATOL, rtol=0)


@pytest.mark.slow
def test_vllm_greedy_ids_match_original(converted, vllm_converted):
    """(b) vLLM (CPU build, float32) through our engine: the original's greedy ids on all fixture images, under
    the default template and under `none`, whose captions partly stop at <|eot_id|>."""
    assert any(len(r) < META["max_new_tokens"] for r in greedy_reference("none"))
    for template in (DEFAULT_CHAT_TEMPLATE, "none"):
        assert greedy_ids(vllm_converted, converted, template) == greedy_reference(template), template


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
    with pytest.raises(ConversionError, match=r"lacks \['<\|begin_of_text\|>', '<\|start_header_id\|>', "
                                              r"'<\|end_header_id\|>', '<\|eot_id\|>'\]"):
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
