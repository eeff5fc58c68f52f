"""Prompts for the captioner, built with the model's chat template; web captions cannot change their shape.

The Recap-DataComp-1B captioner is LLaVA-1.5 on LLaMA-3-8B, fine-tuned on one conversation format, and
every greedy caption depends on that format to the token. Its authors only say they "changed the
conversation template to LLaMA3's" (UCSC-VLAA/Recap-DataComp-1B issue #2), so the candidates are named
here and rendered exactly as the original code tokenizes them:

- `conv_llama3`: the same lab's LLaVA-LLaMA-3 code of that time (UCSC-VLAA/MedTrinity-25M
  `llava/conversation.py`, identical in mbzuai-oryx/LLaVA-pp `LLaMA-3-V/conversation.py`), a
  `SeparatorStyle.MPT` conversation: the text starts with a literal `<|begin_of_text|>` and a system turn,
  turns end with `<|eot_id|>`. LLaVA's `tokenizer_image_token` (`llava/mm_utils.py`) keeps the BOS the
  tokenizer adds to the first chunk, so the ids start with two BOS tokens; the lab's batch captioning
  script (`llava/eval/model_vqa_batch.py`) defaults to this template. The default.
- `llava_llama_3`: LLaVA-NeXT's `conv_llava_llama_3` (LLaVA-VL/LLaVA-NeXT `llava/conversation.py`): Meta's
  LLaMA-3-Instruct chat template (BOS as text, each message trimmed) with NeXT's own system prompt, then
  the same `tokenizer_image_token`: two BOS tokens too.
- `system:TEXT`: `conv_llama3` with another system prompt.
- `none`: LLaMA-3 turns with no system turn and one BOS (this project's first guess).

The user turn is `<image>`, a newline and the instruction, as LLaVA's scripts write it.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

# Recap-DataComp-1B's instruction (Li et al., "What If We Recaption Billions of Web Images with LLaMA-3?",
# arXiv:2406.08478).
DEFAULT_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
ORG_CAPTION_FIELD = "{org_caption}"
MAX_ORG_CAPTION_CHARS = 1000
_SLOT = "\x00ORG_CAPTION\x00"
_TURNS = ("\x00TURN1\x00", "\x00TURN2\x00", "\x00TURN3\x00")

BOS = "<|begin_of_text|>"
LLAMA3_TURN_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# UCSC-VLAA/MedTrinity-25M llava/conversation.py `conv_llama3` (and mbzuai-oryx/LLaVA-pp).
LAB_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
# LLaVA-VL/LLaVA-NeXT llava/conversation.py `conv_llava_llama_3`.
NEXT_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
               "the user provides, and assist the user with a variety of tasks using natural language.")
CUSTOM_PREFIX = "system:"


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (Jinja decodes backslash escapes in literals)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


@dataclass(frozen=True)
class ChatTemplate:
    """One LLaMA-3 conversation format for the captioner (see the module docstring)."""

    name: str
    system: str | None = None   # the system turn's text; None: no system turn
    literal_bos: bool = False   # the text starts with <|begin_of_text|>: with the tokenizer's own BOS, two
    trim: bool = False          # each message stripped of outer whitespace (Meta's LLaMA-3-Instruct template)

    @property
    def spec(self) -> str:
        """What `--chat-template` takes to select this template; recorded in the fingerprint."""
        return CUSTOM_PREFIX + (self.system or "") if self.name == "system" else self.name

    def jinja(self) -> str:
        """The processor chat template (image item -> `<image>` + newline, then the text)."""
        head = "{{ '%s' }}" % BOS if self.literal_bos else ""
        if self.system is not None:
            system = self.system.strip() if self.trim else self.system
            head += ("{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + " + _jinja_string(system)
                     + " + '<|eot_id|>' }}")
        return (
            head + "{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
            "{% set content %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}"
            "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}"
            "{% endif %}{% endfor %}{% endif %}{% endset %}"
            + ("{{ content | trim }}" if self.trim else "{{ content }}") +
            "{{ '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        )


CHAT_TEMPLATES = {t.name: t for t in (
    ChatTemplate("conv_llama3", LAB_SYSTEM, literal_bos=True),
    ChatTemplate("llava_llama_3", NEXT_SYSTEM, literal_bos=True, trim=True),
    ChatTemplate("none"),
)}
DEFAULT_CHAT_TEMPLATE = "conv_llama3"


def chat_template(spec: str) -> ChatTemplate:
    """A `--chat-template` value: a name of CHAT_TEMPLATES or `system:TEXT`."""
    if spec.startswith(CUSTOM_PREFIX):
        if not spec[len(CUSTOM_PREFIX):].strip():
            raise ValueError(f"--chat-template {spec!r}: the system prompt after {CUSTOM_PREFIX!r} is empty")
        return ChatTemplate("system", spec[len(CUSTOM_PREFIX):], literal_bos=True)
    if spec not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {spec!r}; choose one of {sorted(CHAT_TEMPLATES)} or "
                         f"'{CUSTOM_PREFIX}TEXT' ({DEFAULT_CHAT_TEMPLATE}'s format with TEXT as the system turn)")
    return CHAT_TEMPLATES[spec]


def missing_llama3_tokens(tokenizer) -> list[str]:
    """The LLaMA-3 special tokens these templates write that `tokenizer` lacks."""
    vocab = tokenizer.get_vocab()
    return [t for t in (BOS, *LLAMA3_TURN_TOKENS) if t not in vocab]


def with_chat_template(processor, spec: str):
    """A shallow copy of `processor` that renders the named template; a tokenizer without LLaMA-3's special
    tokens is refused (it would read the markers as plain text)."""
    template = chat_template(spec)
    tokenizer = getattr(processor, "tokenizer", processor)
    missing = missing_llama3_tokens(tokenizer)
    if missing:
        raise ValueError(f"--chat-template {spec!r} needs a LLaMA-3 tokenizer; {tokenizer.name_or_path} "
                         f"lacks {missing}")
    chosen = copy.copy(processor)
    chosen.chat_template = template.jinja()
    return chosen


def _probe(processor, jinja: str | None = None) -> str:
    conversation = [{"role": role, "content": [{"type": "image"}, {"type": "text", "text": text}]}
                    for role, text in zip(("user", "assistant", "user"), _TURNS, strict=True)]
    return processor.apply_chat_template(conversation, chat_template=jinja, add_generation_prompt=True,
                                         tokenize=False)


def identify_chat_template(processor) -> str | None:
    """The spec of the named template the processor's own chat template renders like, else None."""
    if not getattr(processor, "chat_template", None) or missing_llama3_tokens(getattr(processor, "tokenizer",
                                                                                      processor)):
        return None
    own = _probe(processor)
    candidates = list(CHAT_TEMPLATES.values())
    system = re.match(re.escape(BOS + "<|start_header_id|>system<|end_header_id|>\n\n") + r"(.*?)"
                      + re.escape("<|eot_id|>"), own, re.S)
    if system:
        candidates.append(chat_template(CUSTOM_PREFIX + system.group(1)))
    return next((t.spec for t in candidates if _probe(processor, t.jinja()) == own), None)


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
                    for role, text in zip(("user", "assistant", "user"), _TURNS, strict=True)]
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
