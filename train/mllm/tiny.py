"""Tiny local stand-ins for tests and demos, built in seconds, nothing downloaded.

- a 2-layer Llama with a byte-level BPE tokenizer trained on a few sentences (plus `<image>`);
- a shallow Ti tower saved as one of our training checkpoints (OpenVision 1 or 2);
- a synthetic visual question task: coloured shapes (`dataset.synthetic.shapes`) with
  "What color is the shape?" / "What shape is it?" as LLaVA-format conversations and questions.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from dataset.synthetic.shapes import COLORS, SHAPES, draw_shape, random_sample
from dataset.synthetic.tokenizer import byte_level_bpe
from train.mllm.conversation import IMAGE, SYSTEM, TEMPLATES
from train.model import build_model, config_from_dict

QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is it?"}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", IMAGE]


def tokenizer_corpus() -> list[str]:
    """Sentences covering the templates, the shape task and the recaption templates' words."""
    words = " ".join(list(COLORS) + list(SHAPES))
    templates = " ".join(t.system + t.user + t.assistant for t in TEMPLATES.values())
    return [SYSTEM, templates, words, *QUESTIONS.values(),
            "The image shows a shape on a plain background. The edges are sharp! There is nothing else in the picture.",
            "A single shape is placed on a background. This is a simple graphic. Its colour is, the image has "
            "slight noise. The picture is simple and clean, drawn in a flat colour."]


def build_tokenizer(vocab_size: int = 600, extra_corpus: tuple[str, ...] = ()):
    """Byte-level BPE that, like Llama's tokenizer, puts BOS in front of every text it encodes."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = byte_level_bpe(tokenizer_corpus() + list(extra_corpus), vocab_size, SPECIAL_TOKENS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    return tokenizer


def build_tiny_lm(out_dir: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM and its tokenizer in a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_tower(path: str | Path, *, objective: str = "clips", depth: int = 2, image_size: int = 64,
                     patch_size: int = 16, seed: int = 0) -> Path:
    """A random-weight Ti tower of `depth` blocks saved as a training checkpoint of ours."""
    ti = {"width": 192, "depth": depth, "mlp": 768, "heads": 3}
    config = config_from_dict({"vision": ti, "text": ti, "patch_size": patch_size, "objective": objective,
                               "vocab_size": 512, "context_length": 16, "caption_length": 16})
    torch.manual_seed(seed)
    model = build_model(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": asdict(config),
                "train_config": {"image_size": image_size}}, path)
    return path


def write_shape_task(out_dir: str | Path, n: int, *, image_size: int = 64, seed: int = 0) -> dict[str, Path]:
    """`n` shape images with a two-round conversation each (train.json) and the same questions as
    LLaVA-format jsonl with answers (questions.jsonl); images under `images/`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    conversations, questions = [], []
    for i in range(n):
        sample = random_sample(rng)
        name = f"{i:05d}.png"
        draw_shape(sample, image_size, rng).save(out / "images" / name)
        truth = {"color": sample.color, "shape": sample.shape}
        order = rng.sample(list(QUESTIONS), 2)
        turns = []
        for j, kind in enumerate(order):
            turns += [{"from": "human", "value": (IMAGE + "\n" if j == 0 else "") + QUESTIONS[kind]},
                      {"from": "gpt", "value": truth[kind]}]
            questions.append({"question_id": f"{i}-{kind}", "image": name, "text": QUESTIONS[kind],
                              "answer": truth[kind], "category": kind})
        conversations.append({"id": str(i), "image": name, "conversations": turns})
    (out / "train.json").write_text(json.dumps(conversations))
    (out / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"conversations": out / "train.json", "questions": out / "questions.jsonl", "images": out / "images"}


def main(argv: list[str] | None = None) -> None:
    """`python -m train.mllm.tiny OUT`: the stand-ins and data of the synthetic experiment in OUT."""
    import argparse

    from dataset.synthetic.training_shards import write_recaptioned_wds

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train", type=int, default=400, help="training images (two questions each)")
    p.add_argument("--test", type=int, default=60, help="held-out images (two questions each)")
    a = p.parse_args(argv)
    out = Path(a.out)
    build_tiny_lm(out / "lm", hidden=128)
    build_tiny_tower(out / "tower.pt", image_size=a.image_size)
    write_recaptioned_wds(out / "wds", shards=2, per_shard=32, image_size=a.image_size)
    write_shape_task(out / "train", a.train, image_size=a.image_size, seed=0)
    write_shape_task(out / "test", a.test, image_size=a.image_size, seed=1)
    print(out)


if __name__ == "__main__":
    main()
