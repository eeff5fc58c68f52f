"""Prompts for the captioner, built with the model's own chat template; web captions cannot change their shape."""
from __future__ import annotations

import re
from pathlib import Path

# Recap-DataComp-1B's instruction (Li et al., "What If We Recaption Billions of Web Images with LLaMA-3?",
# arXiv:2406.08478).
DEFAULT_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
ORG_CAPTION_FIELD = "{org_caption}"
MAX_ORG_CAPTION_CHARS = 1000
_SLOT = "\x00ORG_CAPTION\x00"
_TURNS = ("\x00TURN1\x00", "\x00TURN2\x00", "\x00TURN3\x00")


def load_prompt(text_or_file: str | None) -> str:
    """`--prompt` value: an existing file's text, else the text itself; None gives the default."""
    if not text_or_file:
        return DEFAULT_PROMPT
    path = Path(text_or_file)
    if len(text_or_file) < 4096 and path.is_file():
        return path.read_text().strip()
    return text_or_file


def role_markers(processor) -> set[str]:
    """The pieces of text the chat template puts between turns ('ASSISTANT:', '</s>USER:',
    '<|eot_id|><|start_header_id|>user<|end_header_id|>', ...).

    Renders user, assistant, user and the generation prompt with sentinel texts and keeps the
    whitespace-separated pieces after the first turn's text that are not a plain word (a bare role name
    like `user` is ordinary caption text).
    """
    conversation = [{"role": role, "content": [{"type": "text", "text": text}]}
                    for role, text in zip(("user", "assistant", "user"), _TURNS)]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    between = rendered.split(_TURNS[0], 1)[-1]
    for sentinel in _TURNS[1:]:
        between = between.replace(sentinel, " ")
    return {piece for piece in between.split() if len(piece) > 1 and not piece.isalnum()}


def tokenizer_markers(processor) -> set[str]:
    """Every special and added token of the processor's tokenizer, the image placeholder included."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    tokens.add(getattr(processor, "image_token", "<image>"))
    return {token for token in tokens if token.strip()}


class PromptBuilder:
    """Renders the chat template once and fills the web caption in per row."""

    def __init__(self, processor, instruction: str):
        self.instruction = instruction
        self.image_token: str = getattr(processor, "image_token", "<image>")
        conversation = [{"role": "user", "content": [
            {"type": "image"},
            {"type": "text", "text": instruction.replace(ORG_CAPTION_FIELD, _SLOT)},
        ]}]
        self.template: str = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if self.template.count(self.image_token) != 1:
            raise ValueError(f"chat template yields {self.template.count(self.image_token)} image placeholders, want 1")
        markers = tokenizer_markers(processor) | (role_markers(processor) if self.uses_org_caption else set())
        # Longest first, so a marker that contains another is removed whole.
        self._markers = re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))

    @property
    def uses_org_caption(self) -> bool:
        return _SLOT in self.template

    def build(self, org_caption: str | None = "") -> str:
        return self.template.replace(_SLOT, self.clean_org_caption(org_caption))

    def clean_org_caption(self, text: str | None) -> str:
        """One line, bounded, with no special or added token and no turn marker of the chat template.

        Each marker becomes a space, so its neighbours cannot join into a new one (`<|eot<|eot_id|>_id|>`
        leaves `<|eot _id|>`), and removal repeats until nothing changes, as collapsing whitespace could
        still form a marker that contains a space. Matching is on the text as given: tokenizers that
        normalise text before matching their added tokens (lower-casing, NFKC) are not covered.
        """
        text = " ".join((text or "").split())
        while (cleaned := " ".join(self._markers.sub(" ", text).split())) != text:
            text = cleaned
        return text[:MAX_ORG_CAPTION_CHARS]
