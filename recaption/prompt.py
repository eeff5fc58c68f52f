"""Prompts for the captioner, built with the model's own chat template."""
from __future__ import annotations

from pathlib import Path

# Recap-DataComp-1B's instruction (RECIPE.md).
DEFAULT_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
ORG_CAPTION_FIELD = "{org_caption}"
MAX_ORG_CAPTION_CHARS = 1000
_SLOT = "\x00ORG_CAPTION\x00"


def load_prompt(text_or_file: str | None) -> str:
    """`--prompt` value: an existing file's text, else the text itself; None gives the default."""
    if not text_or_file:
        return DEFAULT_PROMPT
    path = Path(text_or_file)
    if len(text_or_file) < 4096 and path.is_file():
        return path.read_text().strip()
    return text_or_file


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

    @property
    def uses_org_caption(self) -> bool:
        return _SLOT in self.template

    def build(self, org_caption: str = "") -> str:
        return self.template.replace(_SLOT, self.clean_org_caption(org_caption))

    def clean_org_caption(self, text: str) -> str:
        """One line, bounded, and unable to smuggle an extra image placeholder into the prompt."""
        text = " ".join((text or "").replace(self.image_token, " ").split())
        return text[:MAX_ORG_CAPTION_CHARS]
