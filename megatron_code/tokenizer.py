"""SentencePiece tokenizer as the trainer, the data tools and megatron-core's datasets see it.

The special-token layout is fixed by ``data_tools.train_tokenizer``: ``<unk>`` 0, ``<s>`` (BOS) 1,
``</s>`` (EOD, appended after every document) 2, ``<pad>`` 3. Ids are read back from the model
file rather than assumed, so a tokenizer trained elsewhere works as long as it defines EOS.
"""
from __future__ import annotations

import os
from functools import cached_property

import sentencepiece as spm


class SentencePieceTokenizer:
    """Wraps a ``.model`` file; exposes what ``megatron.core.datasets`` reads (eod, pad, vocab_size,
    unique_identifiers) plus encode/decode that round-trip code exactly."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"--tokenizer-model: no file at {model_path!r}. Train one with "
                "`mcode-train-tokenizer --input corpus.jsonl --output-prefix DIR/tokenizer` "
                "or pass the path of an existing sentencepiece .model file."
            )
        self.model_path = os.path.abspath(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        if self.sp.eos_id() < 0:
            raise ValueError(
                f"tokenizer {model_path!r} defines no EOS piece; the trainer uses it as the "
                "end-of-document (EOD) token. Retrain with eos_id set (mcode-train-tokenizer does)."
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    @property
    def eos(self) -> int:
        return self.sp.eos_id()

    @property
    def bos(self) -> int:
        return self.sp.bos_id()

    @property
    def pad(self) -> int:
        """The pad id, or -1 when the model has none (megatron-core then uses its own sentinel)."""
        return self.sp.pad_id()

    @cached_property
    def unique_identifiers(self) -> dict:
        """What megatron-core hashes to name its cached sample indices: a retrained tokenizer at
        the same path must not reuse indices built for the old one, so the file size is included."""
        return {
            "class": type(self).__name__,
            "model_path": self.model_path,
            "vocab_size": self.vocab_size,
            "model_bytes": os.path.getsize(self.model_path),
        }

    @cached_property
    def _meta_space_bytes(self) -> list[int]:
        """Byte-fallback ids of U+2581's UTF-8 bytes (E2 96 81)."""
        return [self.sp.piece_to_id(f"<0x{b:02X}>") for b in "\u2581".encode("utf-8")]

    def encode(self, text: str) -> list[int]:
        """Token ids of text; decode() gives the text back exactly.

        sentencepiece writes spaces as U+2581 internally, so a literal U+2581 in the input would
        decode as a space. Such characters are emitted as their UTF-8 byte pieces instead."""
        if "\u2581" not in text:
            return self.sp.encode(text, out_type=int)
        ids: list[int] = []
        for i, part in enumerate(text.split("\u2581")):
            if i:
                ids.extend(self._meta_space_bytes)
            if part:
                ids.extend(self.sp.encode(part, out_type=int))
        return ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])
