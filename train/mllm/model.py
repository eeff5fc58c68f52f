"""The MLLM: vision tower -> projector -> causal LM, with the image spliced in at `<image>`.

Follows LLaVA-1.5 (haotian-liu/LLaVA `llava_arch.py` prepare_inputs_labels_for_multimodal): the
placeholder id is replaced by the projected patch tokens, labels there are ignored, rows are
padded to the longest. A run folder holds `mllm.json` (MLLMConfig), `projector.pt`, and after
stage 2 the trained LM in `lm/` (plus `tower.pt` when the tower was trained).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.mllm.conversation import IGNORE, IMAGE_ID, TEMPLATES, Template
from train.mllm.projector import build_projector
from train.mllm.towers import Tower, load_tower

CONFIG_FILE, PROJECTOR_FILE, TOWER_FILE, LM_DIR = "mllm.json", "projector.pt", "tower.pt", "lm"


@dataclass(frozen=True)
class MLLMConfig:
    lm: str  # Hugging Face causal LM folder (and tokenizer)
    tower: str  # our checkpoint, or "open_clip:NAME"
    tower_weights: str | None = None  # open_clip `pretrained` for "open_clip:NAME"
    image_size: int | None = None  # None: the tower's own resolution
    layer: int = -2  # hidden state fed to the projector (LLaVA-1.5: second-to-last)
    projector: str = "mlp2x_gelu"
    template: str = "vicuna_v1"


@dataclass
class Spliced:
    embeds: Tensor  # (B, T, D)
    mask: Tensor  # (B, T) bool, True on real positions
    positions: Tensor  # (B, T) position ids, counting real positions only
    labels: Tensor | None  # (B, T), IGNORE on text that is not an answer, on images and padding


class LlavaModel(nn.Module):
    def __init__(self, config: MLLMConfig, tower: Tower, projector: nn.Module, lm: nn.Module, tokenizer):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        self.tower, self.projector, self.lm = tower, projector, lm
        self.zero_images = False  # control: the LM sees projections of all-zero features

    @property
    def template(self) -> Template:
        return TEMPLATES[self.config.template]

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, tokens, LM width); no tower graph while the tower is frozen."""
        frozen = not any(p.requires_grad for p in self.tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.tower(images)
        if self.zero_images:
            features = torch.zeros_like(features)
        return self.projector(features)

    def splice(self, ids: Tensor, mask: Tensor, images: Tensor | None, labels: Tensor | None = None,
               left_pad: bool = False) -> Spliced:
        """Right-padded `ids` (B, T) with IMAGE_ID at most once per row -> LM input embeddings.

        `images` holds one image per row that has the placeholder, in row order.
        """
        text = self.lm.get_input_embeddings()(ids.clamp(min=0))
        pictures = self.image_embeddings(images).to(text.dtype) if images is not None and len(images) else None
        if pictures is None and self.training:
            # A batch without images (text-only LLaVA samples) still runs the trainable vision parts on a
            # blank image, at zero weight: DDP and FSDP expect every trainable parameter in every backward.
            size = self.tower.prep.size
            blank = self.image_embeddings(text.new_zeros(1, 3, size, size, dtype=next(self.tower.parameters()).dtype))
            text = text + 0 * blank.sum().to(text.dtype)
        rows, row_labels, used = [], [], 0
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            embeds = text[i, :n]
            target = labels[i, :n] if labels is not None else None
            where = (ids[i, :n] == IMAGE_ID).nonzero()
            if len(where):
                if pictures is None or used >= len(pictures):
                    raise ValueError(f"row {i} has an <image> placeholder but no image was given for it")
                p, picture = int(where[0, 0]), pictures[used]
                used += 1
                embeds = torch.cat([embeds[:p], picture, embeds[p + 1:]])
                if target is not None:
                    target = torch.cat([target[:p], target.new_full((len(picture),), IGNORE), target[p + 1:]])
            rows.append(embeds)
            row_labels.append(target)
        if pictures is not None and used != len(pictures):
            raise ValueError(f"{len(pictures)} images for {used} <image> placeholders")
        return pad_rows(rows, row_labels if labels is not None else None, left_pad)

    def forward(self, ids: Tensor, mask: Tensor, images: Tensor | None, labels: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) over the spliced sequence and its labels."""
        s = self.splice(ids, mask, images, labels)
        out = self.lm(inputs_embeds=s.embeds, attention_mask=s.mask.long(), position_ids=s.positions, use_cache=False)
        return out.logits, s.labels

    @torch.no_grad()
    def generate(self, ids: Tensor, mask: Tensor, images: Tensor | None, max_new_tokens: int,
                 stop_ids: set[int]) -> list[list[int]]:
        """Greedy decoding with a KV cache; each row's tokens up to (not including) its stop token."""
        s = self.splice(ids, mask, images, left_pad=True)
        attention = s.mask.long()
        out = self.lm(inputs_embeds=s.embeds, attention_mask=attention, position_ids=s.positions,
                      use_cache=True, logits_to_keep=1)
        positions = s.positions[:, -1:]
        stops = torch.tensor(sorted(stop_ids), device=ids.device)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        steps: list[Tensor] = []
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(dim=-1)
            steps.append(torch.where(finished, stops[0], token))
            finished |= torch.isin(token, stops)
            if finished.all():
                break
            attention = torch.cat([attention, attention.new_ones(len(token), 1)], dim=1)
            positions = positions + 1
            out = self.lm(input_ids=token[:, None], attention_mask=attention, position_ids=positions,
                          past_key_values=out.past_key_values, use_cache=True)
        tokens = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(ids.shape[0])]
        return [until_stop(row, stop_ids) for row in tokens]

    @torch.no_grad()
    def loglikelihood(self, ids: Tensor, mask: Tensor, images: Tensor | None, labels: Tensor
                      ) -> list[tuple[float, bool]]:
        """Per row: summed log-probability of the labelled tokens, and whether greedy decoding picks them all."""
        logits, targets = self(ids, mask, images, labels)
        logprobs, greedy, valid = token_logprobs(logits, targets)
        summed = (logprobs * valid).sum(dim=1)
        all_greedy = (greedy | ~valid).all(dim=1)
        return list(zip(summed.tolist(), all_greedy.tolist(), strict=True))


def until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stop_ids), tokens)


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each position t predicting labels[:, t+1]: log p (fp32), argmax == label, label supervised."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    valid = targets != IGNORE
    safe = targets.clamp(min=0)
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, safe[..., None])[..., 0]
    return logprobs, logits.argmax(dim=-1) == safe, valid


def summed_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over supervised positions, and their count."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, (targets != IGNORE).sum()


def pad_rows(rows: list[Tensor], labels: list[Tensor] | None, left_pad: bool) -> Spliced:
    """Stack variable-length rows, padding on the left (generation) or right (training)."""
    b, longest, width = len(rows), max(len(r) for r in rows), rows[0].shape[-1]
    embeds = rows[0].new_zeros(b, longest, width)
    mask = torch.zeros(b, longest, dtype=torch.bool, device=embeds.device)
    positions = torch.zeros(b, longest, dtype=torch.long, device=embeds.device)
    out_labels = torch.full((b, longest), IGNORE, dtype=torch.long, device=embeds.device) if labels else None
    for i, row in enumerate(rows):
        n = len(row)
        span = slice(longest - n, longest) if left_pad else slice(0, n)
        embeds[i, span] = row
        mask[i, span] = True
        positions[i, span] = torch.arange(n, device=embeds.device)
        if out_labels is not None:
            out_labels[i, span] = labels[i]
    return Spliced(embeds, mask, positions, out_labels)


def save_config(config: MLLMConfig, run: str | Path) -> None:
    Path(run).mkdir(parents=True, exist_ok=True)
    (Path(run) / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")


def load_config(run: str | Path) -> MLLMConfig:
    path = Path(run) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run}: not an MLLM run folder (no {CONFIG_FILE})")
    return MLLMConfig(**json.loads(path.read_text()))


def build(config: MLLMConfig, dtype: torch.dtype = torch.float32) -> LlavaModel:
    """Tower, a freshly initialised projector and the LM named by `config`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.template not in TEMPLATES:
        raise ValueError(f"template {config.template!r}: expected one of {sorted(TEMPLATES)}")
    tokenizer = AutoTokenizer.from_pretrained(config.lm)
    lm = AutoModelForCausalLM.from_pretrained(config.lm, dtype=dtype)
    tower = load_tower(config.tower, image_size=config.image_size, layer=config.layer, weights=config.tower_weights)
    _, width = tower.shape()
    projector = build_projector(config.projector, width, lm.get_input_embeddings().embedding_dim)
    return LlavaModel(config, tower, projector, lm, tokenizer)


def load_run(run: str | Path, dtype: torch.dtype = torch.float32) -> LlavaModel:
    """A stage's output folder: its config, projector, and trained LM and tower when it has them."""
    run = Path(run)
    config = load_config(run)
    if (run / LM_DIR).is_dir():
        config = MLLMConfig(**{**asdict(config), "lm": str(run / LM_DIR)})
    model = build(config, dtype)
    model.projector.load_state_dict(torch.load(run / PROJECTOR_FILE, map_location="cpu"))
    if (run / TOWER_FILE).exists():
        model.tower.load_state_dict(torch.load(run / TOWER_FILE, map_location="cpu"))
    return model.to(dtype)
