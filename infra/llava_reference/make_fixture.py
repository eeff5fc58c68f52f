"""Write the golden fixture of tests/test_convert.py with the ORIGINAL LLaVA code (llava-torch 1.2.2.post1).

Runs only in the throwaway environment of build_env.sh (torch 2.0.1, transformers 4.36.2), never in tests:
  bash infra/llava_reference/build_env.sh /tmp/llava-ref-venv
  /tmp/llava-ref-venv/bin/python infra/llava_reference/make_fixture.py tests/fixtures/llava_reference

It builds, from fixed seeds, a tiny random checkpoint in the original LLaVA layout (`LlavaLlamaForCausalLM`,
config keys as in tennant/llava-llama-3-8b-hqedit, fp16 weights, vision tower embedded), a tiny CLIP
(text + vision, as openai/clip-vit-large-patch14-336 ships) and a tiny LLaMA-3-style tokenizer, then
records what the original inference path (llava/model/builder.py, llava/eval/run_llava.py) computes
on fixed non-square images: padded pixel values (`process_images` with `image_aspect_ratio: pad`),
prompt ids (`tokenizer_image_token`), logits and greedy ids. Everything runs in float32 on the CPU
(the builder's fp16 cast has no CPU kernels in torch 2.0.1); the weights are fp16 values, so the
float32 copies are exact.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    PreTrainedTokenizerFast,
)
from transformers import __version__ as transformers_version

# Recap-DataComp-1B's instruction (arXiv:2406.08478), as recaption/prompt.py's DEFAULT_PROMPT.
INSTRUCTION = "Please generate a detailed caption of this image. Please be as descriptive as possible."
# LLaMA-3 Instruct turn format (the captioner's authors: "we changed the conversation template to
# LLaMA3's", UCSC-VLAA/Recap-DataComp-1B issue #2), image first as in LLaVA's training data; the
# tokenizer adds <|begin_of_text|>. The converter's chat template must render exactly this.
PROMPT = (f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{INSTRUCTION}<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n")
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    INSTRUCTION,
    "The image shows a red circle on a white background with a soft shadow.",
    "A blue square and a green triangle sit next to each other on a wooden table.",
    "user assistant: a photo of a cat, a dog, a car, a tree, a house and the sky.",
    "There are several colourful shapes: yellow stars, purple rings, orange crosses and black diamonds.",
]
IMAGE_SIZE, PATCH_SIZE = 56, 14
# (width, height): wide, tall, smaller than the tower's input (upscaled), odd differences (the
# paste offset rounds down) and one square image.
IMAGE_SIZES = [(80, 48), (48, 90), (120, 70), (33, 61), (56, 56), (101, 40), (64, 97), (112, 111), (27, 19),
               (70, 112)]
MAX_NEW_TOKENS = 12
FULL_LOGITS_IMAGES = 1  # images whose logits are kept at every prompt position (the rest: last position)


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with LLaMA-3's special tokens that prepends <|begin_of_text|> like LLaMA-3's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>")
    tokenizer.save_pretrained(out)
    return tokenizer


def build_clip(out: Path) -> None:
    """A tiny CLIP (both towers, fp16) plus its image processor, as a Hub CLIP folder has them."""
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        projection_dim=16)
    CLIPModel(config).half().save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)


def build_checkpoint(out: Path, tokenizer, vision_dir: str) -> None:
    """A random LlavaLlamaForCausalLM saved in the original layout, vision tower included, fp16."""
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=500000.0, initializer_range=0.1, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|end_of_text|>"),
        # The LLaVA keys of tennant/llava-llama-3-8b-hqedit's config.json, same values.
        image_aspect_ratio="pad", freeze_mm_mlp_adapter=False, mm_hidden_size=32, mm_patch_merge_type="flat",
        mm_projector_lr=2e-05, mm_projector_type="mlp2x_gelu", mm_use_im_patch_token=False,
        mm_use_im_start_end=False, mm_vision_select_feature="patch", mm_vision_select_layer=-2,
        mm_vision_tower=vision_dir, tokenizer_model_max_length=2048, tokenizer_padding_side="right",
        tune_mm_mlp_adapter=False, use_mm_proj=True,
    )
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(config)
    model.get_model().get_vision_tower().load_model()  # training loads the tower; its weights get saved too
    model.half().save_pretrained(out, safe_serialization=True)


def make_images(out: Path) -> list[Path]:
    """Smooth random colour fields with a few hard edges: deterministic, lossless, small PNGs."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        coarse = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).copy()
        arr[rng.integers(0, h), :, :] = rng.integers(0, 256, 3)  # one hard horizontal line
        path = out / f"{i:02d}_{w}x{h}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def load_like_builder(checkpoint: Path, tokenizer_dir: Path):
    """llava/model/builder.py's `load_pretrained_model` for a LLaVA-LLaMA checkpoint, in float32 on the CPU."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(checkpoint, low_cpu_mem_usage=True, torch_dtype=torch.float32)
    assert not model.config.mm_use_im_patch_token and not model.config.mm_use_im_start_end
    model.resize_token_embeddings(len(tokenizer))
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model()
    vision_tower.to(dtype=torch.float32)
    return tokenizer, model.eval(), vision_tower.image_processor


def main(out_dir: str) -> None:
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # mm_vision_tower is the relative folder "clip-vision", found the way LLaVA finds it
    tokenizer = build_tokenizer(out / "tokenizer")
    build_clip(out / "clip-vision")
    build_checkpoint(out / "checkpoint", tokenizer, "clip-vision")
    image_paths = make_images(out / "images")

    tokenizer, model, image_processor = load_like_builder(out / "checkpoint", out / "tokenizer")
    images = [Image.open(p).convert("RGB") for p in image_paths]
    pixel_values = process_images(images, image_processor, model.config)
    input_ids = tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    eos = [tokenizer.convert_tokens_to_ids("<|end_of_text|>"), tokenizer.convert_tokens_to_ids("<|eot_id|>")]

    full_logits, last_logits, greedy, top1, gaps = [], [], [], [], []
    with torch.inference_mode():
        for i, image in enumerate(images):
            pixels = pixel_values[i:i + 1]
            logits = model(input_ids, images=pixels, image_sizes=[image.size]).logits[0].float()
            if i < FULL_LOGITS_IMAGES:
                full_logits.append(logits)
            last_logits.append(logits[-1])
            result = model.generate(input_ids, images=pixels, image_sizes=[image.size], do_sample=False,
                                   num_beams=1, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=eos[0],
                                   use_cache=True, return_dict_in_generate=True, output_scores=True)
            ids = result.sequences[0].tolist()
            best = torch.stack(result.scores)[:, 0].topk(2).values  # per step: the two highest logits
            top1.append(best[:, 0].min().item())
            gaps.append((best[:, 0] - best[:, 1]).min().item())
            # Called with inputs_embeds only, generate() starts the returned ids with a BOS placeholder.
            assert ids[0] == tokenizer.bos_token_id, ids
            greedy.append(ids[1:] + [-1] * (MAX_NEW_TOKENS + 1 - len(ids)))

    save_file({
        "pixel_values": pixel_values.float().contiguous(),
        "input_ids": input_ids[0].contiguous(),
        "full_logits": torch.stack(full_logits).contiguous(),
        "last_logits": torch.stack(last_logits).contiguous(),
        "greedy_ids": torch.tensor(greedy, dtype=torch.long),
    }, out / "golden.safetensors")
    meta = {
        "prompt": PROMPT, "instruction": INSTRUCTION, "image_token_index": IMAGE_TOKEN_INDEX,
        "images": [p.name for p in image_paths], "max_new_tokens": MAX_NEW_TOKENS, "eos_token_ids": eos,
        "full_logits_images": FULL_LOGITS_IMAGES, "greedy_padding": -1,
        # Margins of the greedy decisions: the smallest winning logit (the converter's added <image> row
        # scores exactly 0) and the smallest gap to the runner-up, per image, over all steps.
        "min_top1_logit": [round(x, 4) for x in top1], "min_top2_gap": [round(x, 5) for x in gaps],
        "generated_with": {"llava-torch": "1.2.2.post1", "torch": torch.__version__,
                           "transformers": transformers_version, "python": sys.version.split()[0]},
    }
    (out / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/llava_reference")
