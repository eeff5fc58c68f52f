"""Build a deterministic random-weight LLaVA in the llava-hf layout that vLLM and transformers both load.

`python -m recaption.tiny OUTDIR`. Nothing is downloaded; tests and the demo caption with it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dataset.synthetic.tokenizer import byte_level_bpe

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{{ '\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<image>"]
TRAINING_TEXT = [
    "Please generate a detailed caption of this image. Please be as descriptive as possible.",
    "The image shows a red circle on a white background with a soft shadow.",
    "A blue square and a green triangle sit next to each other on a wooden table.",
    "USER: ASSISTANT: a photo of a cat, a dog, a car, a tree, a house and the sky.",
    "There are several colourful shapes: yellow stars, purple rings, orange crosses and black diamonds.",
]
IMAGE_SIZE, PATCH_SIZE = 56, 14


def build_tokenizer(vocab_size: int = 512):
    return byte_level_bpe(TRAINING_TEXT, vocab_size, SPECIAL_TOKENS, unk_token=None,
                          extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0, text_hidden: int = 128, text_layers: int = 2,
                image_size: int = IMAGE_SIZE):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=PATCH_SIZE, projection_dim=32)
    # head_dim 64: vLLM's CPU attention rejects 16 and 32.
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=text_hidden // 64,
                       num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).float().eval()


def to_llava_hf_layout(out: Path) -> None:
    """Rename transformers-5 vision keys to the llava-hf layout (`vision_tower.vision_model.*`)."""
    from safetensors.torch import load_file, save_file

    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {}
        for name, tensor in tensors.items():
            for prefix in ("vision_tower.", "model.vision_tower."):
                if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                    name = prefix + "vision_model." + name[len(prefix):]
                    break
            renamed[name] = tensor.contiguous()
        save_file(renamed, path, metadata={"format": "pt"})


def build_tiny_llava(out_dir: str | Path, seed: int = 0, text_hidden: int = 128, text_layers: int = 2,
                     image_size: int = IMAGE_SIZE) -> Path:
    """The model, processor and tokenizer in `out_dir`; a larger language model costs more per token, a larger
    image size gives more image tokens ((image_size / 14)^2: 336 px gives the Recap captioner's 576; benchmarks)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, image_size)
    model = build_model(tokenizer, seed, text_hidden, text_layers, image_size)
    model.generation_config.max_length = None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()   # a tiny model needs no progress bar
    model.save_pretrained(out)
    processor.save_pretrained(out)
    to_llava_hf_layout(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write the model, processor and tokenizer into")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_tiny_llava(a.out, a.seed))


if __name__ == "__main__":
    main()
