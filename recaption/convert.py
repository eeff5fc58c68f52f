"""Convert an original-LLaVA checkpoint into a llava-hf folder that vLLM and transformers load.

  python -m recaption.convert SRC --out DIR [--vision-tower DIR] [--tokenizer DIR] [--template NAME]

SRC is a haotian-liu/LLaVA `LlavaLlamaForCausalLM` folder or Hub id (LLaVA-1.5 architecture), such as the
Recap-DataComp-1B captioner tennant/llava-llama-3-8b-hqedit. The vision tower defaults to the checkpoint's
`mm_vision_tower` (openai/clip-vit-large-patch14-336 there), as the original code loads it, and the tokenizer
to SRC (which ships none for the Recap captioner: pass a LLaMA-3-8B tokenizer). The folder's chat template
is the conversation format `--template` names (recaption/prompt.py; default conv_llama3, the captioner's
lab's own). Hub ids are downloaded; local folders are read as they are.
The result is written next to DIR and renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dataset.logs import one_line_errors
from recaption.llava_original import (
    EMBEDDED_VISION,
    ConversionError,
    OriginalLlava,
    expected_shapes,
    language_name,
    parse_config,
    read_json,
    vision_name,
)
from recaption.prompt import DEFAULT_CHAT_TEMPLATE, chat_template, missing_llama3_tokens

IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|eot_id|>"
# Keys of a CLIP preprocessor_config.json (openai/clip-vit-large-patch14-336 uses the legacy int sizes).
IMAGE_PROCESSOR_KEYS = frozenset({
    "crop_size", "do_center_crop", "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
    "image_std", "resample", "rescale_factor", "size",
})
IMAGE_PROCESSOR_IGNORED = frozenset({"feature_extractor_type", "image_processor_type", "processor_class"})
# generation_config.json: token ids are merged; sampling defaults are dropped (Recap decodes greedily and
# the pipeline passes its own sampling parameters).
GENERATION_IGNORED = frozenset({
    "_from_model_config", "transformers_version", "do_sample", "temperature", "top_p", "top_k", "max_length",
    "max_new_tokens", "num_beams", "use_cache", "bos_token_id", "pad_token_id", "eos_token_id",
})


@dataclass(frozen=True)
class ConvertConfig:
    src: str
    out: str
    vision_tower: str | None = None  # default: the checkpoint's mm_vision_tower
    tokenizer: str | None = None     # default: SRC
    shard_bytes: int = 4 * 2**30     # largest output safetensors file
    template: str = DEFAULT_CHAT_TEMPLATE  # the chat template written (a recaption.prompt spec)


def resolve_folder(name: str, what: str) -> Path:
    """A local folder as it is, else a Hub snapshot of its JSON files and weights (.bin only without safetensors)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "pytorch_model*.bin"]))
    except Exception as e:  # the Hub client raises many types; all mean "not available"
        raise ConversionError(f"{what} {name!r} is neither a local folder nor downloadable: {e}") from None
    return folder


def load_tokenizer(source: Path, name: str | None):
    """The LLaMA-3 tokenizer with <image> added and a pad token; errors name what is missing."""
    from transformers import AddedToken, AutoTokenizer

    location = name or str(source)
    if name is None and not any((source / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConversionError(f"{source}: no tokenizer files; pass --tokenizer (a LLaMA-3-8B tokenizer folder or "
                              "Hub id, e.g. meta-llama/Meta-Llama-3-8B-Instruct)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as e:  # transformers raises OSError, ValueError, ... for unloadable folders
        raise ConversionError(f"tokenizer {location}: cannot load ({type(e).__name__}: {e})") from None
    missing = missing_llama3_tokens(tokenizer)
    if missing:
        raise ConversionError(f"tokenizer {location}: lacks {missing}; the captioner's LLaMA-3 conversation "
                              "format needs a LLaMA-3 tokenizer")
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ConversionError(f"tokenizer {location}: already has {IMAGE_TOKEN!r}; expected a plain LLaMA-3 tokenizer")
    if tokenizer.bos_token_id is None or tokenizer("x").input_ids[:1] != [tokenizer.bos_token_id]:
        raise ConversionError(f"tokenizer {location}: does not start its encodings with a BOS token, "
                              "which the LLaMA-3 prompt needs")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:  # LLaMA-3 has none; batched generation pads on the left with it, masked
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_image_processor(vision_dir: Path, image_size: int, pad_to_square: bool):
    """LLaVA's preprocessing: pad to a square with the image mean (if `pad`), then the tower's CLIP steps."""
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    path = vision_dir / "preprocessor_config.json"
    raw = read_json(path)
    unknown = sorted(set(raw) - IMAGE_PROCESSOR_KEYS - IMAGE_PROCESSOR_IGNORED)
    if unknown:
        raise ConversionError(f"{path}: unknown image processor keys {unknown}")
    kwargs = {k: v for k, v in raw.items() if k in IMAGE_PROCESSOR_KEYS}
    if isinstance(kwargs.get("size"), int):  # legacy CLIP format: the shortest edge
        kwargs["size"] = {"shortest_edge": kwargs["size"]}
    if isinstance(kwargs.get("crop_size"), int):
        kwargs["crop_size"] = {"height": kwargs["crop_size"], "width": kwargs["crop_size"]}
    square = {"height": image_size, "width": image_size}
    if kwargs.get("size") != {"shortest_edge": image_size} or (
            kwargs.get("do_center_crop", True) and kwargs.get("crop_size") != square):
        raise ConversionError(f"{path}: size={kwargs.get('size')} crop_size={kwargs.get('crop_size')} do not give "
                              f"the tower's {image_size}x{image_size} input")
    return LlavaImageProcessor(do_pad=pad_to_square, **kwargs)


def build_config(original: OriginalLlava, vision_config, tokenizer, source: Path):
    """The llava-hf `LlavaConfig`: text config from the checkpoint, vocabulary grown for <image>."""
    from transformers import LlamaConfig, LlavaConfig

    if vision_config.hidden_size != original.vision_hidden_size:
        raise ConversionError(f"{source}: mm_hidden_size={original.vision_hidden_size} but the vision tower's "
                              f"hidden_size is {vision_config.hidden_size}")
    if not -vision_config.num_hidden_layers <= original.feature_layer <= vision_config.num_hidden_layers:
        raise ConversionError(f"{source}: mm_vision_select_layer={original.feature_layer} is outside the "
                              f"tower's {vision_config.num_hidden_layers} layers")
    text = dict(original.text)
    text["vocab_size"] = max(text["vocab_size"], len(tokenizer))
    text["pad_token_id"] = tokenizer.pad_token_id
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        text_config=LlamaConfig(**text), vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=original.feature_layer, vision_feature_select_strategy=original.select_strategy,
        image_seq_length=patches + (original.select_strategy == "full"),
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
        dtype=original.dtype, architectures=["LlavaForConditionalGeneration"],
    )


def eos_ids(source: Path, original: OriginalLlava, tokenizer) -> list[int]:
    """The checkpoint's end-of-text ids plus LLaMA-3's end of turn, which ends every reply."""
    ids: list[int] = []
    generation_path = source / "generation_config.json"
    generation = read_json(generation_path) if generation_path.exists() else {}
    unknown = sorted(set(generation) - GENERATION_IGNORED)
    if unknown:
        raise ConversionError(f"{generation_path}: unknown generation keys {unknown}")
    for value in (original.text.get("eos_token_id"), generation.get("eos_token_id"), tokenizer.eos_token_id,
                  tokenizer.convert_tokens_to_ids(END_OF_TURN)):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    return files


def read_weights(path: Path):
    """(name, tensor) pairs of one weight file, one tensor in memory at a time for safetensors."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


class ShardWriter:
    """Writes tensors into safetensors files of at most `limit` bytes, then the index."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit = out, limit
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.out / f"part-{len(self.files)}.safetensors", metadata={"format": "pt"})
        self.files.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        if n == 1:
            (self.out / "part-0.safetensors").rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"part-{i}.safetensors").rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        (self.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                          indent=2))


def convert_weights(source: Path, vision_dir: Path, original: OriginalLlava, config, out: Path, shard_bytes: int):
    """Rename, check and write every weight; the vocabulary rows added for new tokens are zero."""
    import torch

    dtype = getattr(torch, original.dtype)
    expected = expected_shapes(config)
    written: set[str] = set()
    embedded: dict = {}
    writer = ShardWriter(out, shard_bytes)

    def put(name: str, tensor, origin: str) -> None:
        if name not in expected:
            raise ConversionError(f"{origin}: unknown weight {name!r} (no such llava-hf weight)")
        if name in written:
            raise ConversionError(f"{origin}: weight {name!r} appears twice")
        tensor = tensor.to(dtype)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) and tensor.shape[0] < expected[name][0]:
            # <image> (and any token past the checkpoint's vocabulary): its input row is never read (the image
            # features replace it) and a zero output row scores exactly 0, never the argmax of a trained model.
            tensor = torch.cat([tensor, tensor.new_zeros(expected[name][0] - tensor.shape[0], tensor.shape[1])])
        if tuple(tensor.shape) != expected[name]:
            raise ConversionError(f"{origin}: weight {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config implies {expected[name]}")
        writer.add(name, tensor)
        written.add(name)

    for path in weight_files(source):
        for name, tensor in read_weights(path):
            match = EMBEDDED_VISION.match(name)
            if match and not name.endswith("position_ids"):
                embedded["vision_tower." + match.group(1)] = tensor
            new = language_name(name, f"{path}")
            if new is not None:
                put(new, tensor, f"{path}")
    if original.vision_weights_in_checkpoint:
        if not embedded:
            raise ConversionError(f"{source}: unfreeze_mm_vision_tower is true but the checkpoint holds no tower")
        for name, tensor in embedded.items():
            put(name, tensor, f"{source} (embedded vision tower)")
    else:
        # builder.py loads the tower from mm_vision_tower; a copy saved in the checkpoint is ignored by the
        # original code, so it must agree with that tower or the conversion would pick the wrong one.
        for path in weight_files(vision_dir):
            for name, tensor in read_weights(path):
                new = vision_name(name, f"{path}")
                if new is None:
                    continue
                put(new, tensor, f"{path}")
                if new in embedded and not torch.allclose(embedded[new].to(dtype), tensor.to(dtype), rtol=2**-10,
                                                          atol=0):  # within one fp16 rounding step
                    raise ConversionError(f"{source}: the checkpoint's copy of {new!r} differs from the vision "
                                          f"tower in {vision_dir}; pass the tower it was trained with")
    missing = sorted(set(expected) - written)
    if missing:
        raise ConversionError(f"{source}: missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    writer.close()


def convert(cfg: ConvertConfig) -> Path:
    """Write the llava-hf folder `cfg.out` from the original checkpoint `cfg.src`; returns its path."""
    from transformers import CLIPVisionConfig, GenerationConfig, LlavaProcessor

    out = Path(cfg.out)
    template = chat_template(cfg.template)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out}: exists and is not empty")
    source = resolve_folder(cfg.src, "checkpoint")
    original = parse_config(source / "config.json")
    vision_dir = resolve_folder(cfg.vision_tower or original.vision_tower, "vision tower")
    vision_config = CLIPVisionConfig.from_pretrained(vision_dir)
    tokenizer = load_tokenizer(source, cfg.tokenizer)
    config = build_config(original, vision_config, tokenizer, source)
    image_processor = build_image_processor(vision_dir, vision_config.image_size, original.pad_to_square)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=original.select_strategy,
                               num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
                               chat_template=template.jinja())
    generation = GenerationConfig(bos_token_id=config.text_config.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=eos_ids(source, original, tokenizer))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        convert_weights(source, vision_dir, original, config, staging, cfg.shard_bytes)
        config.save_pretrained(staging)
        generation.save_pretrained(staging)
        processor.save_pretrained(staging)
        _readable_like_new_files(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _readable_like_new_files(folder: Path) -> None:
    """Give the staging folder (created 0700) and its files the permissions the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


@one_line_errors("convert")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="original LLaVA checkpoint folder or Hub id (config.json + weights)")
    p.add_argument("--out", required=True, help="llava-hf folder to create (must not exist or be empty)")
    p.add_argument("--vision-tower", default=ConvertConfig.vision_tower,
                   help="CLIP folder or Hub id (default: the checkpoint's mm_vision_tower)")
    p.add_argument("--tokenizer", default=ConvertConfig.tokenizer,
                   help="tokenizer folder or Hub id (default: SRC); a LLaMA-3 tokenizer for the Recap captioner")
    p.add_argument("--shard-bytes", type=int, default=ConvertConfig.shard_bytes,
                   help="largest output safetensors file, in bytes")
    p.add_argument("--template", default=ConvertConfig.template,
                   help="chat template written into the folder: conv_llama3 (default: the captioner's lab's LLaVA-"
                        "LLaMA-3 format, system turn, two BOS), llava_llama_3 (LLaVA-NeXT's), none (LLaMA-3 turns "
                        "only, one BOS) or 'system:TEXT' (conv_llama3 with TEXT as the system turn)")
    a = p.parse_args(argv)
    print(convert(ConvertConfig(a.src, a.out, a.vision_tower, a.tokenizer, a.shard_bytes, a.template)))


if __name__ == "__main__":
    main()
