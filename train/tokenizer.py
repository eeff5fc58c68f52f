"""BERT-style uncased WordPiece with the CLIPS token layout (UCSC-VLAA/OpenVision `bert_ops.py`).

Ids: pad 0, bos 1, eos 2, cls 101 (bert-base-uncased's [PAD], [unused0], [unused1], [CLS]).
Text-encoder input: `[BOS] tokens [EOS]` truncated/padded to length-1 (the last token forced
to EOS when truncated), then `[CLS]` appended. Decoder targets: the same without `[CLS]`.
Text is cleaned like open_clip's HF tokenizer path (ftfy, HTML unescape, whitespace), so an
exported tokenizer gives open_clip users the same ids.

Only the `tokenizers` library is used here (transformers is slow to import and not needed);
a saved folder is a plain Hugging Face tokenizer (`tokenizer.json` + `tokenizer_config.json`)
that `transformers.AutoTokenizer` and open_clip load.
"""
from __future__ import annotations

import html
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import ftfy
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD_ID, BOS_ID, EOS_ID, CLS_ID = 0, 1, 2, 101
# Special tokens in id order, so a trained vocabulary shares bert-base-uncased's special ids.
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", *(f"[unused{i}]" for i in range(3, 100)),
                  "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Role -> id to fall back on when a folder does not name the token (BERT names no bos/eos).
ROLES = {"pad_token": PAD_ID, "bos_token": BOS_ID, "eos_token": EOS_ID, "cls_token": CLS_ID}


def clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


def named_special_tokens(folder: Path) -> dict[str, str]:
    """`*_token` entries of a HF folder's tokenizer_config.json / special_tokens_map.json."""
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / file).exists():
            for key, value in json.loads((folder / file).read_text()).items():
                if key.endswith("_token") and value:
                    names[key] = value["content"] if isinstance(value, dict) else value
    return names


class CaptionTokenizer:
    def __init__(self, backend: Tokenizer, special: dict[str, str]):
        self.backend = backend
        self.backend.no_truncation()
        self.backend.no_padding()
        self.special = dict(special)
        for role, default_id in ROLES.items():
            self.special.setdefault(role, backend.id_to_token(default_id))
        self.pad_id, self.bos_id, self.eos_id, self.cls_id = (
            backend.token_to_id(self.special[role]) for role in ROLES)

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        """Any Hugging Face tokenizer folder (e.g. a bert-base-uncased download)."""
        path = Path(path)
        if (path / "tokenizer.json").exists():
            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:  # vocab.txt-only folders: let transformers build the fast tokenizer
            from transformers import AutoTokenizer
            backend = AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
        return cls(backend, named_special_tokens(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 32000) -> CaptionTokenizer:
        """Learn an uncased WordPiece vocabulary (at most `vocab_size`) from captions."""
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
        tok.train_from_iterator((clean(t) for t in texts), trainer)
        return cls(tok, {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]",
                         "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def to_files(self) -> dict[str, bytes]:
        """The saved folder as {name: bytes}, to embed in a checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> CaptionTokenizer:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            return cls.load(tmp)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], length: int, *, append_cls: bool = True) -> torch.Tensor:
        """(len(texts), length) ids: [BOS] tokens [EOS] [PAD]... (+ [CLS] in the last slot)."""
        body = length - 1 if append_cls else length
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        encodings = self.backend.encode_batch([clean(t) for t in texts], add_special_tokens=False)
        for row, enc in zip(out, encodings, strict=True):
            ids = [self.bos_id, *enc.ids[: body - 2], self.eos_id]
            row[: len(ids)] = torch.tensor(ids)
            if append_cls:
                row[-1] = self.cls_id
        return out
