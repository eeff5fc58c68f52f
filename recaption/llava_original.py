"""What an original-LLaVA checkpoint (haotian-liu/LLaVA, `LlavaLlamaForCausalLM`) means, key by key.

The original code is llava-torch 1.2.2.post1: `llava/model/llava_arch.py` (vision tower + projector),
`llava/model/multimodal_encoder/clip_encoder.py` (feature selection), `llava/model/multimodal_projector/
builder.py` (`mlp2x_gelu` = Linear, GELU, Linear), `llava/model/builder.py` (how inference loads it) and
`llava/mm_utils.py` (`process_images`: `expand2square` with the image mean, then the CLIP processor).
Every config key and weight name is either understood here or rejected with an error naming it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# LlamaConfig fields that pass through unchanged into the llava-hf text config.
TEXT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "rope_theta",
    "attention_bias", "attention_dropout", "mlp_bias", "head_dim",
})
# Keys that only steer training or bookkeeping; inference (llava/model/builder.py) never reads them.
# `tokenizer_model_max_length` truncates inputs longer than the context, which a caption prompt never is.
IGNORED_KEYS = frozenset({
    "_name_or_path", "transformers_version", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "use_mm_proj",
    "mm_projector_lr", "mm_vision_tower_lr", "tokenizer_padding_side", "tokenizer_model_max_length",
})
# Keys whose value decides the architecture; `parse_config` checks each.
OPTION_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "pretraining_tp", "rope_scaling", "mm_projector_type",
    "mm_hidden_size", "mm_vision_tower", "mm_vision_select_layer", "mm_vision_select_feature",
    "image_aspect_ratio", "mm_patch_merge_type", "mm_use_im_start_end", "mm_use_im_patch_token",
    "unfreeze_mm_vision_tower",
})
# `mm_vision_select_feature` -> llava-hf `vision_feature_select_strategy` (clip_encoder.py `feature_select`).
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# `image_aspect_ratio` -> pad to a square with the image mean first (mm_utils.py `process_images`); any
# other value there falls through to the plain CLIP processor (resize the short side, centre crop).
ASPECT_RATIO_PAD = {"pad": True, "square": False, None: False}
DTYPES = ("float16", "bfloat16", "float32")


class ConversionError(ValueError):
    """The source cannot be converted faithfully; the message names the file, the key and the reason."""


@dataclass(frozen=True)
class OriginalLlava:
    """The parts of an original LLaVA config.json that decide the converted model."""

    text: dict                    # LlamaConfig keyword arguments
    vision_tower: str             # mm_vision_tower: a Hub id or a local folder
    vision_hidden_size: int       # mm_hidden_size
    feature_layer: int            # mm_vision_select_layer
    select_strategy: str          # llava-hf name of mm_vision_select_feature
    pad_to_square: bool           # image_aspect_ratio == "pad"
    vision_weights_in_checkpoint: bool  # unfreeze_mm_vision_tower: the checkpoint's tower copy is the one used
    dtype: str


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _require(path: Path, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConversionError(f"{path}: {key}={value!r} is not supported (supported: {sorted(map(repr, allowed))})")


def parse_config(path: Path) -> OriginalLlava:
    """Read and check an original LLaVA-LLaMA config.json."""
    config = read_json(path)
    unknown = sorted(set(config) - TEXT_KEYS - IGNORED_KEYS - OPTION_KEYS)
    if unknown:
        raise ConversionError(f"{path}: unknown config keys {unknown}; refusing to guess what they change")
    _require(path, "model_type", config.get("model_type"), {"llava_llama"})
    _require(path, "architectures", tuple(config.get("architectures") or ()), {("LlavaLlamaForCausalLM",)})
    _require(path, "mm_projector_type", config.get("mm_projector_type"), {"mlp2x_gelu"})
    _require(path, "mm_vision_select_feature", config.get("mm_vision_select_feature", "patch"), set(SELECT_FEATURE))
    _require(path, "image_aspect_ratio", config.get("image_aspect_ratio"), set(ASPECT_RATIO_PAD))
    _require(path, "mm_patch_merge_type", config.get("mm_patch_merge_type", "flat"), {"flat"})
    _require(path, "mm_use_im_start_end", config.get("mm_use_im_start_end", False), {False})
    # builder.py adds an <im_patch> token (and resizes the embeddings) unless this is explicitly false.
    _require(path, "mm_use_im_patch_token", config.get("mm_use_im_patch_token"), {False})
    _require(path, "pretraining_tp", config.get("pretraining_tp", 1), {1})
    _require(path, "rope_scaling", config.get("rope_scaling"), {None})
    _require(path, "torch_dtype", config.get("torch_dtype", "float16"), set(DTYPES))
    _require(path, "unfreeze_mm_vision_tower", config.get("unfreeze_mm_vision_tower", False), {False, True})
    for key in ("mm_vision_tower", "mm_hidden_size", "mm_vision_select_layer"):
        if key not in config:
            raise ConversionError(f"{path}: {key} is missing; not a LLaVA vision-language checkpoint")
    if not isinstance(config["mm_vision_select_layer"], int):
        raise ConversionError(f"{path}: mm_vision_select_layer={config['mm_vision_select_layer']!r} is not an int")
    return OriginalLlava(
        text={k: v for k, v in config.items() if k in TEXT_KEYS},
        vision_tower=str(config["mm_vision_tower"]),
        vision_hidden_size=int(config["mm_hidden_size"]),
        feature_layer=config["mm_vision_select_layer"],
        select_strategy=SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")],
        pad_to_square=ASPECT_RATIO_PAD[config.get("image_aspect_ratio")],
        vision_weights_in_checkpoint=bool(config.get("unfreeze_mm_vision_tower", False)),
        dtype=config.get("torch_dtype", "float16"),
    )


# Original weight names -> llava-hf names, the layout of the Hub's llava-hf models (and of recaption/tiny.py),
# which vLLM's `LlavaForConditionalGeneration.hf_to_vllm_mapper` and transformers both load.
_LANGUAGE = [
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"language_model.model.\1."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.mm_projector\.0\."), "multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "multi_modal_projector.linear_2."),
]
# The checkpoint's own copy of the CLIP tower (training saves it; builder.py ignores it unless unfrozen).
EMBEDDED_VISION = re.compile(r"^model\.vision_tower\.vision_tower\.(vision_model\..*)$")
# Buffers, not parameters: rotary frequencies (older LLaMA code) and CLIP's position ids.
_BUFFERS = re.compile(r"(\.rotary_emb\.inv_freq|\.embeddings\.position_ids)$")
# A CLIP folder (openai/clip-vit-large-patch14-336) also holds the text tower, which LLaVA never uses.
_CLIP_UNUSED = re.compile(r"^(text_model\..*|text_projection\.weight|visual_projection\.weight|logit_scale)$")


def language_name(name: str, source: str) -> str | None:
    """llava-hf name of a checkpoint weight, None for buffers and the embedded vision tower (handled apart)."""
    if _BUFFERS.search(name) or EMBEDDED_VISION.match(name):
        return None
    for pattern, replacement in _LANGUAGE:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    raise ConversionError(f"{source}: unknown weight {name!r}")


def vision_name(name: str, source: str) -> str | None:
    """llava-hf name of a CLIP weight (`vision_model.*`), None for buffers and CLIP's text side."""
    if _BUFFERS.search(name) or _CLIP_UNUSED.match(name):
        return None
    if name.startswith("vision_model."):
        return "vision_tower." + name
    raise ConversionError(f"{source}: unknown weight {name!r}")


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight a llava-hf `LlavaForConditionalGeneration` of this config loads."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    renames = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector.")]
    shapes = {}
    for name, tensor in model.state_dict().items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        else:
            raise AssertionError(f"unexpected llava-hf weight {name}")
        shapes[name] = tuple(tensor.shape)
    return shapes
