"""Conversations -> token ids and labels, built turn by turn.

LLaVA-1.5 (haotian-liu/LLaVA, `llava/train/train.py` preprocess_v1) tokenizes the whole prompt
and then re-tokenizes every round to find where the instructions end; when the two disagree it
masks the whole sample and prints a warning. Here every piece (instruction, answer, stop token)
is tokenized on its own and the pieces are concatenated, so the loss mask covers exactly the
answer tokens and the stop token after each by construction. Generation prompts come from the
same function, so evaluation continues the token sequence training saw.

The image placeholder `<image>` becomes IMAGE_ID (LLaVA's IMAGE_TOKEN_INDEX), which the model
replaces with the projected patch tokens: the LM's vocabulary is left untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE = "<image>"
IMAGE_ID = -200
IGNORE = -100  # label of every position the loss skips

# LLaVA-1.5's conv_vicuna_v1 system prompt.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    system: str  # before the first user message
    user: str  # before every user message
    assistant: str  # between a user message and its answer
    stop: str | None = None  # token closing every answer (supervised); None: the tokenizer's EOS
    keep_user_text: bool = True  # False: the user turn is the image alone (LLaVA's "plain" pretraining)


TEMPLATES: dict[str, Template] = {
    # Stage 1 (LLaVA conv_llava_plain): "<image>caption</s>", the instruction dropped.
    "plain": Template("", "", "", keep_user_text=False),
    # Stage 2 and evaluation of LLaVA-1.5: "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ...".
    "vicuna_v1": Template(SYSTEM + " ", "USER: ", " ASSISTANT: "),
    # LLaMA-3 instruct format (LLaVA-NeXT's llava_llama_3), answers closed by <|eot_id|>.
    "llama3": Template("<|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>",
                       "<|start_header_id|>user<|end_header_id|>\n\n",
                       "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", stop="<|eot_id|>"),
}


class ConversationError(ValueError):
    """A sample that cannot be turned into ids and labels (the message says why)."""


class TooLong(ConversationError):
    """A sample whose image or every answer lies beyond the length limit."""


@dataclass
class Encoded:
    ids: list[int]  # IMAGE_ID where the image goes
    labels: list[int]  # the target token at supervised positions, IGNORE elsewhere

    @property
    def has_image(self) -> bool:
        return IMAGE_ID in self.ids

    def expanded_length(self, image_tokens: int) -> int:
        """Length after the image placeholder becomes `image_tokens` embeddings."""
        return len(self.ids) + (image_tokens - 1 if self.has_image else 0)


def stop_id(tokenizer, template: Template) -> int:
    token = template.stop or tokenizer.eos_token
    if token is None:
        raise ConversationError("the tokenizer has no EOS token to close answers with")
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ConversationError(f"stop token {token!r} is not in the tokenizer's vocabulary")
    return ids[0]


def tokenize_piece(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens, `<image>` as IMAGE_ID."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE)):
        if i:
            ids.append(IMAGE_ID)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def normalise_turns(turns: list[dict], has_image: bool) -> list[tuple[str, str]]:
    """[(role, text)] alternating human/gpt with `<image>\\n` leading the first image message.

    A leading gpt turn is skipped as LLaVA does; anything else out of place is an error.
    """
    pairs = [(t.get("from"), t.get("value")) for t in turns]
    if pairs and pairs[0][0] == "gpt":
        pairs = pairs[1:]
    if not pairs:
        raise ConversationError("empty conversation")
    for i, (role, text) in enumerate(pairs):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ConversationError(f"turn {i}: expected from={expected!r}, got {role!r}")
        if not isinstance(text, str):
            raise ConversationError(f"turn {i}: value is not a string")
    placeholders = sum(text.count(IMAGE) for _, text in pairs)
    if placeholders > 1 or (placeholders == 1 and IMAGE not in pairs[0][1]):
        raise ConversationError(f"{placeholders} <image> placeholder(s); one is allowed, in the first human turn")
    if has_image != (placeholders == 1):
        state = "has an image but no <image> placeholder" if has_image else "has <image> but no image"
        raise ConversationError(f"sample {state}")
    if has_image:
        first = pairs[0][1].replace(IMAGE, "").strip()
        pairs[0] = ("human", IMAGE + "\n" + first if first else IMAGE)
    return pairs


def encode(turns: list[dict], tokenizer, template: Template, *, has_image: bool) -> Encoded:
    """LLaVA-format turns -> ids and labels. Ending on a human turn gives a generation prompt."""
    pairs = normalise_turns(turns, has_image)
    stop = stop_id(tokenizer, template)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE] * len(ids)
    for i, (role, text) in enumerate(pairs):
        if role == "human":
            if not template.keep_user_text:
                text = IMAGE if IMAGE in text else ""
            piece = (template.system if i == 0 else "") + template.user + text + template.assistant
            tokens = tokenize_piece(tokenizer, piece)
            ids += tokens
            labels += [IGNORE] * len(tokens)
        else:
            tokens = tokenize_piece(tokenizer, text) + [stop]
            ids += tokens
            labels += tokens
    return Encoded(ids, labels)


def fit(sample: Encoded, max_length: int, image_tokens: int) -> Encoded:
    """Cut the sample so that it is at most `max_length` long once the image is spliced in.

    LLaVA truncates after splicing; here it is an error when the cut reaches the image or leaves
    no supervised token, never a sample that silently trains on nothing.
    """
    extra = image_tokens - 1 if sample.has_image else 0
    keep = max_length - extra
    if len(sample.ids) <= keep:
        return sample
    if sample.has_image and sample.ids.index(IMAGE_ID) >= keep:
        raise TooLong(f"the image does not fit in max_length {max_length}")
    cut = Encoded(sample.ids[:keep], sample.labels[:keep])
    if all(label == IGNORE for label in cut.labels):
        raise TooLong(f"no answer token left within max_length {max_length}")
    return cut
