"""Conversations -> token ids and labels, as LLaVA's `preprocess_*` (haotian-liu/LLaVA,
`llava/train/train.py`: preprocess_plain, preprocess_v1; `llava/mm_utils.py` tokenizer_image_token).

The conversation is rendered to one string by its template (`llava/conversation.py`:
conv_llava_plain "<image>caption\n"; conv_vicuna_v1 "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER:
..."), and the string is tokenised whole, cut only at `<image>` (which becomes IMAGE_ID, LLaVA's
IMAGE_TOKEN_INDEX; the model splices the projected patches there, the LM's vocabulary is left
untouched). Each chunk is tokenised as the tokenizer does by default, so a BOS appears only where
the tokenizer adds one, once, in front. Prompt and answer are tokenised together: the space after
`ASSISTANT:` is part of the answer's first token, as in LLaVA.

Labels follow LLaVA's rule: every answer and the stop text after it (`</s>` in vicuna_v1, `\n` in
plain, `<|eot_id|>` in llama3) are supervised, everything else is IGNORE. Where LLaVA finds the
boundaries by re-tokenising each round (and masks the whole sample when the counts disagree), they
are found here by tokenising the rendered prefix up to each boundary (the instruction's trailing
spaces excluded, as LLaVA's `instruction_len - 2`); a prefix whose tokens are not the first tokens
of the whole is a ConversationError, never a silently shifted mask. Generation prompts are the
rendered prefix up to the first answer ("... ASSISTANT:"), so evaluation continues the tokens
training saw.
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
    stop: str | None = None  # text closing every answer (supervised); None: the tokenizer's EOS token
    keep_user_text: bool = True  # False: the user turn is the image alone (LLaVA's "plain" pretraining)


TEMPLATES: dict[str, Template] = {
    # Stage 1 (LLaVA conv_llava_plain, sep "\n"): "<image>caption\n", the instruction dropped, no EOS.
    "plain": Template("", "", "", stop="\n", keep_user_text=False),
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


def stop_text(tokenizer, template: Template) -> str:
    text = template.stop or tokenizer.eos_token
    if text is None:
        raise ConversationError("the tokenizer has no EOS token to close answers with")
    return text


def stop_id(tokenizer, template: Template) -> int:
    """The token generation stops at: the last token of the stop text (`\n` may tokenise as two)."""
    text = stop_text(tokenizer, template)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or ids[-1] == tokenizer.unk_token_id:
        raise ConversationError(f"stop text {text!r} is not in the tokenizer's vocabulary")
    return ids[-1]


def tokenize(tokenizer, text: str) -> list[int]:
    """LLaVA's tokenizer_image_token: each chunk between `<image>`s tokenised as the tokenizer does by
    default, IMAGE_ID between chunks, the tokenizer's BOS (if it adds one) kept once, in front."""
    chunks = [list(tokenizer(chunk)["input_ids"]) for chunk in text.split(IMAGE)]
    bos = tokenizer.bos_token_id
    lead = 1 if bos is not None and chunks[0][:1] == [bos] else 0
    ids = chunks[0][:lead]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_ID)
        ids.extend(chunk[lead:])
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


def render(turns: list[dict], tokenizer, template: Template, *, has_image: bool,
           close_last: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as one string and the character spans the loss covers (answer + stop text).

    The space that ends an instruction belongs to the answer's span (LLaVA: "ASSISTANT: red" gives
    ":" then " red"); a conversation ending on a human turn is a generation prompt, which ends
    without that space ("... ASSISTANT:", LLaVA's `get_prompt` with an empty message). `close_last`
    False leaves the last answer open (no stop text): a continuation to score.
    """
    pairs = normalise_turns(turns, has_image)
    stop = stop_text(tokenizer, template)
    text, spans = "", []
    for i, (role, value) in enumerate(pairs):
        if role == "human":
            if not template.keep_user_text:
                value = IMAGE if IMAGE in value else ""
            text += (template.system if i == 0 else "") + template.user + value + template.assistant
        else:
            start = len(text.rstrip(" "))
            text += value + (stop if close_last or i < len(pairs) - 1 else "")
            spans.append((start, len(text)))
    if pairs[-1][0] == "human":
        text = text.rstrip(" ")
    return text, spans


def encode(turns: list[dict], tokenizer, template: Template, *, has_image: bool,
           close_last: bool = True) -> Encoded:
    """LLaVA-format turns -> ids and labels. Ending on a human turn gives a generation prompt."""
    text, spans = render(turns, tokenizer, template, has_image=has_image, close_last=close_last)
    ids = tokenize(tokenizer, text)
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        first, last = prefix_length(tokenizer, text, start, ids), prefix_length(tokenizer, text, end, ids)
        labels[first:last] = ids[first:last]
    return Encoded(ids, labels)


def prefix_length(tokenizer, text: str, end: int, ids: list[int]) -> int:
    """Tokens of `text[:end]`, which must be the first tokens of `ids` (the whole text's)."""
    if end == len(text):
        return len(ids)
    prefix = tokenize(tokenizer, text[:end])
    if ids[:len(prefix)] != prefix:
        raise ConversationError(f"tokenization mismatch: {text[:end][-40:]!r} does not end on a token boundary")
    return len(prefix)


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
