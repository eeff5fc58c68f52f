"""Write the golden fixture of tests/test_convert.py with the ORIGINAL LLaVA code (llava-torch 1.2.2.post1).

Runs only in the throwaway environment of build_env.sh (torch 2.0.1, transformers 4.36.2), never in tests:
  bash infra/llava_reference/build_env.sh /tmp/llava-ref-venv
  /tmp/llava-ref-venv/bin/python infra/llava_reference/make_fixture.py tests/fixtures/llava_reference

It builds, from fixed seeds, a tiny random checkpoint in the original LLaVA layout (`LlavaLlamaForCausalLM`,
config keys as in tennant/llava-llama-3-8b-hqedit, fp16 weights, vision tower embedded), a tiny CLIP
(text + vision, as openai/clip-vit-large-patch14-336 ships) and a tiny LLaMA-3-style tokenizer, then
records what the original inference path (llava/model/builder.py, llava/eval/model_vqa_batch.py)
computes on fixed non-square images, small ones (upscaled) and ones larger than 336 px (downscaled, as
DataComp's): padded pixel values (`process_images` with `image_aspect_ratio: pad`), and per conversation
template the prompt, its ids (`tokenizer_image_token`) and the greedy ids; logits for the default
template. Everything runs in float32 on the CPU (the builder's fp16 cast has no CPU kernels in torch
2.0.1); the weights are fp16 values, so the float32 copies are exact.

The templates are rendered by the original code, not by ours:
- conv_llama3: llava-torch's own `Conversation` class (`SeparatorStyle.MPT`, whose `get_prompt` is the
  same as in the lab's fork) with the fields of UCSC-VLAA/MedTrinity-25M `llava/conversation.py`
  `conv_llama3`, messages appended as its `llava/eval/model_vqa_batch.py` does.
- llava_llama_3: LLaVA-VL/LLaVA-NeXT `llava/conversation.py` renders `SeparatorStyle.LLAMA_3` with the
  tokenizer's `apply_chat_template` (Meta-Llama-3-8B-Instruct's template, system message first); the same
  call here, with that template given explicitly (the fixture tokenizer has none).
- none: the project's former template (no original exists); only its tokenization is the original's.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import Conversation, SeparatorStyle
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from PIL import Image, ImageDraw
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
# UCSC-VLAA/MedTrinity-25M llava/conversation.py `conv_llama3`: the captioner's lab's LLaVA-LLaMA-3 format.
CONV_LLAMA3 = dict(
    system="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an "
           "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
           "user's questions.",
    roles=("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    version="llama3", messages=[], offset=0, sep_style=SeparatorStyle.MPT, sep="<|eot_id|>")
# LLaVA-VL/LLaVA-NeXT llava/conversation.py `conv_llava_llama_3`: its system prompt, and the chat template of
# meta-llama/Meta-Llama-3-8B-Instruct (tokenizer_config.json) that its `get_prompt` applies.
NEXT_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
               "the user provides, and assist the user with a variety of tasks using natural language.")
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# The project's former template: LLaMA-3 turns, no system turn, the tokenizer's one BOS.
NONE_PROMPT = (f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{INSTRUCTION}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
DEFAULT_TEMPLATE = "conv_llama3"  # logits are recorded for this one
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
# paste offset rounds down) and one square image: smooth random colour fields.
IMAGE_SIZES = [(80, 48), (48, 90), (120, 70), (33, 61), (56, 56), (101, 40), (64, 97), (112, 111), (27, 19),
               (70, 112)]
# Larger than 336 px and non-square, downscaled as DataComp's images are (img2dataset keeps <= 512 px):
# gradients with hard-edged shapes, which compress well and resample into many in-between values.
LARGE_SIZES = [(500, 375), (375, 500), (640, 427), (1024, 576), (347, 1001)]
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


def smooth_field(rng, w: int, h: int) -> Image.Image:
    """A smooth random colour field with one hard horizontal line."""
    coarse = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)).copy()
    arr[rng.integers(0, h), :, :] = rng.integers(0, 256, 3)
    return Image.fromarray(arr)


def shapes_on_gradient(rng, w: int, h: int) -> Image.Image:
    """A linear colour gradient with a dozen filled ellipses or rectangles and lines in random colours."""
    x, y = np.linspace(0, 1, w)[None, :, None], np.linspace(0, 1, h)[:, None, None]
    c0, c1, c2 = (rng.integers(0, 256, 3) for _ in range(3))
    image = Image.fromarray((c0 + (c1 - c0) * x + (c2 - c0) * y).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        (x0, x1), (y0, y1) = sorted(rng.integers(0, w, 2)), sorted(rng.integers(0, h, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)((int(x0), int(y0), int(x1), int(y1)), fill=fill)
        draw.line((int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(w)), int(rng.integers(h))),
                  fill=fill, width=int(rng.integers(1, 4)))
    return image


def make_images(out: Path) -> list[Path]:
    """Deterministic, lossless, small PNGs."""
    rng = np.random.default_rng(0)
    paths = []
    sizes = [(size, smooth_field) for size in IMAGE_SIZES] + [(size, shapes_on_gradient) for size in LARGE_SIZES]
    for i, ((w, h), draw) in enumerate(sizes):
        path = out / f"{i:02d}_{w}x{h}.png"
        draw(rng, w, h).save(path)
        paths.append(path)
    return paths


def template_prompts(tokenizer) -> dict[str, str]:
    """Each template's prompt for the Recap instruction, rendered by the original code."""
    question = "<image>\n" + INSTRUCTION  # model_vqa_batch.py: DEFAULT_IMAGE_TOKEN + '\n' + qs
    conv = Conversation(**CONV_LLAMA3)
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    next_prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": NEXT_SYSTEM}, {"role": "user", "content": question}],
        chat_template=META_LLAMA3_TEMPLATE, tokenize=False, add_generation_prompt=True)
    return {"conv_llama3": conv.get_prompt(), "llava_llama_3": next_prompt, "none": NONE_PROMPT}


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
    eos = [tokenizer.convert_tokens_to_ids("<|end_of_text|>"), tokenizer.convert_tokens_to_ids("<|eot_id|>")]

    tensors = {"pixel_values": pixel_values.float().contiguous()}
    templates = {}
    for name, prompt in template_prompts(tokenizer).items():
        input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        logits, greedy, top1, gaps = run_images(model, tokenizer, input_ids, pixel_values, images, eos)
        templates[name] = {"prompt": prompt, "input_ids": input_ids[0].tolist(),
                           # Margins of the greedy decisions: the smallest winning logit (the converter's added
                           # <image> row scores exactly 0) and the smallest gap to the runner-up, per image.
                           "min_top1_logit": [round(x, 4) for x in top1], "min_top2_gap": [round(x, 5) for x in gaps]}
        tensors[f"greedy_ids.{name}"] = torch.tensor(greedy, dtype=torch.long)
        if name == DEFAULT_TEMPLATE:
            tensors["full_logits"] = torch.stack(logits[:FULL_LOGITS_IMAGES]).contiguous()
            tensors["last_logits"] = torch.stack([row[-1] for row in logits]).contiguous()
    save_file(tensors, out / "golden.safetensors")
    meta = {
        "instruction": INSTRUCTION, "default_template": DEFAULT_TEMPLATE, "templates": templates,
        "image_token_index": IMAGE_TOKEN_INDEX, "images": [p.name for p in image_paths],
        "max_new_tokens": MAX_NEW_TOKENS, "eos_token_ids": eos, "full_logits_images": FULL_LOGITS_IMAGES,
        "greedy_padding": -1,
        "generated_with": {"llava-torch": "1.2.2.post1", "torch": torch.__version__,
                           "transformers": transformers_version, "python": sys.version.split()[0]},
    }
    (out / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}")


def run_images(model, tokenizer, input_ids, pixel_values, images, eos):
    """Per image: the logits over the prompt, the greedy ids (padded with -1) and the greedy margins."""
    logits, greedy, top1, gaps = [], [], [], []
    with torch.inference_mode():
        for i, image in enumerate(images):
            pixels = pixel_values[i:i + 1]
            logits.append(model(input_ids, images=pixels, image_sizes=[image.size]).logits[0].float())
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
    return logits, greedy, top1, gaps


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/llava_reference")
