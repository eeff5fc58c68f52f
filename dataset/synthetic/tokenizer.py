"""The tokenizer of the tiny random-weight models: byte-level BPE trained on a few sentences, in seconds."""
from __future__ import annotations


def byte_level_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str], **special):
    """A `PreTrainedTokenizerFast` with <s>, </s> and <pad> (which `special_tokens` must hold) and any
    further special-token arguments in `special`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   **special)
